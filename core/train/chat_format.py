"""Conversations -> token ids and a loss mask, in the model's own chat format.

Sol's models train in Sol's format (core/data/conversations.py). A model with a chat template (Qwen's
ChatML, Llama 3, Gemma, Phi, ...) trains through that template instead:

- ids: the template's rendering tokenized without adding special tokens, which is what transformers'
  `apply_chat_template(messages, tokenize=True)` gives (a template that writes bos_token itself gets
  exactly one BOS). Nothing is added to the vocabulary.
- mask (the targets): the assistant's turns. A template with {% generation %} blocks marks them itself,
  as transformers' return_assistant_tokens_mask reads them. Otherwise each assistant message's span is
  what rendering messages[:i+1] adds to messages[:i] rendered with the generation prompt: the
  assistant's words, its tool call in the template's form, and the end-of-turn token (<|im_end|>,
  <|eot_id|>, <end_of_turn>), a target so the model learns to stop. Whitespace the template writes
  after that token (ChatML's and Gemma's "\\n") is not: generation stops at the token, and the next
  rendering writes the newline itself. A token is a target when it overlaps a span (as transformers
  maps generation spans to tokens).
- tool calls: an assistant message holds its call as the chat stores it, in the model's markup
  (<tool_call>{"name", "arguments"}</tool_call>, or Sol's <|tool_call|>name: args<|tool_end|>), and the
  next `tool` message holds the result. Both go to the template the way core/chat/session.py sends
  them (ChatSession._template_message): structured `tool_calls` for a template that knows them, the
  text as written for one that does not.

A template that renders an earlier assistant turn differently once later turns follow it (Qwen3's
drops the thinking of earlier turns) leaves no way to find that turn's tokens by rendering; that is an
error naming the line, unless the template has {% generation %} marks.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from ..chat.session import (SOL_CALL, TESTS_NONE, ChatSession, empty_call_content, find_tool_call,
                            json_string_arguments)
from ..data import conversations
from ..errors import SolError
from ..formats.tokenizer import Tokenizer, render_template

# Written around {% generation %} bodies while rendering: Unicode noncharacters, never in text.
MARKS = ("\ufdd0", "\ufdd1")


def uses_sol_format(tok: Tokenizer) -> bool:
    """Sol's own models (Sol's chat tokens and no template of their own) keep Sol's format."""
    return tok.is_sol and not tok.templates


def encode(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
           where: str = "a conversation", template_vars: dict | None = None) -> tuple[list[int], list[bool]]:
    """(ids, is_target per id) of a conversation in the model's chat format. `where` names it in errors
    ("data.jsonl:12"); `tools`: the OpenAI tool list the template shows the model, as the chat passes it."""
    if uses_sol_format(tok):
        return conversations.encode(tok, messages, add_generation_prompt)
    return TemplateEncoder(tok, tools, template_vars).encode(messages, add_generation_prompt, where)


class TemplateEncoder:
    def __init__(self, tok: Tokenizer, tools: list | None = None, template_vars: dict | None = None):
        self.tok, self.tools = tok, tools or None
        self.template = tok.template_for(self.tools)
        self.context = {**tok.template_tokens(), **(template_vars or {})}
        self.has_generation = "generation" in self.template and "endgeneration" in self.template

    def encode(self, messages: list[dict], add_generation_prompt: bool, where: str) -> tuple[list[int], list[bool]]:
        for m in messages:
            if any(c in (m.get("content") or "") for c in MARKS):
                raise SolError(f"{where}: a message holds U+FDD0 or U+FDD1, characters Sol reserves; remove them")
        variants = self.message_variants(messages)
        msgs, text = self._first_that_renders(variants, add_generation_prompt, where)
        spans = self.assistant_spans(msgs, text, where, add_generation_prompt)
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, _overlaps(enc.offsets, spans)

    # ---- messages as the chat sends them to this template -------------------------------------------
    def message_variants(self, messages: list[dict]) -> list[list[dict]]:
        """The messages as core/chat/session.py renders them, then the forms it falls back to when a
        template refuses structured calls (arguments as a JSON string; "" content beside a call)."""
        structured = "tool_calls" in self.template
        none_content = bool(TESTS_NONE.search(self.template))
        tools = {t["function"]["name"]: SimpleNamespace(parameters=t["function"].get("parameters") or {})
                 for t in self.tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)}
        out, last_call = [], (None, "")   # (index, tool name) of the latest assistant message with a call
        for i, m in enumerate(messages):
            stored = {"id": i, "role": m["role"], "content": m["content"]}
            if m["role"] == "assistant":
                call = find_tool_call(m["content"], tools)
                if call is not None and call.error is None:
                    last_call = (i, call.name)
                    stored["content"] = SOL_CALL.sub(lambda _, c=call: _json_markup(c.name, c.arguments),
                                                     m["content"], count=1)
                    stored["meta"] = {"tool_call": {"name": call.name, "arguments": call.arguments, "style": "json"}}
            elif m["role"] == "tool":
                stored["parent_id"], stored["meta"] = last_call[0], {"name": last_call[1]}
            out.append(ChatSession._template_message(stored, structured, none_content))
        if not any("tool_calls" in m for m in out):
            return [out]
        return [out, json_string_arguments(out), empty_call_content(out)]

    # ---- rendering -------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool, marks: tuple[str, str] | None = None) -> str:
        return render_template(self.template, generation_marks=marks, messages=messages, tools=self.tools,
                               documents=None, add_generation_prompt=add_generation_prompt, **self.context)

    def _first_that_renders(self, variants, add_generation_prompt, where):
        first = None
        for msgs in variants:
            try:
                return msgs, self.render(msgs, add_generation_prompt)
            except SolError as e:
                first = first or e
        raise self.error(first, where)

    def error(self, e: SolError, where: str) -> SolError:
        line = getattr(e, "template_line", None)
        source = template_source(self.tok, self.template)
        at = (f"{source}:{line}" if source.endswith(".jinja") else f"{source}, template line {line}") if line \
            else source
        reason = str(e).removeprefix("chat template: ")
        return SolError(f"{where}: the chat template ({at}) cannot render this conversation: {reason}")

    def assistant_spans(self, msgs: list[dict], text: str, where: str, add_generation_prompt: bool):
        """Character spans of `text` that are the assistant's, as (start, end)."""
        if self.has_generation:
            try:
                marked = self.render(msgs, add_generation_prompt, MARKS)
            except SolError as e:
                raise self.error(e, where) from None
            spans, plain, pos = [], [], 0
            for part in marked.split(MARKS[0]):
                body, close, rest = part.partition(MARKS[1])
                if close:
                    spans.append((pos, pos + len(body)))
                    plain += [body, rest]
                    pos += len(body) + len(rest)
                else:
                    plain.append(part)
                    pos += len(part)
            if "".join(plain) != text:   # a template that reworks a {% generation %} body's text afterwards
                raise SolError(f"{where}: the chat template's {{% generation %}} blocks do not mark whole "
                               f"pieces of its text ({template_source(self.tok, self.template)}); remove them "
                               "and Sol finds the assistant's turns by rendering")
            return [s for s in spans if s[1] > s[0]]
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            try:
                before = self.render(msgs[:i], True)
                upto = self.render(msgs[:i + 1], False)
            except SolError as e:
                raise self.error(e, where) from None
            if not upto.startswith(before) or not text.startswith(upto):
                raise SolError(
                    f"{where}: the chat template ({template_source(self.tok, self.template)}) writes messages[{i}] "
                    "(an assistant turn) differently once later messages follow it, so Sol cannot tell which "
                    "tokens are the assistant's; give each assistant turn its own line (the conversation up to "
                    "it), or use a template with {% generation %} marks")
            start, end = len(before), len(upto.rstrip())
            if end > start:
                spans.append((start, end))
        return spans


def _json_markup(name: str, arguments: dict) -> str:
    """A call in the markup the chat stores for imported models (and strips again for structured templates)."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does its character range overlap one of the (sorted, disjoint) spans?"""
    out, k = [], 0
    for a, b in offsets:
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        out.append(k < len(spans) and spans[k][0] < max(b, a + 1))
    return out


def template_source(tok: Tokenizer, template: str) -> str:
    """The file the template came from, for errors."""
    if tok.path is None:
        return "the tokenizer's chat template"
    d = Path(tok.path).parent
    for f in [d / "chat_template.jinja", *sorted((d / "additional_chat_templates").glob("*.jinja"))]:
        try:
            if f.is_file() and f.read_text(encoding="utf-8") == template:
                return str(f)
        except (OSError, UnicodeDecodeError):
            continue
    if "chat_template" in tok.config or not (d / "chat_template.json").is_file():
        return str(d / "tokenizer_config.json")
    return str(d / "chat_template.json")


# ---- the plugin tools a model is trained to call, for its sol.json "tools" (what `sol serve` runs for it by
# default): the names of the calls in the SFT data, and for RL its parent's.
SOL_CALL_NAME = re.compile(r"<\|tool_call\|>\s*([^:<]+?)\s*:")
JSON_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def called_in(path: str | Path) -> list[str]:
    """Names of the tools the assistant messages of a chat JSONL call, sorted: structured
    `tool_calls`, Sol's inline `<|tool_call|>name: ...` and `<tool_call>{"name": ...}</tool_call>`."""
    names: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line).get("messages") or []
            except (ValueError, AttributeError):
                raise SolError(f"{path}, line {n}: not a JSON object with `messages`; fix the line") from None
            for m in messages:
                if not isinstance(m, dict) or m.get("role") != "assistant":
                    continue
                for c in m.get("tool_calls") or []:
                    name = (c.get("function") or {}).get("name") if isinstance(c, dict) else None
                    if isinstance(name, str) and name:
                        names.add(name)
                text = m.get("content") if isinstance(m.get("content"), str) else ""
                names.update(SOL_CALL_NAME.findall(text))
                for body in JSON_CALL.findall(text):
                    try:
                        name = json.loads(body).get("name")
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(name, str) and name:
                        names.add(name)
    return sorted(names)


def tools_field(names) -> dict:
    """{"tools": [...]} for sol.json, or nothing when the model calls no tool."""
    names = sorted(set(names))
    return {"tools": names} if names else {}
