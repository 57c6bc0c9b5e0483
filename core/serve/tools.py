"""Tools on the server: which plugin tools it runs itself, which special tokens never reach
`content`, and the grammar that forces a call (`tool_choice` "required" or a named function).

`sol serve --plugin-tools MODE`:
- `trained` (the default): for a request that brings no tools of its own, the server runs the
  plugin tools the model was trained to call (its sol.json `"tools"`, written by `sol train sft`
  and `rl`), as `sol chat` does;
- `all`: every enabled plugin tool, and the MCP servers' tools whose trust is `allow` (set by the
  user, or read-only by the server's annotation): a server has no one to ask, so a tool that needs
  consent is never offered;
- `none`: none. A call the model writes anyway comes back as a `tool_calls` message.
The plugins' schemas are read in every mode, so a call the server will not run still comes back
with its arguments named as the tool's schema names them (`{"expression": "12*7"}`).
"""
from __future__ import annotations

import json

from ..errors import SolError

MODES = ("trained", "all", "none")
# Special tokens a template writes as text of a turn, which stay in `content` as the model writes them.
REASONING = ("think", "reason")


class ServerTools:
    """The plugin manager and the mode; None plugins means no plugin is known at all."""

    def __init__(self, plugins=None, mode: str = "trained"):
        if mode not in MODES:
            raise SolError(f"--plugin-tools {mode}: choose one of {', '.join(MODES)}")
        self.plugins, self.mode = plugins, mode

    def ready(self) -> bool:
        """Whether known() and runs() answer at once (no MCP server to start first)."""
        return self.plugins is None or self.plugins.tools_ready()

    def known(self) -> dict:
        """Every plugin tool, by name (their schemas read the model's calls)."""
        return self.plugins.tools() if self.plugins is not None else {}

    def runs(self, trained: list[str]) -> dict:
        """The tools the server runs for a model trained to call `trained`."""
        if self.mode == "none" or self.plugins is None:
            return {}
        tools = self.plugins.tools()
        names = tools if self.mode == "all" else [n for n in trained if n in tools]
        # No one is here to ask: a plugin's tool runs, an MCP server's only when trusted `allow`.
        return {n: tools[n] for n in names if getattr(tools[n], "trust", "allow") == "allow"}

    @staticmethod
    def schemas(tools: dict) -> list[dict]:
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in tools.values()]


def trained_tools(meta: dict, where: str) -> list[str]:
    """The sol.json `"tools"` list: the plugin tools the model was trained to call."""
    tools = (meta or {}).get("tools", [])
    if not isinstance(tools, list) or not all(isinstance(t, str) and t for t in tools):
        raise SolError(f"{where}: \"tools\" must be a list of tool names, e.g. [\"calculator\"]; fix or remove it")
    return tools


def hidden_specials(tokenizer) -> tuple[str, ...]:
    """The special tokens' texts that never reach `content` (markup of the chat format, not words);
    reasoning markers such as <think> stay."""
    return tuple(sorted((t for t in tokenizer.special_tokens() if t and not any(r in t.lower() for r in REASONING)),
                        key=len, reverse=True))


# ---- forcing a call: the model's own call markup, with each allowed tool's argument schema ----------
def _bare_parameter(params: dict) -> tuple[str, dict] | None:
    """The one required string parameter a Sol model writes bare (`calculator: 12*7`), else None."""
    props = params.get("properties") or {}
    required = params.get("required") or list(props)
    if len(required) != 1 or len(props) > 1:
        return None
    schema = props.get(required[0]) or {}
    return (required[0], schema) if schema.get("type") == "string" else None


def _bare_value(schema: dict) -> str:
    """A Lark expression for a bare string argument: its enum, pattern or length bounds; never `<`."""
    if isinstance(schema.get("enum"), list) and all(isinstance(v, str) and v for v in schema["enum"]):
        return "(" + " | ".join(json.dumps(v) for v in schema["enum"]) + ")"
    if isinstance(schema.get("pattern"), str):
        return "/" + schema["pattern"].strip("^$").replace("/", "\\/") + "/"
    lo = max(1, int(schema.get("minLength", 1)))
    hi = int(schema.get("maxLength", 200))
    return f"/[^<\\n]{{{lo},{max(lo, hi)}}}/"


def call_grammar(tokenizer, tools: dict, names: list[str], parallel: bool) -> str:
    """A Lark grammar (llguidance's) for one call, or with `parallel` one or more, to the tools
    `names`, in the model's own call markup: Sol's `<|tool_call|>name: arguments<|tool_end|>`, else
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. `tools`: {name: parameters schema}."""
    from .constrain import COMPACT
    from .schema import strict_schema
    rules = []
    for k, name in enumerate(names):
        params = strict_schema(tools.get(name) or {"type": "object"})
        if tokenizer.is_sol:
            bare = _bare_parameter(params)
            args = _bare_value(bare[1]) if bare else "%json " + json.dumps({**params, "x-guidance": COMPACT})
            rules.append(f"c{k}: {json.dumps(name + ': ')} {args}")
        else:
            call = {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                    "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": COMPACT}
            rules.append(f"c{k}: %json {json.dumps(call)}")
    body = " | ".join(f"c{k}" for k in range(len(names)))
    if tokenizer.is_sol:
        call = f"call: <|tool_call|> ({body}) <|tool_end|>"
    else:
        call = f'call: "<tool_call>" "\\n"? ({body}) "\\n"? "</tool_call>"'
    start = 'start: call ("\\n"? call)*' if parallel else "start: call"
    return "\n".join([start, call, *rules]) + "\n"
