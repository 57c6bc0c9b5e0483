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


def lm_loss_sum(module, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """cross_entropy_sum(module(x), targets), without the (B, T, V) logits where the LM head is frozen (a LoRA
    run): the head's products, softmax and gradient are done a chunk of positions at a time inside one
    autograd node (FrozenHeadLoss). For a 151,936-token vocabulary and a batch of 4 x 256 that is ~1.9 GB of
    logits, their log-softmax and its gradient never held at once. Elsewhere (a head that learns, Gemma's
    soft-capped logits, a wrapped module) the plain path."""
    from ..model.transformer import Transformer
    head = getattr(module, "lm_head", None)
    if (type(module) is not Transformer or module.cfg.logit_softcap is not None
            or any(p.requires_grad for p in head.parameters())):
        return cross_entropy_sum(module(x), targets, ignore_index)
    h = module.hidden(x)
    return FrozenHeadLoss.apply(h.reshape(-1, h.size(-1)), head, targets.reshape(-1), ignore_index,
                                module.vocab_limit)


class FrozenHeadLoss(torch.autograd.Function):
    """Summed next-token cross-entropy of hidden states h (N, d) through a frozen LM head, whose only
    gradient is h's: per chunk of rows, logits -> log-sum-exp and the target's logit -> (softmax - one-hot)
    -> that chunk of dL/dh, kept for the backward pass (N x d, small). The logits live one chunk at a time,
    and the head's two products are the two an unfused loss makes (forward, and dL/dh)."""

    @staticmethod
    def forward(ctx, h, head, targets, ignore_index: int, limit: int | None):
        V = head.out_features
        rows = max(1, CHUNK_ELEMENTS // V)
        # Positions without a target (an SFT prompt's tokens) add nothing to the loss or its gradient: the
        # head never runs on them.
        scored = (targets != ignore_index).nonzero().squeeze(1)
        logits, weight = _head_products(head, h.device.type)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for s in range(0, scored.numel(), rows):
            at = scored[s:s + rows]
            z = logits(h[at]).float()
            if limit is not None and limit < V:   # ids no token owns take no probability (Transformer.logits)
                z[:, limit:] = float("-inf")
            t = targets[at]
            top = z.amax(dim=-1, keepdim=True)
            picked = z.gather(1, t[:, None]).squeeze(1)
            z.sub_(top).exp_()                    # one exp a logit: the sum gives log-sum-exp, the ratio softmax
            total = z.sum(dim=-1)
            loss += (top.squeeze(1) + total.log() - picked).sum()
            z.div_(total[:, None])                                             # softmax, in place
            z[torch.arange(at.numel(), device=z.device), t] -= 1.0             # minus the one-hot target
            grad[at] = weight(z).float()          # under bf16 autocast the product comes back in bf16
        ctx.save_for_backward(grad)
        ctx.dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.float()).to(ctx.dtype), None, None, None, None


def _head_products(head, device_type: str):
    """(h -> logits, g -> g W) for the frozen head. Under autocast a plain head's weight is cast to the autocast
    dtype once here, not in every chunk's two products (autocast keeps no cast of a weight that does not learn:
    for a 151,936 x 896 head that was a third of a small model's step)."""
    import torch.nn as nn
    if type(head) is nn.Linear and torch.is_autocast_enabled(device_type):
        w = head.weight.to(torch.get_autocast_dtype(device_type))
        b = head.bias.to(w.dtype) if head.bias is not None else None
        return (lambda x: torch.nn.functional.linear(x.to(w.dtype), w, b)), (lambda g: g.to(w.dtype) @ w)
    return head, _head_rows(head)


def _head_rows(head):
    """g (n, V) -> g W (n, d) for the head's weight W, whatever form it is held in (float rows, or Sol's int8
    and block layers dequantized a slice of the vocabulary at a time)."""
    import torch.nn as nn
    if type(head) is nn.Linear:
        return lambda g: g @ head.weight.float()
    rows = head.float_rows()
    V, step = head.out_features, max(1, CHUNK_ELEMENTS // max(head.in_features, 1))

    def product(g):
        out = None
        for s in range(0, V, step):
            part = g[:, s:s + step] @ rows(s, min(s + step, V))
            out = part if out is None else out.add_(part)
        return out
    return product
