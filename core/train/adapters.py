"""LoRA for the stages that start from a model (sft, reward, rl, pretrain --model): the flags, putting a
fresh adapter on the loaded model, and writing or resuming it.

With --lora the base is frozen, in float32 or (--quantize int8) in Sol's int8 rows; only the adapter's A and
B (and a reward model's head) get gradients and AdamW state. What the run writes into --out, and into each
checkpoint, is a PEFT adapter folder (core/formats/adapter.py) instead of a whole model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SolError
from ..model import lora


def add_arguments(p) -> None:
    g = p.add_argument_group("LoRA (train an adapter; the model stays frozen)")
    g.add_argument("--lora", action="store_true",
                   help="train a LoRA adapter instead of every weight; --out becomes a PEFT adapter folder")
    g.add_argument("--lora-r", type=int, default=16, help="the adapter's rank (default 16)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="scaling numerator: updates are alpha/r x B A "
                   "(default 32)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter's input (default 0.05)")
    g.add_argument("--lora-targets", default="attention,mlp",
                   help="projections to adapt: PEFT names (q_proj, ...), short ones (q,k,v,o,gate,up,down), or "
                        "attention, mlp, all (default attention,mlp: every projection of both)")
    g.add_argument("--quantize", choices=["int8"], default=None,
                   help="with --lora: hold the frozen model in int8 (a quarter of float32's memory)")
    g.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="with --lora: keep only each block's input and make its activations again in the backward "
                        "pass (activation checkpointing: far less memory, about a third more time); default: on "
                        "with --quantize int8, off otherwise")


def settings(args) -> lora.LoraSettings | None:
    if not getattr(args, "lora", False):
        if getattr(args, "quantize", None):
            raise SolError("--quantize int8: only with --lora (full fine-tuning trains the weights themselves)")
        return None
    targets = [t for t in str(args.lora_targets).split(",") if t.strip()]
    return lora.LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)


def quantize_of(args) -> str | None:
    return getattr(args, "quantize", None) if getattr(args, "lora", False) else None


class LoraRun:
    """The adapter a stage trains on its model, and how it is written and resumed."""

    def __init__(self, model, settings: lora.LoraSettings, base_name: str):
        self.model, self.settings, self.base_name = model, settings, base_name
        self.params = lora.add_adapter(model, settings)

    def save(self, out: Path, meta: dict, extra_tensors: dict | None = None) -> None:
        from ..formats.adapter import save_adapter
        save_adapter(out, self.model, self.settings, self.base_name, meta, extra_tensors)

    def restore(self, ckpt: Path) -> dict:
        from ..formats.adapter import restore_weights
        return restore_weights(self.model, ckpt)

    def summary(self) -> dict:
        trained = sum(p.numel() for p in self.params)
        return {"lora": {"r": self.settings.r, "alpha": self.settings.alpha, "dropout": self.settings.dropout,
                         "targets": self.settings.targets, "trained_parameters": trained}}


def attach(lm, args) -> LoraRun | None:
    """A fresh adapter on the loaded model when --lora was given, else None (full fine-tuning)."""
    s = settings(args)
    if s is None:
        if getattr(args, "recompute", None):
            raise SolError("--recompute: only with --lora")
        return None
    recompute = getattr(args, "recompute", None)
    lm.model.recompute_blocks = (quantize_of(args) == "int8") if recompute is None else recompute
    return LoraRun(lm.model, s, base_name(lm))


def base_name(lm) -> str:
    """What adapter_config.json's base_model_name_or_path says: the hub id a model came from where Sol knows
    it, else the model's folder (or file)."""
    for key in ("hub_id", "source"):
        if lm.meta.get(key):
            return str(lm.meta[key])
    return str(Path(lm.path).resolve())
