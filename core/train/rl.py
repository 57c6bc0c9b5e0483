"""Reinforcement learning: the policy samples k answers per prompt, each is
scored, and answers better than their group's mean are made more likely
(GRPO's group-relative advantage; no value network):

    advantage_i = r_i - mean(r_group)          (optionally / std(r_group))
    loss per token = -advantage * log p(token) + beta * KL(policy || SFT)

KL uses the k3 estimator exp(ref - logp) - (ref - logp) - 1 (unbiased, never
negative), against the frozen SFT model, so the policy improves on the reward
without drifting into text the SFT model would never write. Tokens the engine
forced (tool results) are excluded: the policy did not choose them.

RL is noisy, so every evaluation that beats the best so far on the eval
prompts also writes that model to <out>/best (with its step and accuracy):
pick the checkpoint on a validation set, never on the final test prompts.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import jsonl
from ..data.corpus import describe_files
from ..errors import SolError
from ..generation.engine import end_of_turn_ids
from ..model import lora
from . import adapters, chat_format
from .common import chat_sample, epoch_indices, load_parent, pad, pad_id, parent_info, split_val
from .loop import Stage
from .rewards import REWARDS
from .rollout import rollout

DEFAULTS = {"lr": 1e-4, "max_steps": 100, "warmup": 5, "batch_size": 8, "eval_every": 25,
            "sample_every": 25, "checkpoint_every": 50}


def group_advantages(rewards: torch.Tensor, k: int, normalize_std: bool) -> torch.Tensor:
    """rewards (n_prompts * k,) in groups of k -> reward minus its group's mean (/ std)."""
    g = rewards.view(-1, k)
    adv = g - g.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (g.std(dim=1, keepdim=True) + 1e-6)
    return adv.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_logprobs(model, x: torch.Tensor) -> torch.Tensor:
    """log p(x[t+1] | x[:t+1]) for every position: (B, T-1)."""
    logits = model(x[:, :-1]).float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, x[:, 1:, None]).squeeze(-1)


class Scorer:
    """Reward for a finished rollout: a verifiable function, a reward model, or their sum."""

    def __init__(self, reward_name: str | None, reward_model: str | None, device, tok):
        self.fn = None
        if reward_name:
            if reward_name not in REWARDS:
                raise SolError(f"--reward {reward_name}: unknown; choose one of {', '.join(REWARDS)}")
            self.fn = REWARDS[reward_name]
        self.rm = None
        if reward_model:
            from .reward import load_reward_model
            self.rm, rm_lm = load_reward_model(reward_model, device)
            if rm_lm.tokenizer.hf.to_str() != tok.hf.to_str():
                raise SolError(f"--reward-model {reward_model}: its tokenizer differs from the policy's; "
                               "train the reward model from the same SFT model")
        if self.fn is None and self.rm is None:
            raise SolError("rl: give --reward NAME (a verifiable reward) and/or --reward-model DIR")
        self.tok = tok
        self.pad = pad_id(tok)

    def __call__(self, records: list[dict], outs) -> torch.Tensor:
        r = torch.zeros(len(outs))
        if self.fn is not None:
            r += torch.tensor([self.fn(self.tok.decode(o.ids), rec["answer"], o.tool_calls)
                               for rec, o in zip(records, outs)])
        if self.rm is not None:
            r += self.rm.score([o.prompt + o.ids for o in outs], self.pad).cpu()
        return r

    def verifiable(self, rec, out) -> float:
        fn = self.fn or REWARDS["answer"]
        return fn(self.tok.decode(out.ids), rec["answer"], out.tool_calls)


def prompt_ids(tok, record: dict) -> list[int]:
    """An RL prompt in the model's chat format, ending where the assistant's answer starts."""
    return chat_format.encode(tok, record["messages"], add_generation_prompt=True,
                              where=record.get("where", "a prompt"))[0]


def check_prompt_fits(record: dict, n_tokens: int, context: int) -> None:
    """A prompt that fills the context leaves no room for an answer: name its line before training."""
    if n_tokens >= context:
        raise SolError(f"{record.get('where', 'a prompt')}: the prompt is {n_tokens} tokens, the model's context "
                       f"is {context}; shorten the prompt (it needs room for an answer)")


def generate_grouped(model, tok, prompts: list[list[int]], k: int, max_new: int, temperature: float,
                     gen: torch.Generator, stops) -> list:
    """k rollouts per prompt; prompts of equal length share one batch. Returns them in prompt order."""
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    outs = [None] * (len(prompts) * k)
    for _, idx in sorted(by_len.items()):
        batch = [prompts[i] for i in idx for _ in range(k)]
        res = rollout(model, tok, batch, max_new, temperature, gen, stops)
        for j, i in enumerate(idx):
            outs[i * k:(i + 1) * k] = res[j * k:(j + 1) * k]
    return outs


def accuracy(model, tok, records: list[dict], scorer: "Scorer", max_new: int) -> dict:
    """Greedy answers (calculator running) to held-out prompts: mean reward and share answered right."""
    prompts = [prompt_ids(tok, r) for r in records]
    outs = generate_grouped(model, tok, prompts, 1, max_new, 0.0, torch.Generator().manual_seed(0),
                            end_of_turn_ids(tok))
    right = [scorer.verifiable(r, o) for r, o in zip(records, outs)]
    return {"reward_mean": float(scorer(records, outs).mean()), "accuracy": sum(right) / len(right),
            "tool_use": sum(o.tool_calls > 0 for o in outs) / len(outs)}


class RL(Stage):
    name, kind = "rl", "rl"

    def __init__(self, args):
        self.args = args
        self.step_extra = {}

    def prepare(self, cfg, device, dist):
        a = self.args
        need_answer = a.reward is not None
        records = jsonl.read_prompts(a.prompts, need_answer=need_answer, with_where=True)
        self.eval_records = (jsonl.read_prompts(a.eval_prompts, need_answer=need_answer, with_where=True)
                             if a.eval_prompts else None)
        self.parent = load_parent(a.model, device, quantize=adapters.quantize_of(a))
        self.tokenizer, self.model = self.parent.tokenizer, self.parent.model
        self.module = self.model
        self.lora = adapters.attach(self.parent, a)
        # The frozen reference the KL penalty holds the policy to: with LoRA, the same model with its adapter
        # off (no second copy of the weights); otherwise a second copy of the starting model.
        self.ref = None if self.lora else load_parent(a.model, device).model.to(device).eval().requires_grad_(False)
        self.scorer = Scorer(a.reward, a.reward_model, device, self.tokenizer)
        self.device, self.seed = device, cfg.seed
        self.stops = end_of_turn_ids(self.tokenizer)
        self.pad = pad_id(self.tokenizer)
        self.train_rec, val = split_val(records, 0.0 if self.eval_records else a.val_fraction)
        if self.eval_records is None:
            self.eval_records = val
        self.prompts = [prompt_ids(self.tokenizer, r) for r in self.train_rec]
        for r, ids in zip(self.train_rec, self.prompts):
            check_prompt_fits(r, len(ids), self.model.cfg.context)
        for r in self.eval_records:
            ids = prompt_ids(self.tokenizer, r)
            check_prompt_fits(r, len(ids), self.model.cfg.context)
        self.out, self.step, self.best = Path(cfg.out), 0, best_accuracy(Path(cfg.out))
        if a.samples < 2:
            raise SolError(f"--samples {a.samples}: needs at least 2 answers per prompt to compare them")

    def micro_batches(self, step, cfg, dist):
        a = self.args
        self.step = step + 1   # the step these batches train; evaluate() after it names this step
        per_micro = cfg.batch_size // cfg.grad_accum
        per_rank = per_micro // dist.world
        out, rewards_seen = [], []
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + dist.rank)
        self.model.eval()
        for m in range(cfg.grad_accum):
            start = (step * cfg.grad_accum + m) * per_micro + dist.rank * per_rank
            idx = epoch_indices(len(self.prompts), start, per_rank, self.seed)
            outs = generate_grouped(self.model, self.tokenizer, [self.prompts[i] for i in idx], a.samples,
                                    a.max_new_tokens, a.temperature, gen, self.stops)
            recs = [self.train_rec[i] for i in idx for _ in range(a.samples)]
            rewards = self.scorer(recs, outs)
            rewards_seen.append(rewards)
            out.append(self._batch(outs, group_advantages(rewards, a.samples, a.normalize_std)))
        self.model.train()
        self.step_extra = {"reward_mean": float(torch.cat(rewards_seen).mean())}
        return out

    def _batch(self, outs, adv: torch.Tensor) -> dict:
        rows = [o.prompt + o.ids for o in outs]
        x = pad(rows, self.pad).to(self.device)
        mask = torch.zeros(x.size(0), x.size(1) - 1, dtype=torch.bool)
        for i, o in enumerate(outs):
            p = len(o.prompt)
            # target position t predicts x[t+1]; the response's j-th token sits at p + j.
            keep = torch.tensor([not f for f in o.forced], dtype=torch.bool)
            mask[i, p - 1:p - 1 + len(o.ids)] = keep
        mask = mask.to(self.device)
        return {"x": x, "mask": mask, "adv": adv.to(self.device)[:, None],
                "count": int(mask.sum()), "tokens": int(sum(len(r) for r in rows))}

    def loss(self, module, batch):
        # The reference's log-probs here, in the loop's precision (bf16 autocast on GPUs and bf16 CPUs)
        # as the policy's: computed in another precision, their rounding alone would read as KL.
        with torch.no_grad():
            if self.ref is None:
                with lora.using(self.model, None):
                    ref = token_logprobs(self.model, batch["x"])
            else:
                ref = token_logprobs(self.ref, batch["x"])
        logp = token_logprobs(module, batch["x"])
        per_token = -batch["adv"] * logp + self.args.beta * k3_kl(logp, ref)
        return (per_token * batch["mask"]).sum()

    def evaluate(self):
        if not self.eval_records:
            return {}
        result = accuracy(self.model, self.tokenizer, self.eval_records, self.scorer, self.args.max_new_tokens)
        if result["accuracy"] > self.best:
            from ..formats.checkpoint import save_model
            self.best = result["accuracy"]
            best = {"name": "best", "stage": "rl", "step": self.step, "metrics": result,
                    "note": "the RL step with the best eval accuracy so far"}
            if self.lora:
                self.lora.save(self.out / "best", best)
            else:
                save_model(self.out / "best", self.model, self.tokenizer, best)
            result["best_step"] = self.step
        return result

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

    def lineage(self):
        files = [self.args.prompts] + ([self.args.eval_prompts] if self.args.eval_prompts else [])
        from .chat_format import tools_field
        return {"parent": parent_info(self.parent), "data": describe_files(files),
                "reward": {"function": self.args.reward, "model": self.args.reward_model, "beta": self.args.beta,
                           "samples": self.args.samples},
                **tools_field(self.parent.meta.get("tools") or [])}   # the policy calls what its SFT data taught

    def config_summary(self):
        a = self.args
        return {"samples": a.samples, "beta": a.beta, "reward": a.reward, "reward_model": a.reward_model,
                "normalize_std": a.normalize_std, "temperature": a.temperature,
                **(self.lora.summary() if self.lora else {})}


def best_accuracy(out: Path) -> float:
    """The eval accuracy of <out>/best, so a resumed run only replaces it with something better."""
    import json
    try:
        return float(json.loads((out / "best" / "sol.json").read_text())["metrics"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1.0


def add_arguments(p):
    p.add_argument("--model", required=True, help="the SFT model: the starting policy and the frozen reference")
    p.add_argument("--prompts", required=True, help='RL prompts JSONL: {"prompt", "answer"} per line')
    p.add_argument("--reward", default=None, help=f"verifiable reward: {', '.join(REWARDS)}")
    p.add_argument("--reward-model", default=None, help="a reward model directory (sol train reward)")
    p.add_argument("--eval-prompts", default=None, help="held-out prompts for eval (default: part of --prompts)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=8, help="answers sampled per prompt (k)")
    p.add_argument("--beta", type=float, default=0.02, help="weight of the KL penalty to the SFT model")
    p.add_argument("--normalize-std", action="store_true", help="divide advantages by the group's std")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    adapters.add_arguments(p)
