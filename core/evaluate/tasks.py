"""The data files `sol eval` reads, checked line by line before any model runs.

- choice:     {"question": str, "choices": [str, ...], "answer": int}
- exact:      {"prompt": str, "answer": str}  (a number is read as its text)
- perplexity: a UTF-8 text file
"""
from __future__ import annotations

from pathlib import Path

from ..data.jsonl import read_lines
from ..errors import SolError

TASKS = ("perplexity", "choice", "exact")


def read_choice(path: str | Path) -> list[dict]:
    """[{"question", "choices", "answer", "where"}]; a line without choices, or whose answer is not the index
    of one of them, fails naming its file:line."""
    out = []
    for n, obj in read_lines(path):
        where = f"{path}:{n}"
        q, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
        if not isinstance(q, str):
            raise SolError(f'{where}: "question" must be a string; a line is {{"question": str, "choices": '
                           '[str, ...], "answer": int}')
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise SolError(f'{where}: no "choices"; give a non-empty list of strings')
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise SolError(f'{where}: "answer" must be the index (an integer) of the right choice')
        if not 0 <= answer < len(choices):
            raise SolError(f'{where}: "answer" {answer} is out of range for {len(choices)} choices '
                           f"(0 to {len(choices) - 1})")
        out.append({"question": q, "choices": choices, "answer": answer, "where": where})
    return out


def read_exact(path: str | Path) -> list[dict]:
    """[{"prompt", "answer", "where"}]"""
    out = []
    for n, obj in read_lines(path):
        where = f"{path}:{n}"
        prompt, answer = obj.get("prompt"), obj.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SolError(f'{where}: "prompt" must be a non-empty string; a line is {{"prompt": str, "answer": str}}')
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise SolError(f'{where}: "answer" must be a non-empty string (or a number)')
        out.append({"prompt": prompt, "answer": answer.strip(), "where": where})
    return out


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise SolError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SolError(f"{path}: not valid UTF-8 (byte {e.start + 1}); save the file as UTF-8") from None


def read(task: str, path: str | Path):
    """The task's records (choice, exact) or text (perplexity)."""
    if task not in TASKS:
        raise SolError(f"task {task!r}: must be one of {', '.join(TASKS)}")
    return {"perplexity": read_text, "choice": read_choice, "exact": read_exact}[task](path)
