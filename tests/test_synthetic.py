"""Synthetic calculator data: well-formed, seeded, and right."""
from __future__ import annotations

import json
import subprocess
import sys

from sol.core.data import jsonl, synthetic
from sol.core.train.rewards import answer_reward, calculator_reward


def test_sft_records_call_the_calculator_and_state_its_result(tmp_path):
    path = synthetic.write("sft", 50, 3, tmp_path / "sft.jsonl")
    convs = jsonl.read_chat(path)
    assert len(convs) == 50
    for msgs in convs:
        user, call, tool, answer = msgs
        assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
        expr = call["content"].removeprefix("<|tool_call|>calculator: ").removesuffix("<|tool_end|>")
        assert tool["content"] == synthetic.calculate(expr)
        assert answer_reward(answer["content"], tool["content"], 1) == 1.0


def test_seeded_and_both_forms(tmp_path):
    a = synthetic.generate("rl", 200, 7)
    assert a == synthetic.generate("rl", 200, 7) and a != synthetic.generate("rl", 200, 8)
    prompts = [r["prompt"] for r in a]
    assert any(w in p for p in prompts for w in ("times", "plus", "minus", "divided by"))
    assert any(s in p for p in prompts for s in "*+/")


def test_preferences_prefer_the_checked_right_answer():
    for p in synthetic.generate("prefs", 100, 1):
        assert p["chosen"].startswith("<|tool_call|>calculator: ") and p["chosen"] != p["rejected"]
        answer = p["chosen"].split("<|tool_result|>")[1].split("<|tool_end|>")[0]
        calls = p["rejected"].count("<|tool_call|>")
        assert calculator_reward(p["chosen"], answer, 1) == 1.0
        assert calculator_reward(p["rejected"], answer, calls) == 0.0


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "prefs.jsonl"
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "data", "synth", "prefs", "--n", "5", "--seed", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 5 and set(lines[0]) == {"prompt", "chosen", "rejected"}
