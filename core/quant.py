"""Weight-only int8: linear layers that keep their weights as int8 with one float scale per output row.

Decoding one token reads every weight once, so it is bound by memory: int8 weights read a quarter of
float32's bytes. On the CPU the product runs in torch's weight-only int8 kernel
(aten._weight_int8pack_mm: int8 weights, bfloat16 activations, per-row scales); on a GPU the weights are
dequantized on the fly to the activations' dtype (one conversion fused ahead of a dense product).
Embeddings and norms stay float: a lookup reads one row, a norm a vector.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ≈ q * scale[:, None], |q| <= 127."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear's y = x W^T + b with W held as int8 rows and float32 scales."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("weight", q.to(weight.device))
        self.register_buffer("scales", scale.to(weight.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, m: nn.Linear) -> "Int8Linear":
        return cls(m.weight, m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            # bfloat16 activations: the kernel's vectorised (AVX-512 BF16) path; with float32 ones it falls
            # back to scalar code ten times slower than float32's own product.
            # The scales are applied after, in float32: rounded to bfloat16 they would err by up to 0.4% per
            # row, enough to flip near-tied next tokens.
            # And the activations go in as two bfloat16 rows, x's value and what bfloat16 rounded off: one
            # more row costs little next to reading the weights, and top-1 agreement with float32 rises.
            x2 = x.reshape(-1, x.shape[-1]).float()
            hi = x2.to(torch.bfloat16)
            lo = (x2 - hi.float()).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(torch.cat([hi, lo]), self.weight, self._unit_scales()).float()
            n = x2.shape[0]
            y = ((y[:n] + y[n:]) * self.scales.float()).to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _unit_scales(self) -> torch.Tensor:
        ones = self.__dict__.get("_ones")   # not a buffer: .to(dtype) must not turn it into float16
        if ones is None:
            ones = self.__dict__["_ones"] = torch.ones(self.out_features, dtype=torch.bfloat16)
        return ones

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_model(model: nn.Module) -> nn.Module:
    """Every nn.Linear of the model (the LM head included, tied or not) replaced by an Int8Linear, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear.from_linear(child))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def weight_bytes(cfg, kind: str) -> int:
    """Estimated bytes of a model's weights as loaded: "float32", "bfloat16" or "int8" (linear weights one
    byte plus a float32 scale per row; embeddings float32, and a tied head its own int8 copy)."""
    d, L = cfg.d_model, cfg.n_layer
    linear = L * (d * cfg.head_dim * (cfg.n_head * 2 + cfg.n_kv_head * 2) + d * cfg.d_ff * (3 if cfg.gated else 2))
    rows = L * (cfg.head_dim * (cfg.n_head + 2 * cfg.n_kv_head) + d + cfg.d_ff * (2 if cfg.gated else 1) + d)
    embed = cfg.vocab_size * d + (cfg.context * d if cfg.positions == "learned" else 0)
    head = cfg.vocab_size * d
    qkv = cfg.head_dim * (cfg.n_head + 2 * cfg.n_kv_head)
    norms = (2 * L + 1) * d * (2 if cfg.norm == "layernorm" else 1)
    biases = L * (qkv + d + (cfg.d_ff * (2 if cfg.gated else 1)) + d) if cfg.bias else \
        L * (qkv * cfg.qkv_bias + d * cfg.proj_bias)
    if kind == "int8":   # biases and norms stay float32
        return linear + head + 4 * (rows + cfg.vocab_size + embed + norms + biases)
    size = {"float32": 4, "bfloat16": 2}[kind]
    return size * (linear + embed + (0 if cfg.tie_embeddings else head) + norms + biases)


def memory_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
