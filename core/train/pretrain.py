"""Pretraining: next-token prediction on raw text (the book's §3.1, Fig. 75).

Data: text files -> a tokenizer (new char-level or BPE, or an existing one) ->
token memmaps. A batch is B windows of T+1 tokens cut at random offsets of
the training stream; inputs are the first T, targets the last T.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..data import corpus
from ..errors import SolError
from ..formats.tokenizer import EOT, Tokenizer
from ..model.config import VOCAB_MULTIPLE, ModelConfig, padded_vocab, preset
from ..model.transformer import Transformer
from . import adapters, checkpointing, ddp
from .loop import Stage, TrainConfig
from .common import load_base, parent_info
from .losses import lm_loss_sum
from .rollout import complete

DEFAULT_PRESET = "shakespeare-cpu"   # trains on a laptop CPU in minutes


def model_config(args, vocab_size: int) -> ModelConfig:
    """The new model's shape; `vocab_size` (the tokenizer's ids) padded to --vocab-multiple rows."""
    multiple = getattr(args, "vocab_multiple", None)
    vocab_size = padded_vocab(vocab_size, 1 if multiple is None else multiple)
    over = {"vocab_size": vocab_size, "dropout": getattr(args, "dropout", 0.0) or 0.0}
    if getattr(args, "bias", None) is not None:
        over["bias"] = args.bias
    for flag, key in (("layers", "n_layer"), ("d_model", "d_model"), ("heads", "n_head"), ("context", "context")):
        if getattr(args, flag, None) is not None:
            over[key] = getattr(args, flag)
    given = [f for f in ("layers", "d_model", "heads") if getattr(args, f, None) is not None]
    if args.preset or not given:
        return preset(args.preset or DEFAULT_PRESET, **over)
    missing = [f"--{f.replace('_', '-')}" for f in ("layers", "d_model", "heads") if getattr(args, f, None) is None]
    if missing:
        raise SolError(f"give --preset NAME, or all of --layers, --d-model, --heads (missing {', '.join(missing)})")
    return ModelConfig(**over)


def rows(data: np.ndarray, offsets: np.ndarray, T: int) -> torch.Tensor:
    """The (B, T+1) windows of the token stream starting at `offsets`: one gather from the memmap
    (offsets down, positions across), not a Python loop over rows."""
    idx = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(T + 1, dtype=np.int64)
    return torch.from_numpy(data[idx].astype(np.int64))


class Pretrain(Stage):
    name, kind = "pretrain", "base"
    prefetch = static_shapes = True   # batches are cut from the memmap by step alone, always B x T

    def __init__(self, args):
        self.args = args

    def prepare(self, cfg: TrainConfig, device, dist) -> None:
        a = self.args
        out = Path(cfg.out)
        self.device = device
        self.files = corpus.corpus_files(a.corpus)
        described = corpus.describe_files(self.files)   # hashed once: the caches' keys and sol.json
        ckpt = checkpointing.latest(out) if cfg.resume else None
        self.parent = self.lora = None
        if a.model:   # continued pretraining: the model's own shape and tokenizer
            check_continued(a)
            self.parent = load_base(a.model, quantize=adapters.quantize_of(a))
            self.tokenizer, self.cfg = self.parent.tokenizer, self.parent.model.cfg
        elif ckpt is not None:   # the tokenizer the run started with, whatever --tokenizer says now
            self.tokenizer = Tokenizer.from_file(ckpt / "tokenizer.json")
        else:
            total = sum(f["bytes"] for f in described)
            if a.tokenizer == "char" or a.tokenizer.startswith("bpe:"):
                self._report("training the tokenizer", 0, total)
            self.tokenizer = corpus.make_tokenizer(a.tokenizer, self.files, corpus.tokenizer_cache_dir(), described)
        if not a.model:
            self.cfg = model_config(a, self.tokenizer.id_limit)
        if ckpt is not None and not a.model:
            self.cfg = ModelConfig.from_dict(checkpointing_config(ckpt), source=str(ckpt / "config.json"))
        # The training window: a new model's context; a loaded one's, or --context if shorter (a 32k-token
        # window would not fit a laptop's memory).
        self.T = min(a.context, self.cfg.context) if a.model and a.context else self.cfg.context
        data_dir = out / "data"
        if dist.main:
            corpus.build(self.files, self.tokenizer, data_dir, self.T, a.val_fraction,
                         cache=corpus.cache_dir(), described=described,
                         progress=lambda done, total: self._report("tokenizing the corpus", done, total))
        ddp.barrier(dist)
        self.train_data, self.val_data, self.data_meta = corpus.load(data_dir)
        torch.manual_seed(cfg.seed)   # same initial weights on every rank
        if self.parent is not None:
            self.model = self.parent.model
            self.lora = adapters.attach(self.parent, a)
        else:
            self.model = Transformer(self.cfg)
            self.model.vocab_limit = self.tokenizer.id_limit
        self.module = self.model
        self.seed = cfg.seed
        eot = self.tokenizer.token_to_id(EOT)
        self.sample_ids = (self.tokenizer.encode_ids(a.sample_prompt) if a.sample_prompt
                           else [eot if eot is not None else 0])

    def _report(self, what: str, done: int, total: int) -> None:
        """A `progress` event (bytes of the corpus done), at most every half second and always the last one,
        so a long tokenization shows it is moving."""
        emit = getattr(self, "emit", None)   # set by the stage runner (core/train/stages.py)
        now = time.monotonic()
        if emit is None or (0 < done < total and now - getattr(self, "_reported", 0.0) < 0.5):
            return
        self._reported = now
        emit({"type": "progress", "what": what, "done": done, "total": total})

    def _offsets(self, data, n: int, key) -> np.ndarray:
        rng = np.random.default_rng(key)
        return rng.integers(0, len(data) - self.T - 1, size=n, endpoint=True)

    def micro_batches(self, step, cfg, dist):
        T, per_micro = self.T, cfg.batch_size // cfg.grad_accum
        out = []
        for m in range(cfg.grad_accum):
            offs = self._offsets(self.train_data, per_micro, [self.seed, step, m])[ddp.shard(per_micro, dist)]
            # On the CPU: the loop moves the (B, T+1) rows to the device, once, and loss() slices them.
            r = rows(self.train_data, offs, T)
            out.append({"rows": r, "count": r.size(0) * T, "tokens": r.size(0) * T})
        return out

    def loss(self, module, batch):
        r = batch["rows"]
        return lm_loss_sum(module, r[:, :-1], r[:, 1:])

    def evaluate(self) -> dict:
        a = self.args
        total, n = None, 0
        for i in range(a.eval_batches):
            offs = self._offsets(self.val_data, a.eval_batch_size, [self.seed, 10**9, i])
            r = rows(self.val_data, offs, self.T).to(self.device)
            loss = self.loss(self.model, {"rows": r})
            total = loss if total is None else total + loss
            n += r.size(0) * self.T
        return {"val_loss": float(total) / n}   # one read of the device, after every batch

    def sample(self) -> str:
        ids = complete(self.model, self.sample_ids, self.args.sample_tokens, temperature=0.8, seed=self.seed,
                       stop_ids=())
        return self.tokenizer.decode(self.sample_ids + ids)

    def export(self, out, meta) -> None:
        if self.lora:
            return self.lora.save(out, meta)
        from ..formats.checkpoint import save_model
        save_model(out, self.model, self.tokenizer, meta)

    def restore(self, ckpt) -> None:
        if self.lora:
            return self.lora.restore(ckpt)
        from ..formats.checkpoint import load_model
        self.model.load_state_dict(load_model(ckpt).model.state_dict())

    def lineage(self) -> dict:
        return {"parent": parent_info(self.parent) if self.parent else None, "data": self.data_meta["files"],
                "tokenizer": None if self.parent else self.args.tokenizer,
                "tokens": {"train": self.data_meta["train_tokens"], "val": self.data_meta["val_tokens"]}}

    def config_summary(self) -> dict:
        return {"model": self.cfg.to_dict(), "window": self.T, **(self.lora.summary() if self.lora else {})}


def check_continued(a) -> None:
    """--model gives the shape and the tokenizer: flags that would give them too are errors, not ignored."""
    given = [flag for flag, value in (("--preset", a.preset), ("--layers", a.layers), ("--d-model", a.d_model),
                                      ("--heads", a.heads), ("--bias", a.bias)) if value is not None]
    if a.tokenizer != "char":
        given.append("--tokenizer")
    if given:
        raise SolError(f"{', '.join(given)}: not with --model {a.model}, whose shape and tokenizer are its own; "
                       "leave them out (--context may shorten the training window)")


def checkpointing_config(ckpt: Path) -> dict:
    from ..formats.loaded import read_json_object
    try:
        return read_json_object(ckpt / "config.json")
    except SolError as e:   # a checkpoint cut short: say which, and how to go on
        raise SolError(f"{e}; delete the checkpoint folder {ckpt} to resume from the one before") from None


def add_arguments(p) -> None:
    p.add_argument("--corpus", action="append", required=True, help="text file or folder (repeatable)")
    p.add_argument("--model", default=None, help="continue pretraining this model (its shape and tokenizer) "
                   "instead of a new one; with --lora, train an adapter on it")
    p.add_argument("--tokenizer", default="char", help="char | bpe:N | path of a tokenizer.json (default char)")
    p.add_argument("--preset", default=None, help="model preset (tiny, shakespeare-cpu, small, starter, gpt2, ...)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="context window in tokens")
    p.add_argument("--vocab-multiple", type=int, default=VOCAB_MULTIPLE, metavar="N",
                   help=f"pad the embedding and LM head to a multiple of N rows, for faster matrix kernels; "
                        f"padded ids are never produced (default {VOCAB_MULTIPLE}; 1: no padding)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases in linear layers and norms (--no-bias as nanoGPT; default: the preset's)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of the tokens kept for validation")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--sample-prompt", default="", help="prompt for samples (default: start a new document)")
    p.add_argument("--sample-tokens", type=int, default=200)
    adapters.add_arguments(p)
