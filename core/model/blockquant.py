"""Linear layers and token tables held in a GGUF file's own blocks (Q4_0 ... Q6_K, Q8_0, F16, BF16).

A layer's rows are one or more `parts`, each a uint8 (rows, row bytes) tensor of one GGML type: most are
views of the mapped file itself, never copied; a fused layer (Sol's qkv, or gate+up) whose tensors the
file stores in different types (Q4_K_M gives some attn_v Q6_K beside Q4_K q and k) keeps one part each.
Products run in core/kernels/blocks.cpp (llama.cpp's arithmetic: int8 activations a block); where that
library is not loaded the weights are dequantized to float32 for each call (slow, but the same model).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import blocks, int8_kernel
from . import frozen


def _float_rows(part: torch.Tensor, type_name: str, width: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of one part as float32: through the kernel library where it is loaded, else gguf's numpy."""
    if int8_kernel.loaded():
        index = torch.arange(part.shape[0]) if ids is None else ids
        return blocks.rows(part, blocks.TYPES[type_name], index, width)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    raw = part.numpy() if ids is None else part[ids.reshape(-1)].numpy()
    out = dequantize(raw, GGMLQuantizationType[type_name]).reshape(-1, width).astype(np.float32)
    t = torch.from_numpy(out)
    return t if ids is None else t.view(*ids.shape, width)


class BlockRows:
    """A matrix as GGUF rows: [(type name, uint8 (rows, row bytes))] parts one after another, `width` numbers a
    row. What the GGUF reader hands on for quantized weights: concatenating and permuting rows keeps blocks."""

    def __init__(self, parts: list[tuple[str, torch.Tensor]], width: int, sources: list | None = None):
        self.parts, self.width = parts, width
        # The file's mapped views (numpy) the parts came from: their pages can be given back once the rows
        # are copied or converted (core/formats/mapped.release_pages).
        self.sources = sources or []

    @property
    def rows(self) -> int:
        return sum(p.shape[0] for _, p in self.parts)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.width)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for _, p in self.parts)

    @staticmethod
    def cat(matrices: list["BlockRows"]) -> "BlockRows":
        widths = {m.width for m in matrices}
        if len(widths) != 1:
            raise ValueError(f"rows of different widths {sorted(widths)} cannot be stacked")
        return BlockRows([p for m in matrices for p in m.parts], widths.pop(), [a for m in matrices for a in m.sources])

    def slice_rows(self, start: int, stop: int) -> "BlockRows":
        """Rows start..stop (views, across parts)."""
        out, at = [], 0
        for name, part in self.parts:
            lo, hi = max(start - at, 0), min(stop - at, part.shape[0])
            if lo < hi:
                out.append((name, part[lo:hi]))
            at += part.shape[0]
        return BlockRows(out, self.width, self.sources)

    def take_rows(self, index: torch.Tensor) -> "BlockRows":
        """Rows in the order `index` gives (a permutation of this one-part matrix's rows): a copy."""
        if len(self.parts) != 1:
            raise ValueError("only a matrix of one part can be permuted")
        name, part = self.parts[0]
        return BlockRows([(name, part[index].contiguous())], self.width)

    def to_float(self) -> torch.Tensor:
        return torch.cat([_float_rows(p, name, self.width) for name, p in self.parts])


class _InBlocks(nn.Module):
    """What both block layers share: their float32 weight, dequantized on demand, which is also what they
    save (a Sol model directory, an export). Subclasses give block_rows()."""

    def block_rows(self) -> BlockRows:
        raise NotImplementedError

    def float_weight(self) -> torch.Tensor:
        return self.block_rows().to_float()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.float_weight()


class BlockLinear(_InBlocks):
    """nn.Linear's y = x W^T + b with W held as GGUF blocks (see the module docstring)."""

    def __init__(self, rows: BlockRows, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = rows.width, rows.rows
        self.type_names = [name for name, _ in rows.parts]
        self.types = [blocks.TYPES[name] for name in self.type_names]
        for i, (_, part) in enumerate(rows.parts):
            self.register_buffer(f"part{i}", part, persistent=False)   # the file's bytes: not state
        # A parameter, as nn.Linear's (counted, saved, moved); never trained here.
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def parts(self) -> list[torch.Tensor]:
        return [getattr(self, f"part{i}") for i in range(len(self.types))]

    def block_rows(self) -> BlockRows:
        return BlockRows(list(zip(self.type_names, self.parts)), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():   # a LoRA adapter below learns through this layer
            return frozen.product(self, x)
        if not int8_kernel.loaded():
            return F.linear(x, self.float_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = blocks.linear(x.float(), self.parts, self.types, self.bias, self.in_features, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def float_rows(self):
        """(start, stop) -> those rows in float32 (for core/model/frozen.py)."""
        rows = self.block_rows()
        return lambda s, e: rows.slice_rows(s, e).to_float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {'+'.join(self.type_names)}"


class BlockEmbedding(_InBlocks):
    """nn.Embedding's lookup from a table held as GGUF blocks: each looked-up row dequantized to float32."""

    def __init__(self, rows: BlockRows):
        super().__init__()
        if len(rows.parts) != 1:
            raise ValueError("a token table is one tensor")
        self.num_embeddings, self.embedding_dim = rows.rows, rows.width
        self.type_name = rows.parts[0][0]
        self.register_buffer("part0", rows.parts[0][1], persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.part0.device

    def block_rows(self) -> BlockRows:
        return BlockRows([(self.type_name, self.part0)], self.embedding_dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return _float_rows(self.part0, self.type_name, self.embedding_dim, idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.type_name}"


def block_types(model: nn.Module) -> list[str]:
    """The GGUF types the model's weights are held in (empty for a model of float or int8 layers); a type
    held in Sol's interleaved layout ("GQ4_0") is named as the file's ("Q4_0")."""
    names = set()
    for m in model.modules():
        if type(m) is BlockLinear:
            names.update(m.type_names)
        elif type(m) is BlockEmbedding:
            names.add(m.type_name)
    return sorted({n[1:] if n.startswith("GQ") else n for n in names})
