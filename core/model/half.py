"""float16 weights on the CPU, multiplied in fbgemm (torch's x86 quantized engine) instead of aten.

PyTorch's float16 matrix product on the CPU is slow, and slower still with more than one row. Measured
with torch 2.13 on 2 AVX-512 cores, GPT-2's LM head (50257 x 768):
- one row (a decode step): aten 1.95 ms (40 GB/s of weights), fbgemm 1.06 ms (73 GB/s);
- 8 rows (a batch): 15.4 ms against 3.4 ms; 32 rows (a prefill): 61 ms against 13 ms.
fbgemm keeps the weights as float16 in its own packed layout (the same two bytes a weight, read once a
token) and takes float32 activations: each output is a float32 sum of exact products, so it is also closer
to float32 than aten's float16 product. A packed Transformer computes in float32 between these layers
(pack_half); any other model gets its own activations' dtype back.

CPU only: a move to another device unpacks the weights back into a plain float16 buffer (nn.Linear's
arithmetic then), and the next forward on the CPU packs them again.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import frozen
from .changes import changed


def available() -> bool:
    """Whether this build of torch has fbgemm's float16 kernels (x86 builds do; ARM's do not)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class HalfLinear(nn.Module):
    """nn.Linear's y = x W^T + b with float16 W; on the CPU through fbgemm's packed float16 product."""

    def __init__(self, m: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self.register_buffer("weight", m.weight.detach().to(torch.float16))
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        self.__dict__["_packed"] = None   # fbgemm's packed weights: not a buffer, torch cannot move them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():   # a LoRA adapter below learns through this layer
            return frozen.product(self, x)
        packed = self._packed
        if packed is None and x.device.type == "cpu" and self.weight.dtype == torch.float16:
            packed = self.pack()
        if packed is None:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if x.dim() == 1:   # nn.Linear takes a lone vector; fbgemm wants rows
            return self.forward(x[None])[0]
        y = torch.ops.quantized.linear_dynamic_fp16(x.float(), packed)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def pack(self):
        """Pack the float16 weights for fbgemm; the packed copy then is the only one."""
        if self._packed is None:
            bias = None if self.bias is None else self.bias.detach().float()
            # Exact: the weights are float16 values already; fbgemm stores them as float16 again.
            self.__dict__["_packed"] = torch.ops.quantized.linear_prepack_fp16(self.weight.float(), bias)
            self._buffers["weight"] = torch.empty(0, dtype=torch.float16)
            changed()
        return self._packed

    def unpack(self) -> None:
        if self._packed is not None:
            w, _ = torch.ops.quantized.linear_unpack_fp16(self._packed)
            self._buffers["weight"] = w.to(torch.float16)
            self.__dict__["_packed"] = None
            changed()

    def float_rows(self):
        """(start, stop) -> those rows in float32 (for core/model/frozen.py)."""
        w = self.half_weight()
        return lambda s, e: w[s:e].float()

    def half_weight(self) -> torch.Tensor:
        """The float16 weights, whichever form holds them."""
        if self._packed is None:
            return self.weight
        return torch.ops.quantized.linear_unpack_fp16(self._packed)[0].to(torch.float16)

    def packed_bytes(self) -> int:
        return 2 * self.in_features * self.out_features if self._packed is not None else 0

    # ---- torch's module machinery sees the plain float16 buffer ---------------------------------------
    def _apply(self, fn, recurse=True):
        self.unpack()   # packed weights cannot move or change dtype
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self.half_weight()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 (fbgemm)"


def pack_half(model: nn.Module) -> nn.Module:
    """Every float16 nn.Linear of a CPU model (the LM head included, tied or not: a tied head gets its own
    packed copy, the embedding keeps its rows for lookups) replaced by a packed HalfLinear, in place.

    A Transformer then computes in float32 between its linear layers (act_dtype): fbgemm takes and gives
    float32, so float16 activations would pay two casts a layer, and the CPU's float16 element-wise
    operations and reductions (norms, sampling over the vocabulary) are slower than float32's. Its norms
    become float32 (a few vectors); embeddings stay float16, converted a row at a time as they are read."""
    if not available():
        return model
    packed = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float16 and child.weight.device.type == "cpu":
                m = HalfLinear(child)
                m.pack()
                setattr(parent, name, m)
                packed = True
    if packed and hasattr(model, "act_dtype"):
        for m in model.modules():
            if isinstance(m, (nn.Embedding, HalfLinear)):
                continue
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None and t.dtype == torch.float16:
                    t.data = t.data.float()
        model.act_dtype = torch.float32
    return model
