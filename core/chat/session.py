"""A conversation with a model, and the tool loop.

A ChatSession keeps the current branch of a conversation (messages with
roles system, user, assistant, tool), renders it with the model's chat
template, and streams events while the model answers. When the answer
contains a tool call it stops, asks the plugins to run the tool, forces
the result tokens into the sequence (flagged `forced`, so RL never trains on
them) and lets the model continue, at most MAX_TOOL_ROUNDS times a turn.

Two tool-call markups are understood:
- Sol models:      <|tool_call|>calculator: 12*7<|tool_end|>
  `rest` after "name:" is a JSON object of arguments if it parses as one,
  else the value of the tool's first required parameter;
- imported models: <tool_call>{"name": "calculator", "arguments": {...}}</tool_call>
The result goes back the way the model's own chat template writes a `tool`
message: for Sol that is <|tool_result|>84<|tool_end|> inside the same turn.

Every message is written to the store as soon as it is complete, so a crash
loses at most the answer being generated. Regenerate and edit add sibling
branches; the old ones stay in the store.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator

from ..errors import SolError
from ..generation.engine import DoneEvent, Engine, GenerationParams, Session, TokenEvent, end_of_turn_ids
from .markup import END_MARKERS, JSON_CALL, SOL_CALL
from .store import Store

MAX_TOOL_ROUNDS = 5
# A template that tells a tool-call message by its content being None (DeepSeek's).
TESTS_NONE = re.compile(r"""(\[\s*['"]content['"]\s*\]|\.content)\s+is\s+(not\s+)?none""")
# Stands in for a tool's result while we render the template, to find where the result goes.
SENTINEL = "\u2063SOL-TOOL-RESULT\u2063"


# ---- finding and parsing tool calls ---------------------------------------------------
@dataclass
class ToolCall:
    name: str
    arguments: dict
    style: str                 # "sol" | "json": which markup the model used
    error: str | None = None   # the call could not be read; this goes back to the model as the result


def find_tool_call(text: str, tools: dict) -> ToolCall | None:
    """The first complete tool call in an answer's text, or None."""
    m = SOL_CALL.search(text)
    if m:
        return parse_sol_call(m.group(1), tools)
    m = JSON_CALL.search(text)
    if m:
        return parse_json_call(m.group(1))
    return None


def parse_sol_call(body: str, tools: dict) -> ToolCall:
    """`calculator: 12*7` or `name: {"arg": ...}`."""
    name, sep, rest = body.partition(":")
    name, rest = name.strip(), rest.strip()
    if not sep or not name:
        return ToolCall(name or "?", {}, "sol", f"cannot read the tool call {body.strip()[:60]!r}; "
                                                "write it as name: arguments")
    if rest.startswith("{"):
        try:
            args = json.loads(rest)
            if isinstance(args, dict):
                return ToolCall(name, args, "sol")
        except ValueError:
            pass
    tool = tools.get(name)
    required = (tool.parameters.get("required") or list(tool.parameters.get("properties", {}))) if tool else []
    return ToolCall(name, {required[0] if required else "input": rest}, "sol")


def parse_json_call(body: str) -> ToolCall:
    """`{"name": ..., "arguments": {...}}` (arguments may also be a JSON string, as some models write it)."""
    try:
        call = json.loads(body.strip())
        name = call["name"]
        args = call.get("arguments", call.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        if not isinstance(name, str) or not isinstance(args, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        return ToolCall("?", {}, "json", f"cannot read the tool call {body.strip()[:60]!r}; expected "
                                         '{"name": ..., "arguments": {...}}')
    return ToolCall(name, args, "json")


ID_CHARS = string.ascii_letters + string.digits


def tool_call_id(message_id) -> str:
    """The id of the call an assistant message made: 9 letters and digits (Mistral's templates refuse any
    other), derived from the message's id so every rendering of the conversation writes the same one."""
    n = int.from_bytes(hashlib.sha256(f"sol-tool-call-{message_id}".encode()).digest()[:8], "big")
    out = ""
    for _ in range(9):
        n, r = divmod(n, len(ID_CHARS))
        out += ID_CHARS[r]
    return out


def json_string_arguments(messages: list[dict]) -> list[dict]:
    """The messages with each tool call's arguments as a JSON string instead of an object."""
    def call(c):
        f = c["function"]
        args = f["arguments"] if isinstance(f["arguments"], str) else json.dumps(f["arguments"], ensure_ascii=False)
        return {**c, "function": {**f, "arguments": args}}
    return [{**m, "tool_calls": [call(c) for c in m["tool_calls"]]} if "tool_calls" in m else m for m in messages]


def empty_call_content(messages: list[dict]) -> list[dict]:
    """The messages with content "" on each tool call that has none."""
    return [{**m, "content": ""} if "tool_calls" in m and m.get("content") is None else m for m in messages]


def strip_json_calls(text: str) -> str:
    return JSON_CALL.sub("", text).strip()


def result_text(result: dict) -> str:
    """What the model reads back: the result as text, or `error: ...`."""
    if not result.get("ok"):
        return f"error: {result.get('error')}"
    r = result.get("result")
    return r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)


# ---- the conversation ---------------------------------------------------------------------
@dataclass
class _Segment:
    """One stretch of sampling: up to the end of the turn or to a tool call."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    reason: str                # an engine stop reason, or "tool_call"
    call: ToolCall | None
    tokens_per_s: float
    time_to_first_token_s: float
    trace: list                # trace_entry() of each sampled token


KEEP = 10   # alternatives and sampler candidates a stored token keeps (more if the draw went further)


def trace_entry(token: dict) -> dict:
    """What a stored answer keeps of a token event for "why this token?" after a restart: the
    top alternatives, and the sampler's candidates up to the one drawn (at least KEEP)."""
    r7 = lambda xs: [round(x, 7) for x in xs]  # noqa: E731 - enough digits for bars; a quarter of the bytes
    out = {"text": token["text"], "id": token["id"], "logprob": round(token["logprob"], 7),
           "top": [{"id": t["id"], "text": t["text"], "prob": round(t["prob"], 7)} for t in token["top"][:KEEP]]}
    e = token.get("explanation")
    if e:
        n = max(KEEP, e["index"] + 1)
        out["explanation"] = {**e, "ids": e["ids"][:n], "probs": r7(e["probs"][:n]),
                              "cumulative": r7(e["cumulative"][:n]), "rest": round(e["rest"], 7)}
    return out


class ChatSession:
    def __init__(self, lm, plugins=None, store: Store | None = None, conversation_id: int | None = None,
                 system: str | None = None, template_vars: dict | None = None, consent=None):
        """`lm` is a LoadedModel (model, tokenizer, config). Without a store the conversation lives in memory.
        `template_vars`: extra variables for the chat template (Qwen3's {"enable_thinking": False}).
        `consent(name, arguments)`: asked before a tool that needs the user's yes (an MCP tool trusted
        `ask`) runs; answers "allow", "always" or "deny". Without it such calls are denied."""
        self.lm = lm
        self.template_vars = dict(template_vars or {})
        self.tokenizer = lm.tokenizer
        self.engine = Engine(lm.model, lm.tokenizer)
        self.plugins = plugins
        self.consent = consent
        self.store = store if store is not None else Store(":memory:")
        self.context = lm.config.context
        self.end_ids = end_of_turn_ids(lm.tokenizer, getattr(lm.config, "extra", None))
        self.conversation_id = conversation_id
        self._session: Session | None = None
        self._system = system
        self.messages: list[dict] = []
        if conversation_id is not None:
            conv = self.store.conversation(conversation_id)
            if system is None:
                self._system = conv["system"]
            elif system != conv["system"]:
                self.store.set_system(conversation_id, system)
            self.messages = self.store.messages(conversation_id)

    # ---- system prompt and branches ------------------------------------------------------
    @property
    def system(self) -> str | None:
        return self._system

    @system.setter
    def system(self, text: str | None) -> None:
        self._system = text or None
        if self.conversation_id is not None:
            self.store.set_system(self.conversation_id, self._system)

    def branches(self, message_id: int) -> list[int]:
        """Ids of the alternatives to a message (itself included), oldest first."""
        return [m["id"] for m in self.store.siblings(message_id)]

    def switch(self, message_id: int) -> list[dict]:
        """Show the branch through `message_id` (its newest continuation)."""
        self.messages = self.store.switch_branch(message_id)
        return self.messages

    # ---- the three ways to get an answer ----------------------------------------------------
    def send(self, text: str, params: GenerationParams | None = None,
             cancel: threading.Event | None = None) -> Iterator[dict]:
        """Add a user message and stream the answer's events."""
        return self._guard(self._send(text, params, cancel))

    def regenerate(self, params: GenerationParams | None = None,
                   cancel: threading.Event | None = None) -> Iterator[dict]:
        """Answer the last user message again; the old answer stays as a sibling branch."""
        return self._guard(self._regenerate(params, cancel))

    def edit(self, message_id: int, text: str, params: GenerationParams | None = None,
             cancel: threading.Event | None = None) -> Iterator[dict]:
        """Replace an earlier user message (as a new branch) and answer it; the old branch is kept."""
        return self._guard(self._edit(message_id, text, params, cancel))

    def _send(self, text, params, cancel):
        if not isinstance(text, str) or not text.strip():
            raise SolError("the message is empty; type something to send")
        self._ensure_conversation(text)
        parent = self.messages[-1]["id"] if self.messages else None
        yield self._add("user", text, parent, prompt_tokens=len(self._encode(text)))
        yield from self._answer(params or GenerationParams(), cancel)

    def _regenerate(self, params, cancel):
        i = self._last_user_index()
        if i is None:
            raise SolError("nothing to regenerate: the conversation has no user message yet")
        self.messages = self.messages[:i + 1]
        self.store.set_leaf(self.conversation_id, self.messages[-1]["id"])
        yield from self._answer(params or GenerationParams(), cancel)

    def _edit(self, message_id, text, params, cancel):
        i = next((k for k, m in enumerate(self.messages) if m["id"] == message_id), None)
        if i is None:
            raise SolError(f"message {message_id}: not on the current branch of this conversation")
        if self.messages[i]["role"] != "user":
            raise SolError(f"message {message_id}: only user messages can be edited "
                           f"(this one is {self.messages[i]['role']}); regenerate an answer instead")
        if not isinstance(text, str) or not text.strip():
            raise SolError("the edited message is empty; type something to send")
        parent = self.messages[i]["parent_id"]
        self.messages = self.messages[:i]
        yield self._add("user", text, parent, prompt_tokens=len(self._encode(text)))
        yield from self._answer(params or GenerationParams(), cancel)

    # ---- one assistant turn, with its tool rounds ---------------------------------------------
    def _answer(self, params: GenerationParams, cancel):
        prompt_ids, dropped = self._fit_prompt(params)
        for note in getattr(self.plugins, "tool_notes", lambda: [])():   # an MCP server that failed to start
            yield {"type": "notice", "text": note}
        if dropped:
            yield {"type": "notice", "text": f"The conversation is longer than the model's context window "
                                             f"({self.context} tokens): the oldest {dropped} message"
                                             f"{'s are' if dropped > 1 else ' is'} left out of what the model reads."}
        session = self._prefill(prompt_ids)
        budget = params.max_tokens
        rounds = 0
        while True:
            seg = yield from self._segment(session, params, budget, cancel)
            budget -= seg.completion_tokens
            meta = {"stop_reason": seg.reason}
            if seg.call is not None:
                meta["tool_call"] = {"name": seg.call.name, "arguments": seg.call.arguments, "style": seg.call.style}
            yield self._add("assistant", seg.text, self.messages[-1]["id"], seg.prompt_tokens,
                            seg.completion_tokens, meta, seg.tokens_per_s, seg.time_to_first_token_s, seg.trace)
            if seg.reason == "context":
                yield {"type": "notice", "text": f"The answer stopped at the end of the model's context window "
                                                 f"({self.context} tokens)."}
            if seg.call is None:
                return
            if rounds >= MAX_TOOL_ROUNDS:
                yield {"type": "notice", "text": f"Stopped: the model asked for more than {MAX_TOOL_ROUNDS} "
                                                 "tool calls in one answer."}
                return
            rounds += 1
            yield from self._tool_round(session, seg.call)
            if (cancel is not None and cancel.is_set()) or budget <= 0 or session.room <= 0:
                return

    def _tool_round(self, session: Session, call: ToolCall):
        yield {"type": "tool_call", "name": call.name, "arguments": call.arguments}
        if call.error:
            result = {"ok": False, "error": call.error}
        elif self.plugins is None:
            result = {"ok": False, "error": "no tools are available (plugins are not loaded)"}
        else:
            result = self.plugins.call_tool(call.name, call.arguments, consent=self.consent)
        key = "result" if result.get("ok") else "error"
        yield {"type": "tool_result", "name": call.name, key: result.get(key)}
        text = result_text(result)
        ids = self._encode(self._result_suffix(call, text))
        if len(ids) > session.room:
            raise SolError(f"the {call.name} result ({len(ids)} tokens) does not fit in what is left of the "
                           f"context window ({session.room} tokens)")
        forced = self.engine.force(session, ids)
        for ev in forced:
            yield self._token(ev)
        yield self._add("tool", text, self.messages[-1]["id"], prompt_tokens=len(ids),
                        meta={"name": call.name, "arguments": call.arguments, "ok": bool(result.get("ok"))})

    def _segment(self, session: Session, params: GenerationParams, budget: int, cancel):
        """Sample until the end of the turn, a complete tool call, cancel, or the token budget."""
        start = len(session.ids)
        p = replace(params, max_tokens=max(0, min(budget, session.room)),
                    stop_ids=tuple(sorted(set(params.stop_ids) | set(self.end_ids))))
        tools = self.plugins.tools() if self.plugins is not None else {}
        pieces: list[str] = []
        trace: list[dict] = []
        done: DoneEvent | None = None
        call = None
        t0 = time.perf_counter()
        first = 0.0
        if p.max_tokens > 0:
            gen = self.engine.generate(session, p, cancel)
            try:
                for ev in gen:
                    if isinstance(ev, DoneEvent):
                        done = ev
                        break
                    if not pieces:
                        first = time.perf_counter() - t0
                    pieces.append(ev.text)
                    token = self._token(ev)
                    trace.append(trace_entry(token))
                    yield token
                    tail = "".join(pieces[-12:])
                    if any(m in tail for m in END_MARKERS.values()):   # cheap test before the full search
                        call = find_tool_call("".join(pieces), tools)
                        if call is not None:
                            break   # the engine fed this token already; the session is ready for the result
            finally:
                gen.close()
        elapsed = time.perf_counter() - t0
        n = len(pieces)
        text = done.text if done is not None else "".join(pieces)
        reason = "tool_call" if call else (done.stop_reason if done else "context")
        return _Segment(text, start, n, reason, call, n / elapsed if elapsed > 0 else 0.0, first, trace)

    # ---- prompts -----------------------------------------------------------------------------
    def _fit_prompt(self, params: GenerationParams) -> tuple[list[int], int]:
        """The prompt's ids, dropping the oldest turns while it leaves too little room to answer."""
        # Half the window for the answer: a small model's answer (a tool call, its result, a sentence)
        # needs more than a quarter of 128 tokens, and a turn cut off mid-call reads as garbage.
        reserve = min(params.max_tokens, max(1, self.context // 2))
        history = self.messages
        start = 0
        while True:
            ids = self._encode(self._render(history[start:]))
            if len(ids) <= self.context - reserve:
                break
            later = next((i for i in range(start + 1, len(history)) if history[i]["role"] == "user"), None)
            if later is None:
                break
            start = later
        if len(ids) >= self.context:
            raise SolError(f"the last message needs {len(ids)} tokens with the chat template, but the model's "
                           f"context window is {self.context}; shorten it")
        return ids, start

    def _render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        out = [{"role": "system", "content": self._system}] if self._system else []
        tools = (self.plugins.tool_schemas() if self.plugins is not None else []) or None
        template = self.tokenizer.template_for(tools)
        structured = "tool_calls" in template
        out += [self._template_message(m, structured, bool(TESTS_NONE.search(template))) for m in messages]
        try:
            return self.tokenizer.apply_chat_template(out, add_generation_prompt=add_generation_prompt, tools=tools,
                                                      **self.template_vars)
        except SolError:
            if not any("tool_calls" in m for m in out):
                raise
        # transformers' docs give a call's arguments as a dict and no content beside it. Some templates were
        # written for other clients' forms: DeepSeek's join the arguments to strings (OpenAI's form, a JSON
        # string); Qwen3's adds the content to strings, so it must be "" (Qwen-Agent's form).
        variants = (json_string_arguments, empty_call_content)
        for i, variant in enumerate(variants):
            try:
                return self.tokenizer.apply_chat_template(variant(out), add_generation_prompt=add_generation_prompt,
                                                          tools=tools, **self.template_vars)
            except SolError:
                if i == len(variants) - 1:
                    raise

    @staticmethod
    def _template_message(m: dict, structured: bool, none_content: bool = False) -> dict:
        """A stored message as chat templates take it (transformers' chat-templating docs). A template that
        knows `tool_calls` gets the call structured, as the model was trained: {"id", "type": "function",
        "function": {"name", "arguments"}}, `content` None when the model wrote nothing beside the call, and
        the result as a tool message with the call's `tool_call_id` and `name`. Other templates get the text
        as the model wrote it.

        transformers 5 drops keys whose value is None before rendering (templates handle a missing key
        better than None), but DeepSeek's templates were written for None (`content is none` marks a
        call): a template that tests content against none gets it; others get no content key."""
        meta = m.get("meta") or {}
        call = meta.get("tool_call")
        if m["role"] == "assistant" and call and call.get("style") == "json" and structured:
            msg = {"role": "assistant", "content": strip_json_calls(m["content"]) or None,
                   "tool_calls": [{"id": tool_call_id(m["id"]), "type": "function",
                                   "function": {"name": call["name"], "arguments": call["arguments"]}}]}
            if msg["content"] is None and not none_content:
                del msg["content"]
            return msg
        if m["role"] == "tool":
            return {"role": "tool", "content": m["content"], "tool_call_id": tool_call_id(m.get("parent_id")),
                    "name": meta.get("name", "")}
        return {"role": m["role"], "content": m["content"]}

    def _result_suffix(self, call: ToolCall, text: str) -> str:
        """The text to force after a call: what the chat template writes between the end of the call and
        the model's next words, with the result in it."""
        marker = END_MARKERS[call.style]
        tool = {"id": None, "role": "tool", "content": SENTINEL, "meta": {"name": call.name},
                "parent_id": self.messages[-1]["id"]}
        try:
            full = self._render(self.messages + [tool])
        except SolError:
            full = ""
        at = full.rfind(SENTINEL)
        cut = full.rfind(marker, 0, at) if at >= 0 else -1
        if cut < 0:   # the template knows no tool messages: write the result in the call's own markup
            return (f"<|tool_result|>{text}<|tool_end|>" if call.style == "sol"
                    else f"\n<tool_response>\n{text}\n</tool_response>\n")
        return full[cut + len(marker):].replace(SENTINEL, text)

    def _encode(self, text: str) -> list[int]:
        # The template writes any BOS itself; adding special tokens again would double it.
        return self.tokenizer.encode_ids(text, add_special_tokens=False)

    def _prefill(self, ids: list[int]) -> Session:
        """Reuse the KV cache for the prefix this prompt shares with the last one; feed the rest."""
        s = self._session
        if s is None:
            s = self._session = Session(self.engine.model)
        common, n = 0, min(len(s.ids), len(ids), s.cache.pos)
        while common < n and s.ids[common] == ids[common]:
            common += 1
        common = min(common, len(ids) - 1)   # feed at least one token, for fresh logits
        s.rewind(common)
        s.feed(ids[common:])
        return s

    # ---- events and the store ------------------------------------------------------------------
    def _ensure_conversation(self, first_text: str) -> None:
        if self.conversation_id is None:
            title = (first_text.strip().splitlines() or ["New chat"])[0][:60]
            self.conversation_id = self.store.create_conversation(title, model=getattr(self.lm, "name", None),
                                                                  system=self._system)

    def _last_user_index(self) -> int | None:
        return next((i for i in range(len(self.messages) - 1, -1, -1) if self.messages[i]["role"] == "user"), None)

    def _add(self, role, content, parent_id, prompt_tokens=0, completion_tokens=0, meta=None,
             tokens_per_s=0.0, time_to_first_token_s=0.0, trace=None) -> dict:
        """Store a finished message (committed now), put it on the branch, and return its event."""
        mid = self.store.add_message(self.conversation_id, role, content, parent_id, prompt_tokens,
                                     completion_tokens, meta, trace)
        self.messages.append({"id": mid, "role": role, "content": content, "prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens, "parent_id": parent_id, "meta": meta or {}})
        return {"type": "message", "role": role, "content": content, "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens, "id": mid, "tokens_per_s": tokens_per_s,
                "time_to_first_token_s": time_to_first_token_s}

    @staticmethod
    def _token(ev: TokenEvent) -> dict:
        return {"type": "token", "text": ev.text, "id": ev.id, "logprob": ev.logprob, "top": ev.top,
                "explanation": ev.explanation.to_dict() if ev.explanation is not None else None,
                "forced": ev.forced}

    def _emit(self, event: dict) -> dict:
        if self.plugins is not None:
            self.plugins.chat_event(event)
        return event

    def _guard(self, events) -> Iterator[dict]:
        """Every event also goes to the plugins; a failure becomes an error event, never an exception."""
        try:
            for ev in events:
                yield self._emit(ev)
        except SolError as e:
            yield self._emit({"type": "error", "message": str(e)})
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            yield self._emit({"type": "error", "message": f"unexpected {type(e).__name__}: {first}"})
