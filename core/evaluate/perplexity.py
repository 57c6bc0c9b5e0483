"""Perplexity of a text: exp of the mean negative log-likelihood per token, in strided windows.

A text longer than the window is read in windows of `window` tokens starting every `stride` tokens (the
Hugging Face "perplexity of fixed-length models" recipe): each window scores only the tokens no earlier
window scored, so every token after the first is scored exactly once, with as much left context as the
window allows (window - stride tokens at least, once past the first window). The text is encoded as the
tokenizer does by default, BOS included when it adds one (then the text's first token is scored too).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..errors import SolError


def encode(lm, text: str, where: str) -> list[int]:
    ids = lm.tokenizer.encode_ids(text)
    if len(ids) < 2:
        raise SolError(f"{where}: {len(ids)} token{'' if len(ids) == 1 else 's'}; perplexity needs a text of at "
                       "least two tokens")
    return ids


def check_window(lm, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride): the model's context and half of it unless given; checked against the model."""
    context = lm.config.context
    window = context if window is None else window
    if not 2 <= window <= context:
        raise SolError(f"--window {window}: must be from 2 to the model's context of {context} tokens")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride < window:
        # A window's first token has nothing before it in that window: a stride of the whole window would
        # leave one token per window unscored.
        raise SolError(f"--stride {stride}: must be from 1 to the window less one ({window - 1}), so every "
                       "token is scored with some context")
    return window, stride


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored): each window's ids [begin, end) and how many of its last tokens it scores."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def items(lm, ids: list[int], window: int, stride: int, cancel=None) -> Iterator[dict]:
    """Per window: {"i", "begin", "end", "tokens": scored, "nll": their summed negative log-likelihood}."""
    model = lm.model
    for i, (begin, end, scored) in enumerate(windows(len(ids), window, stride)):
        if cancel is not None and cancel.is_set():
            return
        x = torch.tensor([ids[begin:end]], device=model.device)
        logprobs = torch.log_softmax(model(x)[0, -scored - 1:-1].float(), dim=-1)
        targets = x[0, -scored:, None]
        yield {"i": i, "begin": begin, "end": end, "tokens": scored,
               "nll": -float(logprobs.gather(-1, targets).double().sum())}


def summary(results: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in results)
    nll = sum(r["nll"] for r in results) / tokens if tokens else None
    return {"tokens": tokens, "perplexity": math.exp(nll) if nll is not None else None, "nll": nll}
