"""The input's gradient through a frozen layer torch cannot differentiate.

Sol's int8, float16 and GGUF-block layers multiply in their own kernels, which have no backward. A LoRA
adapter trained on such a base (QLoRA's idea with Sol's int8) still needs the gradient to flow through them
to the layers below: dL/dx = dL/dy · W. The weight itself never learns, so that is the whole backward.
W is dequantized a slice of rows at a time, so its float32 copy never exists whole.
"""
from __future__ import annotations

import torch

SLICE = 1 << 24   # float32 numbers dequantized at a time: 64 MB


class _FrozenProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer(x)   # grad mode is off inside forward: the layer takes its own kernel

    @staticmethod
    def backward(ctx, g):
        layer = ctx.layer
        rows = layer.float_rows()   # (start, stop) -> float32 rows; any one-off unpacking done once
        out = layer.out_features
        step = max(1, SLICE // max(layer.in_features, 1))
        gx = None
        for s in range(0, out, step):
            e = min(s + step, out)
            part = g[..., s:e].float() @ rows(s, e)
            gx = part if gx is None else gx.add_(part)
        return gx.to(g.dtype), None


def product(layer, x: torch.Tensor) -> torch.Tensor:
    """layer(x) with the input's gradient (call where x requires a gradient)."""
    return _FrozenProduct.apply(x, layer)
