"""The logit lens: what each layer would predict.

The residual stream after each block is read the way the last one is: through the final norm and the
unembedding (with the model's own soft-cap, via Transformer.logits). Early layers mostly echo the input
token; the answer forms layer by layer, and the last layer's reading is exactly the model's prediction.
"""
from __future__ import annotations

import torch

from ..errors import SolError


@torch.no_grad()
def lens(loaded, text: str, top: int = 1) -> dict:
    """`sol lens --json`: for each position and each layer (0 = the embedding), the top next tokens."""
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.config
    if top < 1:
        raise SolError(f"--top: {top}; give at least 1")
    ids = tok.encode_ids(text)
    if not ids:
        raise SolError("--text: empty; give a text")
    if len(ids) > cfg.context:
        raise SolError(f"--text: {len(ids)} tokens, longer than this model's context of {cfg.context}; shorten it")
    res = model.residuals(torch.tensor([ids], device=model.device))
    # (layers, T, top): one matrix product per layer, then only the few values the grid shows.
    probs, best = [], []
    for r in res:
        p = torch.softmax(model.logits(model.norm(r))[0].float(), dim=-1)
        v, i = p.topk(min(top, p.shape[-1]), dim=-1)
        probs.append(v)
        best.append(i)
    positions = []
    for t, token in enumerate(ids):
        per_layer = []
        for v, i in zip(probs, best):
            cands = [{"id": int(i[t, j]), "text": tok.decode([int(i[t, j])]), "prob": float(v[t, j])}
                     for j in range(v.shape[1])]
            entry = dict(cands[0])
            if top > 1:
                entry["top"] = cands
            per_layer.append(entry)
        positions.append({"id": token, "token": tok.decode([token]), "per_layer": per_layer})
    return {"layers": list(range(len(res))), "positions": positions}
