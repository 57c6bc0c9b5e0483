"""Supervised fine-tuning: learn to answer, from chat JSONL.

Same next-token loss as pretraining, counted only where the assistant speaks
(core/train/chat_format.py builds the mask, in the model's own chat format): the model learns to write
answers and tool calls, not to imitate users or invent tool results.
"""
from __future__ import annotations

from ..data import jsonl
from ..data.corpus import describe_files
from ..errors import SolError
from . import adapters, chat_format
from .common import (chat_sample, example_micro_batches, load_parent, pad, pad_id,
                     parent_info, split_val)
from .loop import Stage
from .losses import IGNORE, lm_loss_sum

DEFAULTS = {"lr": 5e-4, "max_steps": 500, "warmup": 20, "batch_size": 16, "eval_every": 100,
            "sample_every": 100, "checkpoint_every": 200}


def encode_examples(tok, convs: list[list[dict]], context: int, source: str,
                    wheres: list[str] | None = None,
                    tools: list[list | None] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input ids, target ids with IGNORE where no loss) per conversation, in the model's own chat format
    (core/train/chat_format.py), cut to the context window. `wheres`: "file:line" of each conversation,
    for errors; `tools`: each conversation's tool list, as the chat shows it to the template."""
    out = []
    for n, msgs in enumerate(convs):
        where = wheres[n] if wheres else f"{source}: conversation {n + 1}"
        ids, mask = chat_format.encode(tok, msgs, tools=tools[n] if tools else None, where=where)
        ids, mask = ids[:context + 1], mask[:context + 1]
        targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        if all(t == IGNORE for t in targets):
            raise SolError(f"{where}: no assistant tokens within the context window "
                           f"of {context}; shorten it or use a model with a longer context")
        out.append((ids[:-1], targets))
    return out


class SFT(Stage):
    name, kind = "sft", "sft"

    def __init__(self, args):
        self.args = args

    def prepare(self, cfg, device, dist):
        a = self.args
        lines = jsonl.read_chat_lines(a.data, with_tools=True)   # errors name file:line, before anything heavy
        convs = [msgs for _, msgs, _ in lines]
        self.parent = load_parent(a.model, device, quantize=adapters.quantize_of(a))
        self.tokenizer, self.model = self.parent.tokenizer, self.parent.model
        self.lora = adapters.attach(self.parent, a)
        self.module = self.model
        self.device, self.seed = device, cfg.seed
        examples = encode_examples(self.tokenizer, convs, self.model.cfg.context, a.data,
                                   [where for where, _, _ in lines], [tools for _, _, tools in lines])
        self.train_ex, self.val_ex = split_val(examples, a.val_fraction)
        self.pad = pad_id(self.tokenizer)

    def _batch(self, examples):
        x = pad([e[0] for e in examples], self.pad)
        y = pad([e[1] for e in examples], IGNORE)
        n = int((y != IGNORE).sum())   # counted on the CPU: no wait for the device
        return {"x": x.to(self.device), "y": y.to(self.device), "count": n,
                "tokens": int(sum(len(e[0]) for e in examples))}

    def micro_batches(self, step, cfg, dist):
        return example_micro_batches(self.train_ex, self._batch, step, cfg, dist, self.seed)

    def loss(self, module, batch):
        return lm_loss_sum(module, batch["x"], batch["y"], IGNORE)

    def evaluate(self):
        if not self.val_ex:
            return {}
        total, n = 0.0, 0
        for i in range(0, len(self.val_ex), 32):
            b = self._batch(self.val_ex[i:i + 32])
            total += float(self.loss(self.model, b))
            n += b["count"]
        return {"val_loss": total / n}

    def sample(self):
        return chat_sample(self.model, self.tokenizer)

    def export(self, out, meta):
        if self.lora:
            return self.lora.save(out, meta)
        from ..formats.checkpoint import save_model
        save_model(out, self.model, self.tokenizer, meta)

    def restore(self, ckpt):
        if self.lora:
            return self.lora.restore(ckpt)
        from ..formats.checkpoint import load_model
        self.model.load_state_dict(load_model(ckpt).model.state_dict())

    def config_summary(self):
        return self.lora.summary() if self.lora else {}

    def lineage(self):
        from .chat_format import called_in, tools_field
        return {"parent": parent_info(self.parent), "data": describe_files([self.args.data]),
                "examples": {"train": len(self.train_ex), "val": len(self.val_ex)},
                **tools_field(called_in(self.args.data))}


def add_arguments(p):
    p.add_argument("--model", required=True, help="the pretrained model to start from")
    p.add_argument("--data", required=True, help='chat JSONL: {"messages": [{"role", "content"}, ...]} per line, '
                   'optionally with "tools": [...] (the OpenAI tool list the chat template shows)')
    p.add_argument("--val-fraction", type=float, default=0.05, help="conversations held out for val_loss")
    adapters.add_arguments(p)


