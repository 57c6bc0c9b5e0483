"""Synthetic arithmetic data that teaches a small model to use the calculator.

A tiny model cannot multiply, but it can learn to copy "12 times 7" into a
tool call, wait for the engine to force the result, and copy the result into
its answer (the book's §3.4: plugins for what the model is bad at).

- sft:   {"messages": [user question, assistant tool call, tool result, assistant answer]}
- prefs: {"prompt", "chosen", "rejected"}: the correct tool-using answer against
         a wrong one or one that skips the tool
- rl:    {"prompt", "answer"}: questions whose answer a program can check

Questions come in words ("what is twelve times 7?") and symbols ("12*7=?").
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..atomic import write_text
from .arithmetic import evaluate, format_result

KINDS = ("sft", "prefs", "rl")
OPS = {"+": ["plus", "added to"], "-": ["minus"], "*": ["times", "multiplied by"], "/": ["divided by"]}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
WORD_TEMPLATES = ["what is {a} {op} {b}?", "What is {a} {op} {b}?", "how much is {a} {op} {b}?",
                  "compute {a} {op} {b}", "Can you tell me what {a} {op} {b} is?", "what's {a} {op} {b}?"]
SYMBOL_TEMPLATES = ["{a}{op}{b}=?", "what is {a}{op}{b}?", "{a} {op} {b} = ?", "calculate {a}{op}{b}",
                    "What is {a} {op} {b}?"]
ANSWER_TEMPLATES = ["{a} {op} {b} is {r}.", "The answer is {r}.", "{a} {op} {b} = {r}."]


def calculate(expr: str) -> str:
    """The calculator tool's answer as text: the same evaluator the calculator plugin runs, so the data
    teaches exactly the results the tool will give."""
    return format_result(evaluate(expr))


def problem(rng: random.Random) -> dict:
    """One question: the operands, the operator, the question text, the tool call and the answer."""
    op = rng.choice("+-*/")
    if op == "*":
        a, b = rng.randint(2, 30), rng.randint(2, 12)
    elif op == "/":
        b, q = rng.randint(2, 12), rng.randint(2, 20)
        a = b * q
    else:
        a, b = rng.randint(0, 200), rng.randint(0, 100)
        if op == "-" and b > a:
            a, b = b, a
    if rng.random() < 0.5:
        word = rng.choice(OPS[op])
        spell = lambda n: WORDS[n] if n < len(WORDS) and rng.random() < 0.3 else str(n)  # noqa: E731
        question = rng.choice(WORD_TEMPLATES).format(a=spell(a), op=word, b=spell(b))
    else:
        word = op
        question = rng.choice(SYMBOL_TEMPLATES).format(a=a, op=op, b=b)
    expr = f"{a}{op}{b}"
    result = calculate(expr)
    answer = rng.choice(ANSWER_TEMPLATES).format(a=a, op=word, b=b, r=result)
    return {"question": question, "expr": expr, "result": result, "answer": answer, "a": a, "b": b, "op": word}


def tool_call(expr: str) -> str:
    return f"<|tool_call|>calculator: {expr}<|tool_end|>"


def sft_record(p: dict) -> dict:
    return {"messages": [{"role": "user", "content": p["question"]},
                         {"role": "assistant", "content": tool_call(p["expr"])},
                         {"role": "tool", "content": p["result"]},
                         {"role": "assistant", "content": p["answer"]}]}


def _wrong(p: dict, rng: random.Random) -> str:
    r = int(float(p["result"]))
    return str(r + rng.choice([-10, -2, -1, 1, 2, 10]))


def _replace_last(text: str, old: str, new: str) -> str:
    head, _, tail = text.rpartition(old)
    return head + new + tail


def prefs_record(p: dict, rng: random.Random) -> dict:
    chosen = f"{tool_call(p['expr'])}<|tool_result|>{p['result']}<|tool_end|>{p['answer']}"
    kind = rng.random()
    if kind < 0.4:    # no tool, wrong number
        rejected = _replace_last(p["answer"], p["result"], _wrong(p, rng))
    elif kind < 0.7:  # no tool, right number: we still prefer the checked answer
        rejected = p["answer"]
    else:             # called the tool, then misreported its result
        rejected = chosen.rsplit(p["answer"], 1)[0] + _replace_last(p["answer"], p["result"], _wrong(p, rng))
    return {"prompt": p["question"], "chosen": chosen, "rejected": rejected}


def rl_record(p: dict) -> dict:
    return {"prompt": p["question"], "answer": p["result"]}


def generate(kind: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{kind}:{seed}")
    out = []
    for _ in range(n):
        p = problem(rng)
        out.append(sft_record(p) if kind == "sft" else prefs_record(p, rng) if kind == "prefs" else rl_record(p))
    return out


def write(kind: str, n: int, seed: int, out: str | Path) -> Path:
    records = generate(kind, n, seed)
    write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(out)
