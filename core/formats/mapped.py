"""Weights mapped from their files, not read into memory.

safetensors is laid out to be memory-mapped: a JSON header, then each tensor's bytes at an offset. A
tensor here is a view of one private mapping of the file. Nothing is read until used, a page stays the
page cache's until written (copy-on-write: the file never changes), and a tensor stored in the dtype it
runs in is never copied. A tensor that a loader only copies out of (q, k and v, fused into one matrix)
gives its pages back afterwards (`release`), so the weights are in memory once.
"""
from __future__ import annotations

import ctypes
import struct
import sys
import weakref
from pathlib import Path

import torch

# safetensors' dtype names, as torch calls them
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
PAGE = 4096
MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# data pointer -> a mapping this module made, for as long as it lives (weak: a dropped model's mapping
# is unmapped, and its addresses may then hold anonymous memory that must never be released)
_MAPPED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def map_safetensors(f: Path, header: dict) -> dict | None:
    """The tensors of safetensors file `f` (its `header` already checked) as views of one private mapping;
    None where a tensor cannot be a view (a dtype torch lacks, a size that disagrees with its shape, an
    offset not a multiple of its element size): the caller then reads the file instead."""
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    places = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(v.get("dtype"))
        if dtype is None:
            return None
        begin, end = v["data_offsets"]
        count = 1
        for s in v["shape"]:
            count *= s
        if count * dtype.itemsize != end - begin or (8 + n + begin) % dtype.itemsize:
            return None
        places[name] = (dtype, (8 + n + begin) // dtype.itemsize, v["shape"])
    size = f.stat().st_size
    if not places or size == 0:
        return None
    storage = torch.UntypedStorage.from_file(str(f), shared=False, nbytes=size)
    _MAPPED[storage.data_ptr()] = storage
    return {name: torch.empty(0, dtype=dtype).set_(storage, offset, shape)
            for name, (dtype, offset, shape) in places.items()}


def release(t: torch.Tensor) -> None:
    """Give back the memory pages lying wholly inside mapped tensor `t`, once nothing will read it again
    (its numbers were copied elsewhere). A neighbour's pages are never touched; a tensor not mapped by
    this module is left alone (dropping anonymous memory would zero it)."""
    if t.device.type == "cpu" and t.untyped_storage().data_ptr() in _MAPPED:
        _drop(t.data_ptr(), t.numel() * t.element_size())


def release_pages(a) -> None:
    """The same for a numpy view of a file mapping (a GGUF tensor's blocks, once decoded): its whole pages
    leave this process's memory and stay in the page cache. Only np.memmap views are touched."""
    import numpy as np
    if isinstance(a, np.memmap) and a.size:
        _drop(a.ctypes.data, a.nbytes)


def _drop(start: int, nbytes: int) -> None:
    """madvise(DONTNEED) on the whole pages inside [start, start + nbytes) of a private or read-only file
    mapping: clean pages leave this process and are read from the file again if ever touched."""
    first, last = -(-start // PAGE) * PAGE, (start + nbytes) // PAGE * PAGE
    if _LIBC is not None and last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
