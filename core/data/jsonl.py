"""Reading training JSONL, one record per line, with errors that name file:line.

- chat (SFT):        {"messages": [{"role": "user", "content": "..."}, ...]}, optionally "tools": [...]
- preferences (RM):  {"prompt": ..., "chosen": ..., "rejected": ...} where each is a string
                     or a list of messages (TRL's two formats)
- prompts (RL):      {"prompt": "...", "answer": "84"}  (answer optional unless the reward checks it)

Everything is read and checked before training starts, so a bad line 9,000
stops the run in a second, not after an hour.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import SolError

ROLES = ("system", "user", "assistant", "tool")


MAX_LINE_BYTES = 1 << 20   # one record; a 50 MB line drove the tokenizer past 5 GB


def read_lines(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise SolError(f"{path}: no such file")
    out = []
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                raise SolError(f"{path}:{n}: line longer than {MAX_LINE_BYTES:,} bytes; split the record or "
                               "shorten it (one record is one conversation, pair or prompt)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SolError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line); save the file "
                               "as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SolError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); "
                               "each line must be one JSON object") from None
            except RecursionError:
                raise SolError(f"{path}:{n}: JSON nested too deeply; each line must be one flat record") from None
            if not isinstance(obj, dict):
                raise SolError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append((n, obj))
    if not out:
        raise SolError(f"{path}: the file holds no records; write one JSON object per line")
    return out


def check_messages(msgs, where: str, key: str = "messages") -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise SolError(f"{where}: \"{key}\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SolError(f"{where}: {key}[{i}] needs both \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise SolError(f"{where}: {key}[{i}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise SolError(f"{where}: {key}[{i}].content must be a string")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate ("\ud800") is valid JSON but no text a tokenizer reads
            raise SolError(f"{where}: {key}[{i}].content holds a lone surrogate escape (\\ud800-\\udfff); "
                           "write the character itself") from None
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_chat(path: str | Path) -> list[list[dict]]:
    return [msgs for _, msgs in read_chat_lines(path)]


def read_chat_lines(path: str | Path, with_tools: bool = False) -> list[tuple]:
    """("file:line", messages) per conversation, so later errors can name the line; with_tools:
    ("file:line", messages, tools), `tools` being the line's optional OpenAI tool list (None without)."""
    convs = []
    for n, obj in read_lines(path):
        where = f"{path}:{n}"
        if "messages" not in obj:
            raise SolError(f"{where}: missing key \"messages\"; a chat line is {{\"messages\": [...]}}")
        msgs = check_messages(obj["messages"], where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise SolError(f"{where}: no assistant message, so nothing to learn from this line")
        convs.append((where, msgs, check_tools(obj.get("tools"), where)) if with_tools else (where, msgs))
    return convs


def check_tools(tools, where: str) -> list[dict] | None:
    """A line's "tools": the OpenAI tool list the chat template is shown, as the chat passes its plugins' tools."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise SolError(f'{where}: "tools" must be a list of {{"type": "function", "function": {{"name", '
                       '"description", "parameters"}}}} objects')
    return tools or None


def _as_messages(value, role: str, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, where, key)


def read_prefs(path: str | Path, with_where: bool = False) -> list[dict]:
    """[{"prompt": messages, "chosen": messages, "rejected": messages}] (with_where: and "where", the
    record's "file:line")"""
    pairs = []
    for n, obj in read_lines(path):
        where = f"{path}:{n}"
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise SolError(f"{where}: missing key \"{key}\"; a preference line is "
                               "{\"prompt\", \"chosen\", \"rejected\"}")
        pairs.append({"prompt": _as_messages(obj["prompt"], "user", where, "prompt"),
                      "chosen": _as_messages(obj["chosen"], "assistant", where, "chosen"),
                      "rejected": _as_messages(obj["rejected"], "assistant", where, "rejected"),
                      **({"where": where} if with_where else {})})
    return pairs


def read_prompts(path: str | Path, need_answer: bool = False, with_where: bool = False) -> list[dict]:
    """[{"messages": [...], "answer": str | None}] (with_where: and "where", the record's "file:line")"""
    out = []
    for n, obj in read_lines(path):
        where = f"{path}:{n}"
        if "prompt" not in obj and "messages" not in obj:
            raise SolError(f"{where}: missing key \"prompt\"; an RL line is {{\"prompt\": ..., \"answer\": ...}}")
        msgs = _as_messages(obj.get("prompt", obj.get("messages")), "user", where, "prompt")
        answer = obj.get("answer")
        if need_answer and answer is None:
            raise SolError(f"{where}: missing key \"answer\", which the verifiable reward checks against")
        out.append({"messages": msgs, "answer": None if answer is None else str(answer),
                    **({"where": where} if with_where else {})})
    return out
