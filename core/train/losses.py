"""Next-token cross-entropy that never holds all (B*T, V) logits in float32.

Under bf16 autocast the LM head's logits are bf16; F.cross_entropy would first cast them all to
float32 (autocast runs it in float32), which at GPT-2 size is B*T*V*4 bytes -- 1.6 GB for a batch of
12 x 1024 x 32768 -- written and read again in the backward pass. Here each chunk of rows is cast,
reduced to its log-sum-exp and dropped; the backward pass recomputes each chunk's softmax from the
bf16 logits and the saved log-sum-exps. Float32 logits (the CPU) take F.cross_entropy unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMENTS = 1 << 25   # float32 values per chunk (128 MB)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Sum over (B, T) of -log softmax(logits)[target], positions whose target is ignore_index skipped."""
    V = logits.size(-1)
    logits, targets = logits.reshape(-1, V), targets.reshape(-1)
    if logits.dtype in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        # Compiled, the cast is fused into the reduction and never written out: the plain form is best.
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    return ChunkedCrossEntropy.apply(logits, targets, ignore_index, max(1, CHUNK_ELEMENTS // V))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over rows of any float dtype, in float32 one chunk of `rows` at a time."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, rows: int):
        keep = targets != ignore_index
        safe = torch.where(keep, targets, torch.zeros_like(targets))
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.size(0), rows):
            lse[s:s + rows] = torch.logsumexp(logits[s:s + rows].float(), dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, keep, lse)
        ctx.rows = rows
        return ((lse - picked) * keep).sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, safe, keep, lse = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty_like(logits)
        scale = keep.float() * grad_out.float()
        for s in range(0, logits.size(0), rows):
            e = min(s + rows, logits.size(0))
            g = torch.exp(logits[s:e].float() - lse[s:e, None])                  # softmax of the chunk
            g[torch.arange(e - s, device=g.device), safe[s:e]] -= 1.0             # minus the one-hot target
            grad[s:e] = (g * scale[s:e, None]).to(logits.dtype)
        return grad, None, None, None
