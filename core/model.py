"""One configurable decoder-only Transformer.

GPT-2 style (LayerNorm, learned positions, GELU, biases) and Llama style
(RMSNorm, RoPE, SwiGLU, grouped-query attention, optional q/k/v bias) are the
same network with different switches in ModelConfig.

Fast path: fused q/k/v and gate/up projections (one matrix product each
instead of three or two: decoding one token is memory-bound, fewer calls
means less overhead), `scaled_dot_product_attention`, and a preallocated KV
cache so decoding never recomputes the prompt.

Slow path, on request: `forward_with_attention` returns, for chosen layers,
q, k, v, the raw scores q·k, the scaled and masked scores, the softmax
weights and the weighted sum of values -- what the attention visualizer
shows step by step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 as Llama does, so half-precision weights give the same result.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for RoPE, with Llama 3 / linear scaling when the config asks for it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Halves rotated, as Hugging Face's Llama: weights import with no permutation.
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
    scaled: torch.Tensor   # (B, H, T, S)  q·k / sqrt(d_head), future positions -inf
    weights: torch.Tensor  # (B, H, T, S)  softmax(scaled); each row sums to 1
    output: torch.Tensor   # (B, H, T, d_head)  weights @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_out = (self.n_head + 2 * self.n_kv) * self.hd
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def _split(self, x, rope):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
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
        gqa = self.n_kv != self.n_head
        if gqa and not _SDPA_HAS_GQA:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        extra = {"enable_gqa": True} if gqa else {}
        if q.is_cuda and _GPU_BACKENDS is not None and not torch.is_grad_enabled():   # inference only
            with _GPU_BACKENDS():
                return self._sdpa(q, k, v, start, T, S, extra)
        return self._sdpa(q, k, v, start, T, S, extra)

    def _sdpa(self, q, k, v, start, T, S, extra):
        dropout = self.dropout if self.training else 0.0
        if T == 1 or (start == 0 and T == S):
            # One new token sees everything before it; a fresh prompt is plain causal.
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout, **extra)
        # Several new tokens after a cached prefix (forced tool results): explicit mask.
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **extra)

    def _explained(self, q, k, v, start):
        rep = self.n_head // self.n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        T, S = q.shape[2], k.shape[2]
        qf, kf, vf = q.float(), k.float(), v.float()
        scores = qf @ kf.transpose(-2, -1)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
        scaled = (scores / math.sqrt(self.hd)).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scaled, dim=-1)
        out = weights @ vf
        cap = AttentionCapture(q=qf, k=kf, v=vf, scores=scores, scaled=scaled, weights=weights, output=out)
        return out.to(q.dtype), cap


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        # SwiGLU's gate and up projections are one matrix: [gate; up].
        width = 2 * cfg.d_ff if self.swiglu else cfg.d_ff
        self.fc = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def activate(self, h):
        """The nonlinearity between fc and proj (shared with the one-token decode step)."""
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h, approximate="tanh")

    def forward(self, x):
        return self.dropout(self.proj(self.activate(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache, layer, capture=False):
        a, cap = self.attn(self.ln1(x), rope, cache, layer, capture)
        x = x + self.dropout(a)
        x = x + self.mlp(self.ln2(x))
        return x, cap


def _plain(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks)


def _linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) without the module-call overhead when m is a plain nn.Linear; anything that wraps or
    hooks it (an adapter, a probe) still goes through the module."""
    if type(m) is nn.Linear and _plain(m):
        return F.linear(x, m.weight, m.bias)
    return m(x)


def _norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m) is nn.LayerNorm and _plain(m):
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    return m(x)


def _window(cfg: ModelConfig, layer: int) -> int | None:
    """The layer's sliding attention window (None: sees every earlier position)."""
    window = getattr(cfg, "window", None)
    return window(layer) if window is not None else None


def decode_masks(cfg: ModelConfig, pos: torch.Tensor, capacity: int) -> dict:
    """{window: (B, 1, 1, capacity) bool mask} for one new token per row at positions `pos`:
    True where the row may attend (filled positions up to its own, within the window if any)."""
    slots = torch.arange(capacity, device=pos.device)
    seen = slots[None, :] <= pos[:, None]
    masks = {}
    for window in {_window(cfg, i) for i in range(cfg.n_layer)}:
        m = seen if window is None else seen & (slots[None, :] > pos[:, None] - window)
        masks[window] = m[:, None, None, :]
    return masks


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One query per row against the cache's full capacity: q (B, H, 1, hd), k and v (B, KV, S, hd),
    mask (B, 1, 1, S), True where a row may look.

    For one row on the CPU, PyTorch's fused attention with a mask is the fastest (one call instead of
    five; with more rows it is slower than the products below). Otherwise, two matrix products and a softmax: the same on every GPU, no attention backend to
    choose (on Hopper, cuDNN's attention re-plans for every new key length: 5 ms a call), and
    nothing a CUDA graph cannot capture. Grouped-query heads share their kv head through a reshape."""
    B, H, _, hd = q.shape
    KV = k.shape[1]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    if q.device.type == "cpu" and B == 1 and (KV == H or _SDPA_HAS_GQA):
        gqa = {"enable_gqa": True} if KV != H else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    scores = (q.view(B, KV, H // KV, hd) @ k.transpose(-2, -1)) * scale    # (B, KV, H/KV, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).view(B, H, 1, hd)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.positions == "rope":
            self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self._rope_cache = None
        self.apply(self._init_weights)
        # GPT-2's scaled init for residual projections keeps activations steady with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, batch, max_len or self.cfg.context, self.device, cache_dtype(self.device, self.dtype))

    def _rope(self, start: int, T: int):
        end = start + T
        rc = self._rope_cache
        if rc is None or rc[0].shape[0] < end or rc[0].device != self.device or rc[0].dtype != self.dtype:
            n = max(end, self.cfg.context)
            t = torch.arange(n, device=self.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(self.device))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cache = rc = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
        return rc[0][start:end], rc[1][start:end]

    def _embed(self, idx, start):
        T = idx.shape[1]
        x = self.embed(idx)
        rope = None
        if self.pos_embed is not None:
            if start + T > self.cfg.context:
                raise ValueError(f"sequence of {start + T} tokens is longer than the context of {self.cfg.context}")
            x = x + self.pos_embed(torch.arange(start, start + T, device=idx.device))
        else:
            rope = self._rope(start, T)
        return self.drop(x), rope

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, d_model): what the LM head and a reward head read."""
        if cache is not None and idx.shape[1] == 1 and not self.training:
            return self._step(idx, cache)
        start = cache.pos if cache is not None else 0
        x, rope = self._embed(idx, start)
        if cache is not None:
            cache.reserve(start + idx.shape[1])
        for i, block in enumerate(self.blocks):
            x, _ = block(x, rope, cache, i)
        if cache is not None:
            cache.pos = start + idx.shape[1]
        return self.norm(x)

    def _step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """hidden() for one new token per sequence, every row at the cache's position."""
        cache.reserve(cache.pos + 1)
        if self.pos_embed is not None and cache.pos >= self.cfg.context:
            raise ValueError(f"sequence of {cache.pos + 1} tokens is longer than the context of {self.cfg.context}")
        pos = torch.full((idx.shape[0],), cache.pos, dtype=torch.long, device=idx.device)
        h = self.decode(idx, pos, cache)
        cache.pos += 1
        return h

    def decode(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Final hidden states (B, 1, d_model) for one new token per row; row b's token is at position
        pos[b] and rows b < B use the cache's first B rows. Reads and writes the cache but never moves
        `cache.pos`: the caller owns the positions (a batch holds sequences of different lengths).

        Every shape here depends on B and the cache's capacity only, never on the positions: attention
        reads the whole capacity under a mask. So the same step serves every token of a sequence, which is
        what lets CUDA capture it in a graph (and GPU attention kernels not re-plan per key length).
        The same arithmetic as hidden(), with fewer Python calls and tensor views per layer: decoding one
        token is only a few microseconds of work per operation, so on a small model the per-call
        overhead is much of the time."""
        B = idx.shape[0]
        H, KV, hd = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        x = self.embed(idx)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos).unsqueeze(1)
        else:
            cos, sin = self._rope(0, cache.capacity)
            rope = cos[pos].view(B, 1, 1, hd), sin[pos].view(B, 1, 1, hd)
        masks = decode_masks(self.cfg, pos, cache.capacity)
        where = pos.view(B, 1, 1, 1).expand(B, KV, 1, hd)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            # With one position, (B, 1, heads, hd) -> (B, heads, 1, hd) is a plain view.
            q, k, v = _linear(attn.qkv, _norm(block.ln1, x)).view(B, H + 2 * KV, 1, hd).split([H, KV, KV], dim=1)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            keys, values = cache.k[i][:B], cache.v[i][:B]
            keys.scatter_(2, where, k.to(keys.dtype))
            values.scatter_(2, where, v.to(values.dtype))
            y = decode_attention(q.to(keys.dtype), keys, values, masks[_window(self.cfg, i)]).to(x.dtype)
            x = x + _linear(attn.proj, y.view(B, 1, H * hd))
            h = mlp.activate(_linear(mlp.fc, _norm(block.ln2, x)))
            x = x + _linear(mlp.proj, h)
        return _norm(self.norm, x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab). With a cache, `idx` continues the cached sequence.
        `last_only` computes logits for the final position only (generation needs no more)."""
        h = self.hidden(idx, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    @torch.no_grad()
    def forward_with_attention(self, idx: torch.Tensor, layers=None, need_logits: bool = True):
        """Logits plus {layer: AttentionCapture} for the chosen layers (all when None).

        Memory grows as layers x heads x T^2, so the visualizer asks for one layer at a time;
        with need_logits=False it stops after the last wanted layer and returns None for logits."""
        wanted = set(range(self.cfg.n_layer)) if layers is None else set(layers)
        x, rope = self._embed(idx, 0)
        captures = {}
        for i, block in enumerate(self.blocks):
            x, cap = block(x, rope, None, i, capture=i in wanted)
            if cap is not None:
                captures[i] = cap
            if not need_logits and len(captures) == len(wanted):
                return None, captures  # nothing later is needed
        return self.lm_head(self.norm(x)), captures
