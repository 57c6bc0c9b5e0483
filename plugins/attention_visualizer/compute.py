"""Attention of one layer at a time, as numpy arrays the panel can draw.

Memory grows as heads × T², so we never ask the model for every layer at
once unless the grid view needs them; each call runs the blocks only up to
the wanted layer (`need_logits=False`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LayerAttention:
    layer: int
    weights: np.ndarray      # (H, T, T) softmax weights; row i sums to 1 over keys 0..i
    q: np.ndarray            # (H, T, d_head)
    k: np.ndarray            # (H, T, d_head)
    v: np.ndarray            # (H, T, d_head)
    scores: np.ndarray       # (H, T, T) q·k
    scaled: np.ndarray       # (H, T, T) q·k × scale (soft-capped if the model does), hidden positions -inf
    output: np.ndarray       # (H, T, d_head) weights @ v
    scale: float = 0.0       # what q·k is multiplied by: 1/sqrt(d_head) for most models
    window: int | None = None    # a sliding-window layer: positions each token sees, itself included
    softcap: float | None = None

    def __post_init__(self):
        if not self.scale:
            self.scale = 1.0 / np.sqrt(self.d_head)

    @property
    def d_head(self) -> int:
        return self.q.shape[-1]

    def head(self, h: int | None) -> np.ndarray:
        """(T, T) weights of one head, or their mean over heads when h is None."""
        return self.weights.mean(0) if h is None else self.weights[h]


def encode(tokenizer, text: str, context: int) -> tuple[list[int], list[str]]:
    """Ids and one readable label per token, cut to the model's context window."""
    ids = tokenizer.encode_ids(text, add_special_tokens=False)[:context]
    labels = [tokenizer.decode([i]) for i in ids]
    return ids, labels


def layer_attention(model, ids: list[int], layer: int) -> LayerAttention:
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        _, caps = model.forward_with_attention(x, layers=[layer], need_logits=False)
    c = caps[layer]
    arr = lambda t: t[0].detach().float().cpu().numpy()  # noqa: E731
    return LayerAttention(layer, arr(c.weights), arr(c.q), arr(c.k), arr(c.v), arr(c.scores), arr(c.scaled),
                          arr(c.output), c.scale, c.window, c.softcap)


def all_layers(model, ids: list[int], max_side: int = 128) -> list[np.ndarray]:
    """(H, t, t) weights of every layer for the grid, average-pooled to at most max_side tokens."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = []
    for layer in range(model.cfg.n_layer):
        with torch.inference_mode():
            _, caps = model.forward_with_attention(x, layers=[layer], need_logits=False)
        out.append(pool(caps[layer].weights[0].float().cpu().numpy(), max_side))
    return out


def pool(w: np.ndarray, side: int) -> np.ndarray:
    """Average-pool the last two axes so neither exceeds `side` (keeps rows summing to ~1 per block)."""
    T = w.shape[-1]
    if T <= side:
        return w
    f = -(-T // side)
    pad = f * side - T
    w = np.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, pad), (0, pad)])
    return w.reshape(*w.shape[:-2], side, f, side, f).mean(axis=(-1, -3)) * f


def step_by_step(att: LayerAttention, head: int, query: int) -> dict:
    """The book's §4.5.1.3 for one query token: q·k, ÷√d_k, mask, softmax, Σ weights·v -- with the
    model's own scale, soft-cap and sliding window where it has them."""
    q = att.q[head, query]
    scores = att.k[head] @ q                       # (T,) q·k for every key
    scaled = scores * att.scale                    # 1/sqrt(d_head) unless the model says otherwise
    if att.softcap:
        scaled = np.tanh(scaled / att.softcap) * att.softcap
    masked = scaled.copy()
    masked[query + 1:] = -np.inf                   # a token may not look at the future
    first = 0 if att.window is None else max(0, query + 1 - att.window)
    masked[:first] = -np.inf                       # nor, in a sliding-window layer, too far back
    e = np.exp(masked - masked[first: query + 1].max())
    weights = e / e.sum()
    output = weights @ att.v[head]
    return {"query": query, "d_head": att.d_head, "scale": att.scale, "first": first, "scores": scores,
            "scaled": scaled, "masked": masked, "weights": weights, "output": output,
            "model_weights": att.weights[head, query], "model_output": att.output[head, query]}
