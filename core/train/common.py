"""Small pieces the chat stages (sft, reward, rl) share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SolError
from ..formats.tokenizer import Tokenizer

SAMPLE_QUESTION = "what is 12 times 7?"


def load_base(name: str, flag: str = "--model", quantize: str | None = None):
    """The model a stage starts from (a directory, a GGUF file or a name from `sol models list`), on the CPU
    in float32; quantize "int8": its linear layers in Sol's int8 rows (a frozen base under a LoRA adapter)."""
    from ..formats.checkpoint import load_model
    from ..formats.registry import resolve
    # float32 whatever the file holds (a GGUF file's blocks dequantized): what full fine-tuning trains, and
    # the product LoRA's gradients are exact through.
    return load_model(resolve(name), device="cpu", dtype=torch.float32, quantize=quantize)


def load_parent(name: str, device, flag: str = "--model", quantize: str | None = None):
    """The model a chat stage starts from: load_base, and it must have a chat format (Sol's, or a template)."""
    lm = load_base(name, flag, quantize)
    tok = lm.tokenizer
    # A model trains in its own chat format (core/train/chat_format.py); nothing is added to its vocabulary.
    if not tok.is_sol and not tok.templates:
        raise SolError(f"{flag} {name}: has no chat template (no chat_template.jinja, chat_template.json or "
                       "chat_template in tokenizer_config.json), so Sol cannot tell how it writes a conversation; "
                       "copy the template from the original model's files, or start from a model Sol pretrained")
    return lm


def parent_info(lm) -> dict:
    from ..data.corpus import sha256
    weights = Path(lm.path) / "model.safetensors"
    return {"path": str(Path(lm.path).resolve()), "name": lm.name, "stage": lm.meta.get("stage"),
            "sha256": sha256(weights) if weights.is_file() else None}


def epoch_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Items start..start+count of an endless stream of shuffled epochs over n items (a pure function,
    so a resumed run reads exactly what the interrupted one would have)."""
    out, perms = [], {}
    for pos in range(start, start + count):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][pos % n]))
    return out


def example_micro_batches(examples: list, make_batch, step: int, cfg, dist, seed: int) -> list[dict]:
    """This rank's share of each micro-batch of `step`, drawn from shuffled epochs over a list of
    examples (SFT conversations, preference pairs) and turned into tensors by `make_batch`."""
    per_micro = cfg.batch_size // cfg.grad_accum
    per_rank = per_micro // dist.world
    out = []
    for m in range(cfg.grad_accum):
        start = (step * cfg.grad_accum + m) * per_micro + dist.rank * per_rank
        idx = epoch_indices(len(examples), start, per_rank, seed)
        out.append(make_batch([examples[i] for i in idx]))
    return out


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def pad_id(tok: Tokenizer) -> int:
    i = tok.token_to_id("<|pad|>")
    return i if i is not None else (tok.eos_id or 0)


def split_val(items: list, fraction: float, minimum: int = 1) -> tuple[list, list]:
    """Last `fraction` of the items held out for evaluation (none when there are too few)."""
    n_val = int(len(items) * fraction)
    if fraction > 0 and len(items) >= 10:
        n_val = max(n_val, minimum)
    return (items[:len(items) - n_val], items[len(items) - n_val:]) if n_val else (items, [])


def chat_sample(model, tok: Tokenizer, question: str = SAMPLE_QUESTION, max_new: int = 64) -> str:
    """The model's greedy answer to a fixed question, with the calculator running, as the chat shows it."""
    from ..generation.engine import end_of_turn_ids
    from .chat_format import encode
    from .rollout import rollout
    ids, _ = encode(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
    r = rollout(model, tok, [ids], max_new, 0.0, torch.Generator().manual_seed(0), end_of_turn_ids(tok))[0]
    return f"{question} -> {tok.decode(r.ids)}"
