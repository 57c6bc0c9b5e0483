"""The shipped starter model: a chat model with the calculator, made by `sol train recipe starter`."""
from __future__ import annotations

import json

from sol.core.formats.registry import builtin_models_dir, list_models

STARTER = builtin_models_dir() / "starter"


def test_starter_is_listed_small_and_has_its_lineage():
    assert any(m["name"] == "starter" for m in list_models())
    size = sum(f.stat().st_size for f in STARTER.iterdir() if f.is_file())
    assert size <= 25 * 2**20
    meta = json.loads((STARTER / "sol.json").read_text())
    assert meta["stage"] == "rl" and meta["recipe"] == "starter" and meta["tools"] == ["calculator"]
    held = meta["held_out"]
    assert held["prompts"] == 200 and held["rl_accuracy"] > held["sft_accuracy"]
    assert {"pretrain", "sft", "reward", "rl"} <= set(meta["stages"])


def test_starter_answers_12_times_7_with_the_calculator():
    """Through the chat template and the chat's own tool loop, greedy."""
    from sol.core.chat.session import ChatSession
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.engine import GenerationParams
    from sol.core.generation.sampling import SamplingParams
    from sol.core.plugins.manager import PluginManager
    chat = ChatSession(load_model(STARTER), plugins=PluginManager())
    events = list(chat.send("what is 12 times 7?", GenerationParams(max_tokens=64,
                                                                    sampling=SamplingParams(temperature=0))))
    calls = [e for e in events if e.get("type") == "tool_call"]
    assert calls and calls[0]["name"] == "calculator"
    answer = [m for m in chat.messages if m["role"] == "assistant"][-1]["content"]
    assert "84" in answer
