"""The Transformer's parts: norms, rotary positions, the KV cache, attention, the MLP and the block.

Every switch of ModelConfig that changes a layer is read here (core/model/transformer.py assembles them);
the scripted CPU step (core/model/cpu_step.py) reads these classes too, so it depends on this module and
not on the Transformer that uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .half import HalfLinear
from .blockquant import BlockLinear
from .quant import Int8Linear

_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _gpu_attention_backends():
    """Attention kernels for prompts on a GPU: flash, memory-efficient, math, never cuDNN's, which on
    Hopper builds a new execution plan for every new sequence length (milliseconds per call)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:   # older torch: its default choice
        return None
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return lambda: sdpa_kernel(backends)


_GPU_BACKENDS = _gpu_attention_backends()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 as Llama does, so half-precision weights give the same result.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:   # Gemma: scale by (1 + weight) in float32, then cast
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim or cfg.d_model, cfg.norm_eps, cfg.norm_plus_one)
    return nn.LayerNorm(dim or cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig, local: bool = False, long: bool = False) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and the factor cos and sin are multiplied by, computed as transformers'
    rope init functions compute them (float32). `local`: Gemma 3's sliding layers (plain RoPE, own base);
    `long`: longrope's long factors (past the original context)."""
    dim = cfg.rope_dim or cfg.head_dim
    base = cfg.rope_local_theta if local else cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    scaling = {} if local else (cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = ~(wavelen < old_ctx / hi) * ~(wavelen > old_ctx / lo)
        return torch.where(mid, smoothed, scaled), 1.0
    if kind == "freq_factors":   # llama.cpp's rope_freqs.weight (Llama 3.1+ GGUFs): one divisor per frequency
        return inv_freq / torch.tensor(scaling["freq_factors"], dtype=torch.float32), 1.0
    if kind == "yarn":
        return _yarn(cfg, scaling, base, dim, exponents)
    if kind == "longrope":
        old_ctx = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or cfg.context / old_ctx
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (ext * base ** exponents), attention
    return inv_freq, 1.0


def _yarn(cfg: ModelConfig, s: dict, base: float, dim: int, exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5's long context): low frequencies interpolated, high ones kept, a ramp between;
    transformers' _compute_yarn_parameters step by step."""
    old_ctx = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.context / old_ctx

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** exponents
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Halves rotated, as Hugging Face's Llama: weights import with no permutation.
    if cos.shape[-1] < x.shape[-1]:   # partial RoPE: the rest of each head passes through
        d = cos.shape[-1]
        return torch.cat((apply_rope(x[..., :d], cos, sin), x[..., d:]), dim=-1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def cache_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """Keys and values stay in float32 on the CPU even for half-precision weights: the CPU's
    half-precision attention is several times slower than float32's, the cache is small next
    to the weights, and attention only gets more exact."""
    if torch.device(device).type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


class KVCache:
    """Keys and values for every layer; `pos` is how many positions are filled.

    Room grows on demand (doubling, up to `max_len`): a chat with a 32k-context model would
    otherwise hold hundreds of MB of zeros from its first message."""

    GROW = 256   # positions allocated at first, and the least a growth adds

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        self.max_len = max_len
        first = (batch, cfg.n_kv_head, min(max_len, self.GROW), cfg.head_dim)
        self.k = [torch.zeros(first, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(first, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = 0
        self.long_rope = False   # longrope models: the cached keys took the long factors

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, length: int) -> None:
        """Room for `length` positions in every row, keeping what is there. Capacity grows in buckets
        (doubling), so a decode step's shapes change a handful of times per sequence, not per token."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens is longer than the cache's {self.max_len}")
        size = min(self.max_len, max(length, 2 * self.capacity))
        old = self.capacity
        for tensors in (self.k, self.v):
            for i, t in enumerate(tensors):
                grown = t.new_zeros(t.shape[0], t.shape[1], size, t.shape[3])
                grown[:, :, :old] = t
                tensors[i] = grown

    def truncate(self, pos: int) -> None:
        """Forget everything from `pos` on (regenerate, edit an earlier message)."""
        self.pos = min(self.pos, pos)

    def rows(self, start: int, stop: int) -> "KVCache":
        """An empty cache over rows [start, stop) that shares this one's memory: prefilling a batch
        slot through it writes straight into the batch. It cannot grow (grow the whole cache first)."""
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.max_len = self.capacity
        view.pos = 0
        view.long_rope = False
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` over row `dst` in every layer (a batch keeps its live rows first)."""
        for tensors in (self.k, self.v):
            for t in tensors:
                t[dst] = t[src]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class AttentionCapture:
    """One layer's attention, every tensor shaped (batch, heads, ...)."""
    q: torch.Tensor        # (B, H, T, d_head), after RoPE
    k: torch.Tensor        # (B, H, S, d_head), kv heads repeated to H
    v: torch.Tensor        # (B, H, S, d_head)
    scores: torch.Tensor   # (B, H, T, S)  q·k
    scaled: torch.Tensor   # (B, H, T, S)  q·k · scale (soft-capped if the model does), hidden positions -inf
    weights: torch.Tensor  # (B, H, T, S)  softmax(scaled); each row sums to 1
    output: torch.Tensor   # (B, H, T, d_head)  weights @ v
    scale: float = 0.0     # what q·k was multiplied by
    window: int | None = None   # positions each query sees (itself included); None: all before it
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap), before the mask


def _cpu_autocast() -> bool:
    """Whether CPU autocast is on (torch 2.4 asks by device type; older torch has its own function)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()


def attention_mask(T: int, S: int, start: int, window: int | None, device) -> torch.Tensor:
    """(T, S) True where query start+i may see key j: j <= start+i, and j > start+i-window in a
    sliding-window layer (transformers' sliding_window_overlay)."""
    q = torch.arange(start, start + T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    allowed = j <= q
    if window is not None:
        allowed &= j > q - window
    return allowed


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_out = (self.n_head + 2 * self.n_kv) * self.hd
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=cfg.bias or cfg.proj_bias)
        # Qwen3 and Gemma 3 normalise each head of q and k before RoPE.
        self.q_norm = make_norm(cfg, self.hd) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, self.hd) if cfg.qk_norm else None
        self.window = cfg.window(layer)
        self.scale = cfg.attn_scale           # None: SDPA's own 1/sqrt(head_dim)
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout

    def _split(self, x, rope):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x, rope, cache: KVCache | None, layer: int, capture: bool = False):
        B, T, _ = x.shape
        q, k, v = self._split(x, rope)
        start = 0
        if cache is not None:
            start = cache.pos
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k = cache.k[layer][:, :, :start + T]
            v = cache.v[layer][:, :, :start + T]
        if capture:
            y, cap = self._explained(q, k, v, start)
        else:  # the cache may hold float32 for half-precision weights (see cache_dtype)
            y, cap = self._fast(q.to(k.dtype), k, v, start).to(q.dtype), None
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        return self.proj(y), cap

    def _fast(self, q, k, v, start):
        T, S = q.shape[2], k.shape[2]
        window = self.window
        if T == 1 and window is not None and S > window:
            # One new token in a sliding-window layer sees only the last `window` keys.
            k, v, start, S = k[:, :, S - window:], v[:, :, S - window:], start - (S - window), window
        if self.softcap is not None:   # SDPA cannot soft-cap the scores
            return self._explicit(q, k, v, start, window)[0]
        gqa = self.n_kv != self.n_head
        if gqa and not _SDPA_HAS_GQA:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        extra = {"enable_gqa": True} if gqa else {}
        if self.scale is not None:
            extra["scale"] = self.scale
        if q.is_cuda and _GPU_BACKENDS is not None and not torch.is_grad_enabled():   # inference only
            with _GPU_BACKENDS():
                return self._sdpa(q, k, v, start, T, S, window, extra)
        return self._sdpa(q, k, v, start, T, S, window, extra)

    def _sdpa(self, q, k, v, start, T, S, window, extra):
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and _cpu_autocast():
            # Training under CPU bf16 autocast: torch's CPU flash attention is 3-4x slower in bfloat16
            # than in float32 (forward + backward, 4 heads of 32 over 64 positions: 4.4 against 1.5 ms
            # with the casts), so attention runs in float32 and only the matrix products in bf16.
            with torch.autocast("cpu", enabled=False):
                return self._sdpa(q.float(), k.float(), v.float(), start, T, S, window, extra).to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        if T == 1 or (start == 0 and T == S and (window is None or window >= T)):
            # One new token sees everything before it; a fresh prompt is plain causal.
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout, **extra)
        # Several new tokens after a cached prefix (forced tool results), or a window: explicit mask.
        mask = attention_mask(T, S, start, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **extra)

    def _explicit(self, q, k, v, start, window):
        """Attention written out, as transformers' eager path: scores, scale, soft-cap, mask, softmax
        in float32. Returns the output in q's dtype and the intermediate tensors."""
        rep = self.n_head // self.n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        T, S = q.shape[2], k.shape[2]
        scores = q @ k.transpose(-2, -1)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.hd)
        scaled = scores * scale
        if self.softcap is not None:
            scaled = torch.tanh(scaled / self.softcap) * self.softcap
        scaled = scaled.masked_fill(~attention_mask(T, S, start, window, q.device), float("-inf"))
        weights = torch.softmax(scaled.float(), dim=-1).to(q.dtype)
        if self.training and self.dropout:
            weights = F.dropout(weights, self.dropout)
        out = weights @ v
        return out, (k, v, scores, scaled, weights, scale)

    def _explained(self, q, k, v, start):
        qf = q.float()
        out, (kf, vf, scores, scaled, weights, scale) = self._explicit(qf, k.float(), v.float(), start, self.window)
        cap = AttentionCapture(q=qf, k=kf, v=vf, scores=scores, scaled=scaled, weights=weights, output=out,
                               scale=scale, window=self.window, softcap=self.softcap)
        return out.to(q.dtype), cap


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.geglu = cfg.mlp == "geglu"
        # A gated MLP's gate and up projections are one matrix: [gate; up].
        width = 2 * cfg.d_ff if cfg.gated else cfg.d_ff
        self.fc = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def activate(self, h):
        """The nonlinearity between fc and proj (shared with the one-token decode step)."""
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.geglu:   # Gemma: tanh GELU on the gate
            gate, up = h.chunk(2, dim=-1)
            return F.gelu(gate, approximate="tanh") * up
        return F.gelu(h, approximate="tanh")

    def forward(self, x):
        return self.dropout(self.proj(self.activate(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        # Gemma also normalises what attention and the MLP add to the residual stream.
        self.post_attn_norm = make_norm(cfg) if cfg.post_norms else None
        self.post_mlp_norm = make_norm(cfg) if cfg.post_norms else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache, layer, capture=False):
        a, cap = self.attn(self.ln1(x), rope, cache, layer, capture)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + self.dropout(a)
        m = self.mlp(self.ln2(x))
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return x + m, cap


def _plain(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks)


def _linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) without the module-call overhead when m is a plain nn.Linear; anything that wraps or
    hooks it (an adapter, a probe) still goes through the module."""
    if type(m) is nn.Linear and _plain(m):
        return F.linear(x, m.weight, m.bias)
    if type(m) in (Int8Linear, HalfLinear, BlockLinear) and _plain(m):   # checked second: the float path pays nothing for it
        return m.forward(x)
    return m(x)


def _norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m) is nn.LayerNorm and _plain(m):
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    return m(x)


def decode_masks(windows, pos: torch.Tensor, capacity: int) -> dict:
    """{window: (B, 1, 1, capacity) bool mask} for one new token per row at positions `pos`, one per
    distinct window of the model's layers: True where the row may attend (filled positions up to its
    own, within the window if any)."""
    slots = torch.arange(capacity, device=pos.device)
    seen = slots[None, :] <= pos[:, None]
    masks = {}
    for window in windows:
        m = seen if window is None else seen & (slots[None, :] > pos[:, None] - window)
        masks[window] = m[:, None, None, :]
    return masks


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """One query per row against keys and values: q (B, H, 1, hd), k and v (B, KV, S, hd), mask
    (B, 1, 1, S), True where a row may look, or None where every key is visible.

    For one row on the CPU, PyTorch's fused attention is the fastest (one call instead of five; with
    more rows it is slower than the products below). Otherwise, two matrix products and a softmax: the
    same on every GPU, no attention backend to choose (on Hopper, cuDNN's attention re-plans for every
    new key length: 5 ms a call), and nothing a CUDA graph cannot capture. Grouped-query heads share
    their kv head through a reshape."""
    B, H, _, hd = q.shape
    KV = k.shape[1]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    if q.device.type == "cpu" and B == 1 and (KV == H or _SDPA_HAS_GQA) and softcap is None:
        gqa = {"enable_gqa": True} if KV != H else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    scores = (q.view(B, KV, H // KV, hd) @ k.transpose(-2, -1)) * scale    # (B, KV, H/KV, S)
    if softcap is not None:   # Gemma 2: scores -> softcap * tanh(scores / softcap), before the mask
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).view(B, H, 1, hd)
