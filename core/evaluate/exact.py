"""Exact answers: each prompt goes to the model as a chat message (tools included, so the starter model's
calculator runs), answered greedily; a line is right when the final assistant text contains the answer
as a whole word or number: "12 times 7 is 84." has "84", "840" and "8.4" do not; letters compare without
regard to case.
"""
from __future__ import annotations

import re
from typing import Iterator

from ..chat.session import ChatSession
from ..chat.store import Store
from ..errors import SolError
from ..generation.engine import GenerationParams
from ..generation.sampling import SamplingParams


def contains(text: str, answer: str) -> bool:
    # Not inside a longer word or number: no letter, digit or decimal point joined on either side
    # (a sentence's full stop after the number is fine).
    pattern = r"(?<![\w.])" + re.escape(answer) + r"(?!\w|\.\d)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def answer(lm, plugins, prompt: str, max_tokens: int, where: str) -> str:
    """The final assistant text of one greedy chat turn (after any tool rounds)."""
    chat = ChatSession(lm, plugins, Store(":memory:"))
    params = GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0), explain=False)
    final = ""
    for ev in chat.send(prompt, params):
        if ev["type"] == "error":
            raise SolError(f"{where}: {ev['message']}")
        if ev["type"] == "message" and ev["role"] == "assistant":
            final = ev["content"]
    return final


def items(lm, records: list[dict], plugins=None, max_tokens: int = 256, cancel=None) -> Iterator[dict]:
    """Per line: {"i", "text": the final answer, "exact": 1.0 or 0.0}."""
    for i, r in enumerate(records):
        if cancel is not None and cancel.is_set():
            return
        text = answer(lm, plugins, r["prompt"], max_tokens, r["where"])
        yield {"i": i, "text": text, "exact": float(contains(text, r["answer"]))}


def summary(results: list[dict]) -> dict:
    n = len(results)
    return {"n": n, "exact": sum(r["exact"] for r in results) / n if n else None}
