"""Score a sentence: the chain rule of the book's §2.9.

A sentence's probability is the product of each token's probability given the tokens before it,
P(w1..wn) = P(w1) P(w2 | w1) ... P(wn | w1..wn-1). One forward pass gives every factor at once: the
logits at position t are the model's distribution for token t + 1. The first token has nothing before
it, so it is scored given the model's start token (BOS, or end-of-text, which Sol's models see
between documents); a model with neither leaves the first token unscored and says so.
"""
from __future__ import annotations

import math

import torch

from ..errors import SolError


def token_text(tok, i: int) -> str:
    return tok.decode([i])


def start_token(tok, config) -> int | None:
    """The token a text is scored after when the tokenizer adds none: BOS, then end-of-text."""
    for i in (tok.bos_id, config.extra.get("bos_token_id"), tok.eos_id):
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size:
            return i
    return None


def prepare(tok, config, text: str) -> tuple[list[int], int]:
    """(ids to run, how many leading ids are context only). The context is the tokenizer's own BOS when it
    adds one, else start_token() prepended, else nothing (the first token then has no probability)."""
    plain = tok.encode_ids(text, add_special_tokens=False)
    added = tok.encode_ids(text, add_special_tokens=True)
    if not plain:
        raise SolError("--text: empty; give a sentence to score")
    if len(added) > len(plain) and added[-len(plain):] == plain:
        return added, len(added) - len(plain)      # the tokenizer's own BOS (Llama-style)
    first = start_token(tok, config)
    return ([first] + plain, 1) if first is not None else (plain, 0)


@torch.no_grad()
def score(loaded, text: str, top: int = 5) -> dict:
    """The `sol score --json` object: per token its log-probability, rank and top alternatives."""
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.config
    ids, n_ctx = prepare(tok, cfg, text)
    if len(ids) > cfg.context:
        raise SolError(f"--text: {len(ids)} tokens, longer than this model's context of {cfg.context}; shorten it")
    x = torch.tensor([ids], device=model.device)
    logprobs = torch.log_softmax(model(x)[0].float(), dim=-1)     # row t: distribution of token t + 1
    tokens, total = [], 0.0
    first = max(n_ctx, 1)
    if n_ctx == 0:   # nothing to condition the first token on
        tokens.append({"id": ids[0], "text": token_text(tok, ids[0]), "logprob": None, "prob": None,
                       "rank": None, "top": [], "cum_logprob": None})
    for t in range(first, len(ids)):
        row = logprobs[t - 1]
        lp = float(row[ids[t]])
        rank = int((row > row[ids[t]]).sum()) + 1
        values, best = row.topk(min(top, row.shape[0]))
        total += lp
        tokens.append({"id": ids[t], "text": token_text(tok, ids[t]), "logprob": lp, "prob": math.exp(lp),
                       "rank": rank, "cum_logprob": total,
                       "top": [{"id": int(i), "text": token_text(tok, int(i)), "logprob": float(v)}
                               for v, i in zip(values, best)]})
    n = len(ids) - first
    return {"tokens": tokens, "total_logprob": total, "perplexity": math.exp(-total / n) if n else None,
            "n_scored": n, "conditioned_on": tok.decode(ids[:n_ctx]) if n_ctx else None,
            "conditioned_on_ids": ids[:n_ctx]}
