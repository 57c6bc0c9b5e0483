"""Reward model: the SFT model plus one linear layer that reads the final hidden
state of a conversation and gives a score (the book's §3.1 reward stage).

Trained on preference pairs with the Bradley-Terry loss
    loss = -log sigmoid(r_chosen - r_rejected)
so the chosen answer scores higher. The head is saved beside the weights as
`reward_head.weight` / `reward_head.bias`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import jsonl
from ..data.corpus import describe_files
from ..model.transformer import Transformer
from . import adapters, chat_format
from .common import example_micro_batches, load_parent, pad, pad_id, parent_info, split_val
from .loop import Stage

DEFAULTS = {"lr": 3e-4, "max_steps": 200, "warmup": 10, "batch_size": 16, "eval_every": 50,
            "sample_every": 0, "checkpoint_every": 100}


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


class RewardModel(nn.Module):
    def __init__(self, model: Transformer, head: dict | None = None):
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.cfg.d_model, 1)
        nn.init.zeros_(self.head.weight)   # every answer starts equal; the pairs teach the difference
        nn.init.zeros_(self.head.bias)
        if head:
            self.head.weight.data.copy_(head["reward_head.weight"])
            self.head.bias.data.copy_(head["reward_head.bias"])

    def forward(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Scores (B,) read at each row's last real token."""
        h = self.model.hidden(idx)
        h = h[torch.arange(idx.size(0), device=idx.device), last]
        if self.head.weight.dtype != torch.float32:
            return self.head(h).squeeze(-1)
        # The score in float32 even under bf16 autocast: bf16's 8 bits would tie close answers, and the
        # pairs' loss and accuracy live on those small differences. One d_model x 1 product: free.
        with _no_autocast(h.device):
            return self.head(h.float()).squeeze(-1)

    def head_tensors(self) -> dict:
        return {"reward_head.weight": self.head.weight, "reward_head.bias": self.head.bias}

    @torch.no_grad()
    def score(self, rows: list[list[int]], pad_value: int) -> torch.Tensor:
        rows = [r[-self.model.cfg.context:] for r in rows]
        x = pad(rows, pad_value).to(self.model.device)
        last = torch.tensor([len(r) - 1 for r in rows], device=x.device)
        return self(x, last).float()


def scored_ids(tok, messages: list[dict], where: str) -> list[int]:
    """A conversation's ids in the model's chat format, ending with the last answer's end-of-turn token,
    where an RL rollout ends (and the score is read): without what a template writes after it ("\n")."""
    ids, mask = chat_format.encode(tok, messages, where=where)
    last = max((i for i, m in enumerate(mask) if m), default=len(ids) - 1)
    return ids[:last + 1]


def pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Summed -log sigmoid(r_c - r_r); logsigmoid is the stable form of log(1 / (1 + e^-x))."""
    return -F.logsigmoid(r_chosen - r_rejected).sum()


def load_reward_model(name: str, device) -> tuple[RewardModel, object]:
    from ..errors import SolError
    from ..formats.adapter import load_with_adapter
    lm = load_with_adapter(name, lambda base: load_parent(base, device, flag="--reward-model"))
    if "reward_head.weight" not in lm.extra_tensors:
        raise SolError(f"--reward-model {name}: has no reward head (reward_head.weight); "
                       "train one with `sol train reward`")
    rm = RewardModel(lm.model, lm.extra_tensors).to(device).eval()
    return rm, lm


class Reward(Stage):
    name, kind = "reward", "rm"

    def __init__(self, args):
        self.args = args

    def prepare(self, cfg, device, dist):
        a = self.args
        pairs = jsonl.read_prefs(a.data, with_where=True)
        self.parent = load_parent(a.model, device, quantize=adapters.quantize_of(a))
        self.tokenizer = self.parent.tokenizer
        self.lora = adapters.attach(self.parent, a)   # before the head, which stays trainable
        self.module = self.rm = RewardModel(self.parent.model, self.parent.extra_tensors or None)
        self.model = self.parent.model
        self.device, self.seed = device, cfg.seed
        ctx = self.model.cfg.context
        enc = [(scored_ids(self.tokenizer, p["prompt"] + p["chosen"], p["where"])[:ctx],
                scored_ids(self.tokenizer, p["prompt"] + p["rejected"], p["where"])[:ctx]) for p in pairs]
        self.train_pairs, self.val_pairs = split_val(enc, a.val_fraction)
        self.pad = pad_id(self.tokenizer)

    def _batch(self, pairs):
        rows = [p[0] for p in pairs] + [p[1] for p in pairs]
        return {"x": pad(rows, self.pad).to(self.device),
                "last": torch.tensor([len(r) - 1 for r in rows], device=self.device),
                "count": len(pairs), "tokens": sum(len(r) for r in rows)}

    def micro_batches(self, step, cfg, dist):
        return example_micro_batches(self.train_pairs, self._batch, step, cfg, dist, self.seed)

    def loss(self, module, batch):
        r = module(batch["x"], batch["last"]).float()
        n = batch["count"]
        return pair_loss(r[:n], r[n:])

    def evaluate(self):
        if not self.val_pairs:
            return {}
        loss, correct = 0.0, 0
        for i in range(0, len(self.val_pairs), 32):
            b = self._batch(self.val_pairs[i:i + 32])
            r = self.rm(b["x"], b["last"]).float()
            n = b["count"]
            loss += float(pair_loss(r[:n], r[n:]))
            correct += int((r[:n] > r[n:]).sum())
        return {"accuracy": correct / len(self.val_pairs), "val_loss": loss / len(self.val_pairs)}

    def export(self, out, meta):
        if self.lora:   # the head beside the adapter's A and B, under its own name
            return self.lora.save(out, meta, extra_tensors=self.rm.head_tensors())
        from ..formats.checkpoint import save_model
        save_model(out, self.model, self.tokenizer, meta, extra_tensors=self.rm.head_tensors())

    def restore(self, ckpt):
        if self.lora:
            head = self.lora.restore(ckpt)
        else:
            from ..formats.checkpoint import load_model
            lm = load_model(ckpt)
            self.model.load_state_dict(lm.model.state_dict())
            head = lm.extra_tensors
        self.rm.head.weight.data.copy_(head["reward_head.weight"])
        self.rm.head.bias.data.copy_(head["reward_head.bias"])

    def config_summary(self):
        return self.lora.summary() if self.lora else {}

    def lineage(self):
        return {"parent": parent_info(self.parent), "data": describe_files([self.args.data]),
                "pairs": {"train": len(self.train_pairs), "val": len(self.val_pairs)}}


def add_arguments(p):
    p.add_argument("--model", required=True, help="the SFT model to put a reward head on")
    p.add_argument("--data", required=True, help='preference JSONL: {"prompt", "chosen", "rejected"} per line')
    p.add_argument("--val-fraction", type=float, default=0.1, help="pairs held out for accuracy")
    adapters.add_arguments(p)
