"""int8 weights: linear layers that keep their weights as int8 with one float scale per output row.

Decoding one token reads every weight once, so it is bound by memory: int8 weights read a quarter of
float32's bytes. The products:
- on an x86 CPU with AVX2 and a C++ compiler, in Sol's own kernel (core/kernels/int8_kernel.py), the weights
  rearranged once into its blocked layout, which then is the only copy;
- on other CPUs, in fbgemm (torch's x86 quantized engine: int8 products in int32 sums with AVX-512 VNNI, in
  int16 pair sums without it, hence fbgemm_codes()), the weights packed once into its layout, which then is
  the only copy. fbgemm pads each row to blocks of 512 inputs, so
  a layer whose rows would grow by more than a third (fewer than 384 inputs: tiny models) is not packed;
- elsewhere, and on GPUs, the weights are dequantized on the fly to the activations' dtype (exact);
- on a CPU without fbgemm, wide layers run in aten._weight_int8pack_mm on bfloat16 activations.
The token embedding is int8 too, with the same per-row scales (Int8Embedding): a lookup reads one row,
but the table is often the largest tensor of a small model (GPT-2's is 30 % of it, Qwen2-0.5B's 28 %),
and kept float32 it would leave an int8 model as large as a float16 one. Norms, biases and learned
position tables stay float.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import int8_kernel
from . import frozen
from .changes import changed
from .half import HalfLinear

# fbgemm stores a packed matrix in blocks of 512 inputs and 32 rows, plus three 4-byte numbers a row
# (measured with torch 2.13: 768 inputs take 1024 bytes a row, 96 take 512).
PACK_BLOCK, PACK_ROWS = 512, 32
# Without fbgemm, layers this wide run in _weight_int8pack_mm; narrower ones are dequantized on the fly.
WOQ_MIN_IN = 384


def packed_bytes(out_features: int, in_features: int) -> int:
    """Bytes fbgemm's packed copy of an (out, in) int8 weight takes."""
    def up(n, block):
        return -(-n // block) * block
    return up(out_features, PACK_ROWS) * up(in_features, PACK_BLOCK) + 12 * out_features


def packable(in_features: int) -> bool:
    """Whether fbgemm's padding grows this layer's rows by at most a third."""
    return -(-in_features // PACK_BLOCK) * PACK_BLOCK * 3 <= 4 * in_features


ROWS_AT_ONCE = 256   # quantize_rows' slices: a few hundred KB of float32 that stay in the CPU's cache


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ≈ q * scale[:, None], |q| <= 127. In slices of rows, each divided, rounded
    and clamped in place: a whole matrix's four float32 temporaries made a 0.5B model's load 4 s slower."""
    w = w.detach().float()
    # max |w| per row as max(row max, -row min): two vectorised reductions, no |w| copy (torch.aminmax
    # took 4.7x as long on this CPU)
    scale = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg()).clamp(min=1e-12) / 127.0
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for i in range(0, w.shape[0], ROWS_AT_ONCE):
        t = w[i:i + ROWS_AT_ONCE] / scale[i:i + ROWS_AT_ONCE, None]
        q[i:i + ROWS_AT_ONCE] = t.round_().clamp_(-127, 127)   # whole numbers: the cast to int8 is exact
    return q, scale


def _fbgemm() -> bool:
    return torch.backends.quantized.engine in ("x86", "fbgemm")


class Codes(NamedTuple):
    """How activations go into fbgemm on this CPU: `rows` int8 rows, the first round(x / s) with
    |round(x / s)| <= top, each next one lo times what the one before it dropped, all as uint8 codes
    (value + zero). See Int8Linear._fbgemm."""
    top: int
    zero: int
    lo: float
    rows: int

    def row_weights(self) -> torch.Tensor:
        """(1, rows) float32: what each row's product counts for in the sum, 1, 1/lo, 1/lo^2..."""
        w = _ROW_WEIGHTS.get(self)
        if w is None:
            w = _ROW_WEIGHTS[self] = torch.tensor([[self.lo ** -i for i in range(self.rows)]])
        return w


_ROW_WEIGHTS: dict = {}


FULL_CODES = Codes(127, 128, 128.0, 2)    # int32 sums (AVX-512 VNNI): every uint8 code
# int16 pair sums: codes below 128, as torch's observers' reduce_range; 7 bits a row, so a third row
# brings the sum back to the precision two full rows have.
REDUCED_CODES = Codes(63, 64, 126.0, 3)
_CODES: Codes | None = None


def prepack(q: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed copy of int8 rows `q` with one float scale a row (no bias: Int8Linear adds it)."""
    with warnings.catch_warnings():   # quantized tensors are deprecated as a user type; fbgemm still takes them
        warnings.simplefilter("ignore")
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        w = torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(w, None)


def fbgemm_codes() -> Codes:
    """The activation codes fbgemm multiplies exactly on this CPU, found once per process by asking it.

    With AVX-512 VNNI fbgemm sums uint8 x int8 products in int32. Without it (AVX2, and AVX-512 CPUs before
    VNNI) it sums pairs of them in int16, which saturates at 32767: codes up to 255 against weights up to 127
    come out silently wrong (on a 2-core AVX2 EPYC: errors of a third of the output's range, top-1 agreement
    with float32 down to 97.5 %). Codes below 128 cannot saturate (2 x 127 x 127 < 32767)."""
    global _CODES
    if _CODES is None:
        # pairs of 255 x 127: far past int16 where it saturates
        packed = prepack(torch.full((8, 64), 127, dtype=torch.int8), torch.ones(8))
        # One row as in decoding and many as in a prompt: fbgemm blocks rows differently, not its arithmetic.
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            torch.full((33, 64), 127.0), 1.0, 128, packed)
        _CODES = FULL_CODES if bool((y == 127.0 * 127 * 64).all()) else REDUCED_CODES
    return _CODES


class Int8Linear(nn.Module):
    """nn.Linear's y = x W^T + b with W held as int8 rows and float32 scales."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_rows(weight)
        self._hold(q.to(weight.device), scale.to(weight.device), bias)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> "Int8Linear":
        return cls(m.weight, m.bias)

    @classmethod
    def from_rows(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Rows quantize_rows already made (a GGUF file read straight into int8, one matrix at a time)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._hold(q, scales, bias)
        return m

    @classmethod
    def from_blocked(cls, blocked: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     in_features: int, out_features: int) -> "Int8Linear":
        """Rows already in Sol's kernel's blocked layout (int8_kernel.block), with no plain copy."""
        m = cls.from_rows(torch.empty(0, in_features, dtype=torch.int8), scales, bias)
        m.out_features = out_features
        m.__dict__["_blocked"] = blocked
        changed()
        return m

    def _hold(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.__dict__["_packed"] = None   # fbgemm's packed weights (not a buffer: torch cannot move them)
        self.__dict__["_blocked"] = None  # or the kernel's blocked copy (int8_kernel.block)
        self.__dict__["_declined"] = False   # pack() said no: not on every call again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():   # a LoRA adapter below learns through this layer
            return frozen.product(self, x)
        if self._blocked is None and self._packed is None and x.device.type == "cpu" and not self._declined:
            self.pack()
        if self._blocked is not None:   # packed weights of either kind live on the CPU
            return self._kernel(x)
        if self._packed is not None:
            return self._fbgemm(x, self._packed)
        if x.device.type == "cpu" and self.in_features >= WOQ_MIN_IN and not _fbgemm():
            y = self._woq(x)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    # ---- the CPU paths -------------------------------------------------------------------------------
    def pack(self, force: bool = False, blocked: torch.Tensor | None = None):
        """The weights in the CPU product's own layout, which then replaces the int8 buffer (the plain rows
        come back from it when asked for: int8_weight(), state_dict(), .to()): Sol's kernel's blocked copy
        where int8_kernel.available(), else fbgemm's packed one. None where neither can be had: no fbgemm,
        or fbgemm's padding would grow the rows by more than a third (unless `force`). `blocked`: the
        kernel's copy made already (pack_model makes them all in one region: int8_kernel.block_all)."""
        if self._blocked is not None:
            return self._blocked
        if self._packed is not None:
            return self._packed
        if self.weight.device.type == "cpu" and int8_kernel.available():
            self.__dict__["_blocked"] = int8_kernel.block(self.weight) if blocked is None else blocked
            self._buffers["weight"] = torch.empty(0, dtype=torch.int8)
            changed()
            return self._blocked
        if self.weight.device.type != "cpu" or not _fbgemm() or not (force or packable(self.in_features)):
            self.__dict__["_declined"] = True
            return None
        fbgemm_codes()   # asked now, not inside the first product
        packed = prepack(self.weight, self.scales)   # the bias is added with the rows' sum (_fbgemm)
        self.__dict__["_packed"] = packed
        self._buffers["weight"] = torch.empty(0, dtype=torch.int8)
        changed()
        return packed

    def unpack(self) -> None:
        """Back to the plain int8 buffer (before a move, or to save)."""
        if self._blocked is not None:
            self._buffers["weight"] = int8_kernel.unblock(self._blocked, self.out_features, self.in_features)
            self.__dict__["_blocked"] = None
            changed()
        packed = self._packed
        if packed is not None:
            w, _ = torch.ops.quantized.linear_unpack(packed)
            self._buffers["weight"] = w.int_repr()
            self.__dict__["_packed"] = None
            changed()

    def float_rows(self):
        """(start, stop) -> those rows in float32 (the int8 rows unpacked once, for core/model/frozen.py)."""
        q, scales = self.int8_weight(), self.scales
        return lambda s, e: q[s:e].float() * scales[s:e, None].float()

    def int8_weight(self) -> torch.Tensor:
        """The int8 rows, whichever form holds them."""
        if self._blocked is not None:
            return int8_kernel.unblock(self._blocked, self.out_features, self.in_features)
        if self._packed is None:
            return self.weight
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 (the kernel's arithmetic); a float32 model's scales and bias already are.
        scales = self.scales if self.scales.dtype == torch.float32 else self.scales.float()
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        y = int8_kernel.linear(x if x.dtype == torch.float32 else x.float(), self._blocked, scales, bias,
                               self.in_features, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _fbgemm(self, x: torch.Tensor, packed) -> torch.Tensor:
        # The activations go in twice, in units of s = the largest |x| / 127: t = x / s, which fbgemm rounds
        # to int8, and 128 times what that rounding dropped. Their sum carries ~15 bits, so top-1 agreement
        # with float32 equals that of the weights' own rounding (one int8 row: 97.8 % on the words model,
        # 99.3 % with the second). That is on a CPU with VNNI; elsewhere codes have 7 bits and a third row
        # goes in (fbgemm_codes()). A row costs little next to reading the weights once; a tensor call more
        # costs 1-3 µs, ~50 times a token, hence one scale per call, fbgemm's scale 1 (the rows are already
        # in steps, and fbgemm rounds exactly what the remainders were taken from) and one product that
        # weighs the rows, scales them by s and adds the bias.
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        n = x2.shape[0]
        codes = fbgemm_codes()
        s = float(x2.abs().max()) / codes.top or 1.0
        t = x2 * (1.0 / s)
        rows = [t]
        for _ in range(codes.rows - 1):
            t = torch.sub(t, t.round()).mul_(codes.lo)
            rows.append(t)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.cat(rows), 1.0, codes.zero, packed)
        weights, bias = codes.row_weights(), None if self.bias is None else self.bias.float()
        if n == 1 and bias is not None:
            y = torch.addmm(bias.view(1, -1), weights, y, alpha=s)
        else:
            y = torch.mm(weights, y.view(codes.rows, -1)).view(n, -1)
            y = y.mul_(s) if bias is None else torch.add(bias, y, alpha=s)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _woq(self, x: torch.Tensor) -> torch.Tensor:
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
        return ((y[:n] + y[n:]) * self.scales.float()).to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _unit_scales(self) -> torch.Tensor:
        ones = self.__dict__.get("_ones")   # not a buffer: .to(dtype) must not turn it into float16
        if ones is None:
            ones = self.__dict__["_ones"] = torch.ones(self.out_features, dtype=torch.bfloat16)
        return ones

    # ---- torch's module machinery sees the plain int8 buffer ----------------------------------------
    def _apply(self, fn, recurse=True):
        self.unpack()   # packed weights cannot move or change; the next CPU forward packs again
        self.__dict__["_declined"] = False
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None or self._blocked is not None:
            destination[prefix + "weight"] = self.int8_weight()

    def int8_bytes(self) -> int:
        """Bytes the int8 weights take as held now (the kernel's or fbgemm's padding included)."""
        if self._blocked is not None:
            return self._blocked.numel()
        if self._packed is None:
            return self.weight.numel()
        return packed_bytes(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """nn.Embedding's row lookup with the table held as int8 rows and one float scale per row.

    Rows come out in the scales' dtype (float32 on the CPU; a model moved to bfloat16 casts the scales and
    so its activations), computed in float32. A tied LM head quantizes the same rows the same way, so the
    embedding and the head see identical int8 values."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight)
        self._hold(q.to(weight.device), scale.to(weight.device))

    @classmethod
    def from_embedding(cls, m: nn.Embedding) -> "Int8Embedding":
        return cls(m.weight)

    @classmethod
    def from_rows(cls, q: torch.Tensor, scales: torch.Tensor) -> "Int8Embedding":
        """Rows quantize_rows already made (see Int8Linear.from_rows)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._hold(q, scales)
        return m

    def _hold(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.num_embeddings, self.embedding_dim = q.shape

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the rows it gives (the model's activations)."""
        return self.scales.dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight).float() * F.embedding(idx, self.scales.float()[:, None])
        return rows.to(self.scales.dtype)

    def float_weight(self) -> torch.Tensor:
        """The whole table dequantized, float32 (the embeddings panel reads it)."""
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def quantize_model(model: nn.Module, done=None) -> nn.Module:
    """Every nn.Linear of the model (the LM head included, tied or not) replaced by an Int8Linear, and the
    token embedding by an Int8Embedding, in place. Learned position tables stay float (context x d_model:
    small, and added to every token). `done(weight)`, if given, is called with each float weight once its
    int8 copy is in place (the loader gives a mapped file's pages back there)."""
    # (parent, name) pairs, not the layers: a list holding every nn.Linear would keep each float matrix alive
    # until the last one is quantized (the float32 model whole, beside its int8 copy).
    # The blocks' layers first: the LM head (vocabulary x d_model, the largest matrix) last, once the blocks'
    # float weights are gone.
    places = sorted([(parent, name) for parent in model.modules() for name, child in parent.named_children()
                     if type(child) is nn.Linear], key=lambda p: p[0] is model)
    for parent, name in places:
        child = getattr(parent, name)
        setattr(parent, name, Int8Linear.from_linear(child))
        if done is not None:
            done(child.weight)
        del child
    if type(getattr(model, "embed", None)) is nn.Embedding:
        weight = model.embed.weight
        model.embed = Int8Embedding.from_embedding(model.embed)
        if done is not None:
            done(weight)
    return model


def pack_model(model: nn.Module) -> None:
    """Pack every Int8Linear on the CPU now (for Sol's kernel or fbgemm), at load, rather than in the first
    token's time; the kernel's copies all in one region of huge pages (int8_kernel.block_all)."""
    mods = [m for m in model.modules() if type(m) is Int8Linear]
    plain = [m for m in mods if m._blocked is None and m._packed is None and m.weight.device.type == "cpu"]
    if plain and int8_kernel.available():
        for m, blocked in zip(plain, int8_kernel.block_all([m.weight for m in plain])):
            m.pack(blocked=blocked)
    for m in mods:
        m.pack()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


def weight_bytes(cfg, kind: str) -> int:
    """Estimated bytes of a model's weights as loaded: "float32", "bfloat16" or "int8" (linear weights and
    the token embedding one byte, fbgemm's padding included where this CPU packs them, plus a float32
    scale per row; a learned position table float32, and a tied head its own int8 copy)."""
    d, L = cfg.d_model, cfg.n_layer
    linear = L * (d * cfg.head_dim * (cfg.n_head * 2 + cfg.n_kv_head * 2) + d * cfg.d_ff * (3 if cfg.gated else 2))
    rows = L * (cfg.head_dim * (cfg.n_head + 2 * cfg.n_kv_head) + d + cfg.d_ff * (2 if cfg.gated else 1) + d)
    positions = cfg.context * d if cfg.positions == "learned" else 0
    embed = cfg.vocab_size * d + positions
    head = cfg.vocab_size * d
    qkv = cfg.head_dim * (cfg.n_head + 2 * cfg.n_kv_head)
    norms = (2 * L + 1) * d * (2 if cfg.norm == "layernorm" else 1)
    biases = L * (qkv + d + (cfg.d_ff * (2 if cfg.gated else 1)) + d) if cfg.bias else \
        L * (qkv * cfg.qkv_bias + d * cfg.proj_bias)
    if kind == "int8":   # the token table one byte and a scale a row; positions, biases and norms float32
        return _int8_linear_bytes(cfg) + cfg.vocab_size * d + 4 * (rows + 2 * cfg.vocab_size + positions + norms + biases)
    size = {"float32": 4, "bfloat16": 2}[kind]
    return size * (linear + embed + (0 if cfg.tie_embeddings else head) + norms + biases)


def _int8_linear_bytes(cfg) -> int:
    """The linear layers' and head's int8 weights as this machine's CPU holds them (the kernel's blocked
    copy, or fbgemm's packed one where it packs)."""
    d, qkv = cfg.d_model, cfg.head_dim * (cfg.n_head + 2 * cfg.n_kv_head)
    shapes = [(qkv, d), (d, cfg.n_head * cfg.head_dim), (cfg.d_ff * (2 if cfg.gated else 1), d), (d, cfg.d_ff)]
    kernel, pack = int8_kernel.likely(), _fbgemm()

    def size(out, inp):
        if kernel:
            return int8_kernel.blocked_bytes(out, inp)
        return packed_bytes(out, inp) if pack and packable(inp) else out * inp
    return cfg.n_layer * sum(size(o, i) for o, i in shapes) + size(cfg.vocab_size, d)


def memory_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take, each tensor counted once (tied weights). Counted by
    tensor, not by storage: a model loaded from a mapped file holds views of the file's one mapping."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total + sum(m.int8_bytes() for m in model.modules()
                       if type(m) is Int8Linear and (m._packed is not None or m._blocked is not None)) \
        + sum(m.packed_bytes() for m in model.modules() if type(m) is HalfLinear)
