"""The built-in training stages as StageSpecs, the way plugins add theirs (hook `sol_training_stages`)."""
from __future__ import annotations

from ..plugins.hooks import StageSpec


def _runner(module_name: str, cls_name: str):
    def run(args, emit):
        import importlib

        from .loop import train
        from .options import train_config
        mod = importlib.import_module(f"{__package__}.{module_name}")
        stage = getattr(mod, cls_name)(args)
        stage.emit = emit   # for what prepare() reports before the run starts (pretrain: tokenizing its corpus)
        return train(stage, train_config(args), emit)
    return run


def _adder(module_name: str):
    def add(p):
        import importlib

        from .options import add_common
        mod = importlib.import_module(f"{__package__}.{module_name}")
        add_common(p, getattr(mod, "DEFAULTS", None))
        mod.add_arguments(p)
    return add


def builtin_stages() -> list[StageSpec]:
    return [
        StageSpec("pretrain", "pretraining: next-token prediction on raw text",
                  _adder("pretrain"), _runner("pretrain", "Pretrain")),
        StageSpec("sft", "supervised fine-tuning on chat JSONL, loss on assistant tokens only",
                  _adder("sft"), _runner("sft", "SFT")),
        StageSpec("reward", "reward model: a scalar head trained on preference pairs",
                  _adder("reward"), _runner("reward", "Reward")),
        StageSpec("rl", "reinforcement learning: k samples per prompt, group advantages, KL to the SFT model",
                  _adder("rl"), _runner("rl", "RL")),
    ]


def all_stages() -> list[StageSpec]:
    """Built-ins, then any a plugin adds (a plugin may not replace a built-in name)."""
    stages = builtin_stages()
    names = {s.name for s in stages}
    try:
        from ..plugins.manager import PluginManager
        extra = PluginManager().training_stages()
    except Exception:   # no plugin manager yet, or a broken plugin: the built-ins still work
        extra = []
    for s in extra or []:
        if s.name not in names and s.name != "recipe":
            stages.append(s)
            names.add(s.name)
    return stages
