"""A chat request's messages and tools, rendered into a prompt by the model's chat template.

As core/chat/session.py renders a conversation: tool calls go structured to a template that knows
`tool_calls`, else in the model's own markup; a bad message is an ApiError that names it."""
from __future__ import annotations

import json

from ..chat.session import TESTS_NONE, json_string_arguments
from ..errors import SolError
from . import protocol as P
from .schema import check_openai_strict
from .served import Served


class _Tool:
    """What chat.parse_sol_call reads of a tool: its parameters' JSON schema."""

    def __init__(self, parameters: dict):
        self.parameters = parameters if isinstance(parameters, dict) else {}


def chat_tools(body: dict):
    """({name: _Tool} or None when tools are off, the OpenAI tool list for the template, the names of
    the tools a call is forced to (tool_choice "required": any of them; a named function: that one)
    or None when the model chooses)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
        and isinstance(choice["function"].get("name"), str)
    if choice not in (None, "auto", "none", "required") and not named:
        raise P.bad("tool_choice", 'give "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
    if tools is None or choice == "none":
        if choice == "required" or named:
            raise P.bad("tool_choice", "forces a call, but the request has no `tools`; send the tools to choose from")
        return None, [], None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise P.bad("tools", 'give a list of {"type": "function", "function": {"name", "parameters"}}')
    for k, t in enumerate(tools):
        f = t["function"]
        if f.get("strict") is True:
            try:
                check_openai_strict(f.get("parameters") or {}, f"tools[{k}].function.parameters")
            except SolError as e:
                raise P.ApiError(400, str(e), f"tools[{k}].function.parameters", "invalid_value") from None
    by_name = {t["function"]["name"]: _Tool(t["function"].get("parameters") or {}) for t in tools}
    forced = None
    if choice == "required":
        forced = list(by_name)
    elif named:
        name = choice["function"]["name"]
        if name not in by_name:
            raise P.bad("tool_choice", f"names the function {name!r}, which is not in `tools` "
                                       f"({', '.join(by_name) or 'none'})")
        forced = [name]
    if forced == []:
        raise P.bad("tool_choice", "\"required\" needs at least one tool in `tools`")
    return by_name, tools, forced


# What the server itself gives every chat template; a request's chat_template_kwargs cannot replace them.
TEMPLATE_OWN = {"messages", "tools", "documents", "add_generation_prompt"}


def template_kwargs(body: dict) -> dict:
    """`chat_template_kwargs` (as vLLM and llama.cpp's server take it): extra variables for the chat
    template, such as Qwen3's {"enable_thinking": false}."""
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kw):
        raise P.bad("chat_template_kwargs", 'give an object of template variables, e.g. {"enable_thinking": false}')
    own = sorted(TEMPLATE_OWN & set(kw))
    if own:
        raise P.bad("chat_template_kwargs", f"{', '.join(own)} come from the request itself; leave them out")
    return kw


def render_chat(s: Served, messages, tools: list | None, template_vars: dict | None = None) -> str:
    """The prompt: OpenAI messages through the model's chat template (the one transformers would pick
    for these tools), as core/chat/session.py renders a conversation."""
    template = s.tokenizer.template_for(tools)
    out = chat_messages(s, messages, tools or [], "tool_calls" in template, bool(TESTS_NONE.search(template)))
    kw = template_vars or {}
    try:
        return s.tokenizer.apply_chat_template(out, add_generation_prompt=True, tools=tools, **kw)
    except SolError:
        if not any("tool_calls" in m for m in out):   # DeepSeek's templates want the arguments as a string
            raise
        return s.tokenizer.apply_chat_template(json_string_arguments(out), add_generation_prompt=True, tools=tools,
                                               **kw)


def chat_messages(s: Served, messages, tool_list: list, structured: bool, none_content: bool) -> list[dict]:
    """OpenAI messages as chat templates take them. A template that knows `tool_calls` gets calls
    structured; Sol's gets them in its own markup, others as <tool_call>{json}</tool_call> text."""
    if not isinstance(messages, list) or not messages:
        raise P.bad("messages", "give a non-empty list of {role, content} messages")
    names: dict[str, str] = {}
    out = []
    for k, m in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise P.bad(f"{where}.role", "must be system, user, assistant or tool")
        role = "system" if m["role"] == "developer" else m["role"]
        content = text_of(m.get("content"), f"{where}.content")
        msg = {"role": role, "content": content}
        calls = m.get("tool_calls") or []
        if role == "assistant" and calls:
            parsed = []
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise P.bad(f"{where}.tool_calls[{j}]", "needs function.name and function.arguments")
                try:
                    args = json.loads(f.get("arguments") or "{}")
                except ValueError:
                    raise P.bad(f"{where}.tool_calls[{j}].function.arguments", "is not valid JSON") from None
                names[c.get("id", "")] = f["name"]
                parsed.append((c.get("id") or "", f["name"], args))
            if structured:
                msg["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                     for i, n, a in parsed]
                if not content:
                    msg["content"] = None
                    if not none_content:
                        del msg["content"]
            elif s.tokenizer.is_sol:
                msg["content"] = content + "".join(f"<|tool_call|>{n}: {sol_arguments(n, a, tool_list)}<|tool_end|>"
                                                   for _, n, a in parsed)
            else:
                msg["content"] = content + "".join(
                    "<tool_call>" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False) + "</tool_call>"
                    for _, n, a in parsed)
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id", "")
            msg["name"] = m.get("name") or names.get(m.get("tool_call_id", ""), "")
        out.append(msg)
    return out


def sol_arguments(name: str, args, tool_list: list) -> str:
    """A call's arguments as Sol models write them: the bare value when the tool takes one
    required parameter (`calculator: 12*7`), else a JSON object."""
    tool = next((t["function"] for t in tool_list if t["function"].get("name") == name), None)
    params = (tool or {}).get("parameters") or {}
    required = params.get("required") or list(params.get("properties", {}))
    if isinstance(args, dict) and len(args) == 1 and required and list(args) == [required[0]] \
            and isinstance(args[required[0]], str):
        return args[required[0]]
    return json.dumps(args, ensure_ascii=False)


def text_of(content, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise P.bad(where, f"content part of type {p.get('type')!r} is not supported (text only)")
            parts.append(p["text"])
        return "".join(parts)
    raise P.bad(where, "content must be a string or a list of text parts")
