"""The plugin tools a model is trained to call, for its sol.json `"tools"` (what `sol serve` runs
for it by default): the names of the calls in the SFT data, and for RL its parent's."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import SolError

SOL_CALL = re.compile(r"<\|tool_call\|>\s*([^:<]+?)\s*:")
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
                names.update(SOL_CALL.findall(text))
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
