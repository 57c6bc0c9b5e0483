"""A GGUF file's header, read in one pass: every key/value and every tensor's place, the tensors mapped.

The `gguf` package's GGUFReader builds a numpy view for every element of every array in the header:
a Qwen2.5 vocabulary (151,936 tokens and 151,387 merges) took it 10 s to open, and turning its fields
into values 2 s more. This reads the same layout (the GGUF spec: magic, version, counts, key/values,
tensor infos, aligned data) with struct from the header's bytes, in well under a second, and maps the
tensor data as GGUFReader does. Tensors are described with gguf's own ReaderTensor and quantization
types, so the rest of Sol (and gguf.quants) take them as they took GGUFReader's.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGUF's value types: struct formats of the scalar ones; 8 is a string, 9 an array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
         7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
# Tensor types whose data is plain numbers (the rest are blocks of bytes)
PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
         GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
         GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
         GGMLQuantizationType.I64: np.int64}


class GGUFFile:
    """`metadata`: {key: value} as plain Python values; `tensors`: gguf's ReaderTensor for each tensor,
    its `data` a read-only view of the mapped file. Raises ValueError (or struct.error) on a bad file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data = np.memmap(self.path, mode="r")
        self.buf = memoryview(self.data)
        infos = self._header()
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        start = -(-self.offset // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]
        del self.buf   # the memoryview would pin the mapping open

    @classmethod
    def header(cls, head: bytes) -> tuple[dict, dict]:
        """(metadata, {tensor name: torch shape}) from a file's first bytes, no tensor data: what a download
        needs to know before it starts (core/hub/fit.py). struct.error or ValueError where `head` ends before
        the header does."""
        self = cls.__new__(cls)
        self.buf = memoryview(head)
        infos = self._header()
        return self.metadata, {name: tuple(reversed(dims)) for name, dims, _kind, _at in infos}

    # ---- the header, field by field ------------------------------------------------------------
    def _header(self) -> list:
        """Reads magic, version, key/values (into self.metadata) and the tensor infos, which it returns."""
        self.offset = 0
        if bytes(self.buf[:4]) != MAGIC:
            raise ValueError("GGUF magic invalid")
        (version,) = self._unpack("<I", 4)
        if version not in VERSIONS:
            raise ValueError(f"version {version}, which this reader does not handle (it reads {VERSIONS})")
        n_tensors, n_kv = self._unpack("<QQ", 4 + 4)
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("<I")
            self.metadata[key] = self._value(kind)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        names = [info[0] for info in infos]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicated tensor {next(n for n in names if names.count(n) > 1)!r}")
        return infos

    def _unpack(self, fmt: str, at: int | None = None):
        if at is not None:
            self.offset = at
        values = struct.unpack_from(fmt, self.buf, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        end = self.offset + n
        if end > len(self.buf):
            raise ValueError(f"a string of {n:,} bytes runs past the end of the file")
        s = str(self.buf[self.offset:end], "utf-8")
        self.offset = end
        return s

    def _value(self, kind: int):
        if kind in SCALARS:
            return self._unpack("<" + SCALARS[kind])[0]
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            (sub, n) = self._unpack("<IQ")
            if sub == STRING:
                return [self._string() for _ in range(n)]
            if sub in NUMPY:
                a = np.frombuffer(self.buf, dtype=NUMPY[sub], count=n, offset=self.offset)
                self.offset += a.nbytes
                return a.tolist()
            return [self._value(sub) for _ in range(n)]   # arrays of arrays
        raise ValueError(f"unknown value type {kind}")

    def _tensor_info(self):
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{n_dims}Q")
        (kind, offset) = self._unpack("<IQ")
        return name, dims, GGMLQuantizationType(kind), offset   # ValueError names an unknown type

    def _tensor(self, start: int, name: str, dims: tuple, kind: GGMLQuantizationType, offset: int) -> ReaderTensor:
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block, size = GGML_QUANT_SIZES[kind]
        n_bytes = n * size // block
        at = start + offset
        shape = tuple(reversed(dims))
        if kind in PLAIN:
            count, dtype = n, PLAIN[kind]
        else:
            count, dtype, shape = n_bytes, np.uint8, quant_shape_to_byte_shape(shape, kind)
        if at + n_bytes > len(self.data):
            data = self.data[at:at + n_bytes]   # short: the caller names the tensor as truncated
        else:
            data = self.data[at:at + n_bytes].view(dtype)[:count].reshape(shape)
        return ReaderTensor(name=name, tensor_type=kind, shape=np.array(dims, dtype=np.uint64), n_elements=n,
                            n_bytes=n_bytes, data_offset=at, data=data, field=None)
