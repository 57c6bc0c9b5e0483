"""Products of weights kept in a GGUF file's own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K,
F16, BF16), and lookups of their rows: blocks.cpp, part of the library core/kernels/int8_kernel.py compiles.

A quantized GGUF file holds each matrix as blocks of 32 or 256 numbers with their scales, 4.5 to 8.5 bits a
number. Expanded to float32 a Q4_K_M model is 7x its file and reads 7x the bytes a token (the decode speed
is the bytes a token reads); these kernels multiply the blocks as they are, with llama.cpp's arithmetic
(activations quantized to int8 per block), so a model runs in its file's bytes, at the file's speed.
Where the library cannot be built (see int8_kernel.available), models dequantize to float32 instead.
"""
from __future__ import annotations

import torch

from . import int8_kernel

# GGML type numbers (gguf.GGMLQuantizationType) these kernels read, and (numbers, bytes) of a block of each.
BLOCKS = {"F16": (1, 1, 2), "BF16": (30, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
          "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
          "Q6_K": (14, 256, 210)}
# Sol's interleaved layouts (blocks.cpp's group()): the same rows and bytes, 8 rows' blocks side by side.
GROUPED = 1000
for _name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"):
    BLOCKS["G" + _name] = (GROUPED + BLOCKS[_name][0], *BLOCKS[_name][1:])
TYPES = {name: t for name, (t, _, _) in BLOCKS.items()}
NAMES = {t: name for name, t in TYPES.items()}
SCHEMAS = ["linear(Tensor x, Tensor[] parts, int[] types, Tensor? bias, int in_features, int out_features) -> Tensor",
           "rows(Tensor blocks, int type, Tensor ids, int width) -> Tensor",
           "bad_scale(Tensor blocks, int type) -> int",
           "group(Tensor blocks, int type, Tensor(a!) out) -> Tensor(a!)"]


def _declare():
    """torch.ops.sol_blocks' schemas, declared now (cheap) so TorchScript compiles calls to them in every
    process; the compiled library brings the CPU implementations when loaded."""
    try:
        torch.ops.sol_blocks.linear   # noqa: B018 (declared already: this module imported under two names)
        return None
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("sol_blocks", "DEF")
        for schema in SCHEMAS:
            lib.define(schema)
        return lib


_LIBRARY = _declare()   # kept: the declarations last as long as this object


def available() -> bool:
    """Whether the kernels run in this process (the library int8_kernel builds: compiled once, ~40 s)."""
    return int8_kernel.available()


def row_bytes(type_name: str, width: int) -> int:
    """Bytes of one row of `width` numbers in this type; ValueError where width is not whole blocks."""
    _, numbers, size = BLOCKS[type_name]
    if width % numbers:
        raise ValueError(f"{width} numbers are not whole {type_name} blocks of {numbers}")
    return width // numbers * size


def linear(x: torch.Tensor, parts: list[torch.Tensor], types: list[int], bias: torch.Tensor | None,
           in_features: int, out_features: int) -> torch.Tensor:
    """y = x W^T + bias, W the parts' rows one after another (each part uint8 (rows, row_bytes) of one type);
    x (..., in) float32, y (..., out) float32."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.sol_blocks.linear(x2.contiguous(), parts, types, bias, in_features, out_features)
    return y.view(*x.shape[:-1], out_features)


def rows(blocks: torch.Tensor, type_id: int, ids: torch.Tensor, width: int) -> torch.Tensor:
    """The rows `ids` (any shape) of one part as float32, shape ids.shape + (width,)."""
    y = torch.ops.sol_blocks.rows(blocks, type_id, ids, width)
    return y.view(*ids.shape, width)


def bad_scale(part: torch.Tensor, type_id: int) -> int:
    """The first block (along the rows) whose float16 scale is NaN or infinite, or -1 (F16, BF16: the first
    such number)."""
    return torch.ops.sol_blocks.bad_scale(part, type_id)


def group(part: torch.Tensor, type_name: str, out: torch.Tensor | None = None) -> tuple[str, torch.Tensor]:
    """Quantized rows (Q4_0 ... Q8_0, Q4_K, Q5_K, Q6_K), a multiple of 8 of them, in Sol's interleaved layout
    ("G" + the type's name; blocks.cpp's rows8): the same bytes, 8 rows multiplied at once, written into
    `out` if given. Others (F16, BF16, a number of rows not a multiple of 8) come back as they are."""
    if not interleaves(part, type_name):
        return type_name, part
    out = torch.empty_like(part) if out is None else out
    return "G" + type_name, torch.ops.sol_blocks.group(part, TYPES[type_name], out)


def interleaves(part: torch.Tensor, type_name: str) -> bool:
    return "G" + type_name in BLOCKS and part.shape[0] % 8 == 0
