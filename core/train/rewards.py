"""Verifiable rewards: a program checks the answer (RL's `--reward NAME`).

The answer is the last number the assistant states after its last tool
result, e.g. "12 times 7 is 84." -> 84.
"""
from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_text(text: str) -> str:
    """What the assistant says after its last tool result, without the end-of-turn marker."""
    text = text.rsplit("<|tool_end|>", 1)[-1]
    return text.split("<|end|>", 1)[0]


def stated_number(text: str) -> float | None:
    found = NUMBER.findall(final_text(text))
    return float(found[-1]) if found else None


def answer_reward(text: str, answer: str | None, tool_calls: int) -> float:
    """1 when the final stated number equals the answer."""
    if answer is None:
        return 0.0
    got = stated_number(text)
    try:
        return 1.0 if got is not None and abs(got - float(answer)) < 1e-6 else 0.0
    except ValueError:
        return 1.0 if final_text(text).strip() == answer.strip() else 0.0


def calculator_reward(text: str, answer: str | None, tool_calls: int) -> float:
    """1 when the answer is right and was checked with the calculator."""
    return answer_reward(text, answer, tool_calls) if tool_calls > 0 else 0.0


REWARDS = {"answer": answer_reward, "calculator": calculator_reward}
