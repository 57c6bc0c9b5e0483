"""One configurable decoder-only Transformer.

GPT-2 style (LayerNorm, learned positions, GELU, biases) and Llama style
(RMSNorm, RoPE, SwiGLU, grouped-query attention, optional q/k/v bias) are the
same network with different switches in ModelConfig; so are Llama's relatives
(Mistral and Qwen2's sliding windows, Qwen3's q/k norms, Phi-3's partial and
long RoPE, Gemma 3's norms, scales and soft-caps). A switch that is off costs
nothing.

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
import threading

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .config import ModelConfig
from .half import HalfLinear
from .layers import (Block, KVCache, _linear, _norm, apply_rope, cache_dtype, decode_attention, decode_masks,
                     make_norm, rope_frequencies)
from .blockquant import BlockEmbedding, BlockLinear
from .quant import Int8Embedding, Int8Linear


# torch.nn.init's functions that layers call while they are built; Transformer.empty skips them.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
_EMPTY_LOCK = threading.Lock()   # the functions are swapped process-wide: one empty build at a time
_BUILDING = threading.local()    # ...but skipped only on the thread building: others initialise as ever


def _skipping(original):
    def init(tensor, *args, **kwargs):
        if getattr(_BUILDING, "active", False):
            return tensor
        return original(tensor, *args, **kwargs)
    return init


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Ids from here on are rows no token owns (a vocabulary padded to a round size, Sol's or an
        # imported model's): logits() gives them -inf, so nothing samples, shows or scores them. Set by
        # whoever pairs the model with its tokenizer (load_model, a new training run).
        self.vocab_limit: int | None = None
        # The activations' dtype where it differs from the weights': float32 for a CPU model whose float16
        # linear layers run in fbgemm (core/model/half.py), which takes and gives float32. Any move or cast of
        # the model (_apply) puts it back to None, the weights' own dtype.
        self.act_dtype: torch.dtype | None = None
        # Training: recompute each block's activations in the backward pass instead of keeping them (activation
        # checkpointing): about a third more time for the memory of one block's activations instead of all.
        self.recompute_blocks = False
        # RoPE tables: ("full",) or, for Gemma 3, ("full", "local"); each layer's index into them.
        local = cfg.rope_local_theta is not None
        self._rope_kinds = ("full", "local") if local else ("full",)
        self._rope_of = [int(local and (cfg.layer_types is None or t == "sliding_attention"))
                         for t in (cfg.layer_types or [None] * cfg.n_layer)]
        self._rope_tables: dict = {}
        self._windows = frozenset(cfg.window(i) for i in range(cfg.n_layer))   # the decode step's masks
        scaling = cfg.rope_scaling or {}
        # longrope switches every position to its long factors once the sequence outgrows this length.
        self.rope_switch = (scaling["original_max_position_embeddings"]
                            if scaling.get("rope_type", scaling.get("type")) == "longrope" else None)
        self.apply(self._init_weights)
        # GPT-2's scaled init for residual projections keeps activations steady with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @classmethod
    def empty(cls, cfg: ModelConfig) -> "Transformer":
        """A Transformer with the right shapes and no weights yet (on the meta device), for a loader to
        assign the loaded tensors to. Nothing is initialised: on the meta device torch's init functions
        run through its Python reference kernels, and the first call imports torch._dynamo (2.5 s)."""
        with _EMPTY_LOCK, torch.device("meta"):
            saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
            try:
                for name, fn in saved.items():
                    setattr(nn.init, name, _skipping(fn))
                _BUILDING.active = True
                return cls(cfg)
            finally:
                _BUILDING.active = False
                for name, fn in saved.items():
                    setattr(nn.init, name, fn)

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
        e = self.embed
        return e.device if type(e) is BlockEmbedding else e.weight.device

    @property
    def dtype(self):
        """The weights' float dtype (an int8 model's: that of its scales and activations)."""
        e = self.embed
        return e.dtype if type(e) in (Int8Embedding, BlockEmbedding) else e.weight.dtype

    def num_parameters(self) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        # int8 and packed float16 weights are buffers; a tied head's own copy is the embedding, counted once.
        n += sum(m.in_features * m.out_features for name, m in self.named_modules()
                 if type(m) in (Int8Linear, HalfLinear, BlockLinear) and not (name == "lm_head" and self.cfg.tie_embeddings))
        e = self.embed
        return n + (e.weight.numel() if type(e) is Int8Embedding else
                    e.num_embeddings * e.embedding_dim if type(e) is BlockEmbedding else 0)

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, batch, max_len or self.cfg.context, self.device, cache_dtype(self.device, self.dtype))

    def _rope_table(self, kind: str, end: int):
        """cos and sin for positions 0.. at least `end` (the whole context), in the model's dtype. Built
        once: captured decode steps (CUDA graphs) keep reading the table they were captured with."""
        t = self._rope_tables.get(kind)
        if t is None or t[0].shape[0] < end or t[0].device != self.device or t[0].dtype != self.dtype:
            n = max(end, self.cfg.context)
            # Frequencies straight from the config in float32, never a half-precision copy.
            inv_freq, factor = rope_frequencies(self.cfg, local=kind == "local", long=kind == "long")
            pos = torch.arange(n, device=self.device, dtype=torch.float32)
            freqs = torch.outer(pos, inv_freq.to(self.device))
            emb = torch.cat((freqs, freqs), dim=-1)
            t = self._rope_tables[kind] = ((emb.cos() * factor).to(self.dtype), (emb.sin() * factor).to(self.dtype))
        return t

    def _rope(self, start: int, T: int) -> tuple:
        """(cos, sin) for positions start..start+T-1, one pair per kind of layer (see _rope_of)."""
        end = start + T
        ropes = []
        for kind in self._rope_kinds:
            if kind == "full" and self.rope_switch is not None and end > self.rope_switch:
                kind = "long"
            cos, sin = self._rope_table(kind, end)
            ropes.append((cos[start:end], sin[start:end]))
        return tuple(ropes)

    def _decode_ropes(self, pos: torch.Tensor, capacity: int) -> tuple:
        """Like _rope, for one token per row at positions `pos` (B,): each (cos, sin) is (B, 1, 1, rope dim).
        With longrope, rows whose sequence has passed the switch take the long factors."""
        B = pos.shape[0]
        ropes = []
        for kind in self._rope_kinds:
            cos, sin = self._rope_table(kind, capacity)
            cos, sin = cos[pos], sin[pos]
            if kind == "full" and self.rope_switch is not None:
                far = (pos >= self.rope_switch).view(B, 1)
                long_cos, long_sin = self._rope_table("long", capacity)
                cos, sin = torch.where(far, long_cos[pos], cos), torch.where(far, long_sin[pos], sin)
            ropes.append((cos.view(B, 1, 1, -1), sin.view(B, 1, 1, -1)))
        return tuple(ropes)

    def _check_switch(self, cache: KVCache | None, start: int, end: int) -> None:
        """longrope: a sequence longer than the switch takes the long factors at every position, a shorter
        one the short ones. Cached keys of the other kind are wrong: transformers recomputes them all, and
        so must the caller (Session.feed does); here it is an error, never a silently different answer."""
        if cache is None:
            return
        long = end > self.rope_switch
        if start > 0 and long != cache.long_rope:
            raise ValueError(f"the sequence {'passes' if long else 'is back within'} {self.rope_switch} tokens, "
                             "where this model's RoPE factors change: run it again from the start without the cache")
        cache.long_rope = long

    def _apply(self, fn, recurse=True):
        self.act_dtype = None
        self.__dict__["_plan"] = None   # a move or cast: the scripted step's plan is built again
        return super()._apply(fn, recurse)

    def _lookup(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        return x if self.act_dtype is None else x.to(self.act_dtype)

    def _embed(self, idx, start):
        T = idx.shape[1]
        x = self._lookup(idx)
        if self.cfg.scale_embeddings:   # Gemma: sqrt(d_model), rounded to the weights' dtype as transformers does
            x = x * torch.tensor(self.cfg.d_model ** 0.5).to(x.dtype)
        ropes = None
        if self.pos_embed is not None:
            if start + T > self.cfg.context:
                raise ValueError(f"sequence of {start + T} tokens is longer than the context of {self.cfg.context}")
            x = x + self.pos_embed(torch.arange(start, start + T, device=idx.device))
        else:
            ropes = self._rope(start, T)
        return self.drop(x), ropes

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, d_model): what the LM head and a reward head read."""
        if cache is not None and idx.shape[1] == 1 and not self.training:
            return self._step(idx, cache)
        start = cache.pos if cache is not None else 0
        if self.rope_switch is not None:
            self._check_switch(cache, start, start + idx.shape[1])
        x, ropes = self._embed(idx, start)
        if cache is not None:
            cache.reserve(start + idx.shape[1])
        again = self.recompute_blocks and cache is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            rope = ropes and ropes[self._rope_of[i]]
            if again:   # keep only each block's input; its activations are made again in the backward pass
                x, _ = torch.utils.checkpoint.checkpoint(block, x, rope, None, i, use_reentrant=False)
            else:
                x, _ = block(x, rope, cache, i)
        if cache is not None:
            cache.pos = start + idx.shape[1]
        return self.norm(x)

    def _step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """hidden() for one new token per sequence, every row at the cache's position."""
        cache.reserve(cache.pos + 1)
        if self.pos_embed is not None and cache.pos >= self.cfg.context:
            raise ValueError(f"sequence of {cache.pos + 1} tokens is longer than the context of {self.cfg.context}")
        if self.rope_switch is not None:
            self._check_switch(cache, cache.pos, cache.pos + 1)
        pos = torch.full((idx.shape[0],), cache.pos, dtype=torch.long, device=idx.device)
        h = self.decode(idx, pos, cache)
        cache.pos += 1
        return h

    def decode(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, at: int | None = None) -> torch.Tensor:
        """Final hidden states (B, 1, d_model) for one new token per row; row b's token is at position
        pos[b] and rows b < B use the cache's first B rows. Reads and writes the cache but never moves
        `cache.pos`: the caller owns the positions (a batch holds sequences of different lengths).

        Every shape here depends on B and the cache's capacity only, never on the positions: attention
        reads the whole capacity under a mask. So the same step serves every token of a sequence, which is
        what lets CUDA capture it in a graph (and GPU attention kernels not re-plan per key length).
        The same arithmetic as hidden(), with fewer Python calls and tensor views per layer: decoding one
        token is only a few microseconds of work per operation, so on a small model the per-call
        overhead is much of the time.

        `at`: one row's position as a Python int, for the CPU's eager step, where nothing is captured
        and no kernel re-plans: attention then reads only the filled part of the cache (on average half
        of it, or less) with no mask to build, and the key and value are written by a plain copy. That
        one-row loop runs in TorchScript (core/model/cpu_step.py) where the model allows: the same operations,
        without Python's 2-3 µs a call."""
        B = idx.shape[0]
        H, KV, hd = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        x = self._lookup(idx)
        if self.cfg.scale_embeddings:
            x = x * torch.tensor(self.cfg.d_model ** 0.5).to(x.dtype)
        ropes = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos).unsqueeze(1)
        else:
            ropes = self._decode_ropes(pos, cache.capacity)
        masks = decode_masks(self._windows, pos, cache.capacity) if at is None else None
        if (at is None or B == 1) and x.device.type == "cpu" and not torch.is_grad_enabled():
            plan = self._cpu_plan()
            if plan is not None:   # the same loop, run by TorchScript (core/model/cpu_step.py)
                return plan.run(x, pos, at, cache, ropes, masks)
        if at is None:
            where = pos.view(B, 1, 1, 1).expand(B, KV, 1, hd)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            # With one position, (B, 1, heads, hd) -> (B, heads, 1, hd) is a plain view.
            q, k, v = _linear(attn.qkv, _norm(block.ln1, x)).view(B, H + 2 * KV, 1, hd).split([H, KV, KV], dim=1)
            if attn.q_norm is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            if ropes is not None:
                rope = ropes[self._rope_of[i]]
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if at is None:
                keys, values = cache.k[i][:B], cache.v[i][:B]
                keys.scatter_(2, where, k.to(keys.dtype))
                values.scatter_(2, where, v.to(values.dtype))
                mask = masks[attn.window]
            else:
                cache.k[i][:1, :, at:at + 1].copy_(k)
                cache.v[i][:1, :, at:at + 1].copy_(v)
                start = 0 if attn.window is None else max(0, at + 1 - attn.window)
                keys, values = cache.k[i][:1, :, start:at + 1], cache.v[i][:1, :, start:at + 1]
                mask = None
            y = decode_attention(q.to(keys.dtype), keys, values, mask, attn.scale, attn.softcap).to(x.dtype)
            a = _linear(attn.proj, y.view(B, 1, H * hd))
            x = x + (a if block.post_attn_norm is None else block.post_attn_norm(a))
            m = _linear(mlp.proj, mlp.activate(_linear(mlp.fc, _norm(block.ln2, x))))
            x = x + (m if block.post_mlp_norm is None else block.post_mlp_norm(m))
        return _norm(self.norm, x)

    def _cpu_plan(self):
        """The scripted one-row CPU step's plan for this model (core/model/cpu_step.py), rebuilt when the model
        changed under it; None where that step cannot run it. Checked in full only after a change to some
        module's structure or hooks (core/model/changes.py): a full check reads every layer's modules, and done
        every token it cost 9-15 % of a 124M model's decoding (cold caches after the weights stream by)."""
        from . import changes, cpu_step
        plan = self.__dict__.get("_plan")
        mark = changes.mark()
        if plan is None or (plan.needs_check(mark) and not plan.valid()):
            plan = self.__dict__["_plan"] = cpu_step.build(self) if cpu_step.scripted() else cpu_step.Refusal()
        plan.mark = mark   # until some module somewhere changes, nothing needs checking again
        return plan if type(plan) is cpu_step.Plan else None

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab). With a cache, `idx` continues the cached sequence.
        `last_only` computes logits for the final position only (generation needs no more)."""
        h = self.hidden(idx, cache)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head over hidden states (and Gemma's final soft-cap)."""
        logits = self.lm_head(h)
        cap = self.cfg.logit_softcap
        if cap is not None:   # Gemma's final soft-cap
            logits = torch.tanh(logits / cap) * cap
        limit = self.vocab_limit
        if limit is not None and limit < logits.shape[-1]:
            # In training too: a padded id then takes no probability and gets no gradient, so the loss is
            # exactly the unpadded model's, and the padded rows never learn anything to sample.
            if logits.requires_grad and type(self.lm_head) is not nn.Linear:
                # A frozen int8 or block head's output comes from a custom autograd node, which torch does not
                # let a view of be changed in place (a LoRA run's RL and reward stages): a new tensor then.
                cols = torch.arange(logits.shape[-1], device=logits.device) >= limit
                return logits.masked_fill(cols, float("-inf"))
            logits[..., limit:] = float("-inf")
        return logits

    @torch.no_grad()
    def forward_with_attention(self, idx: torch.Tensor, layers=None, need_logits: bool = True):
        """Logits plus {layer: AttentionCapture} for the chosen layers (all when None).

        Memory grows as layers x heads x T^2, so the visualizer asks for one layer at a time;
        with need_logits=False it stops after the last wanted layer and returns None for logits."""
        wanted = set(range(self.cfg.n_layer)) if layers is None else set(layers)
        x, ropes = self._embed(idx, 0)
        captures = {}
        for i, block in enumerate(self.blocks):
            x, cap = block(x, ropes and ropes[self._rope_of[i]], None, i, capture=i in wanted)
            if cap is not None:
                captures[i] = cap
            if not need_logits and len(captures) == len(wanted):
                return None, captures  # nothing later is needed
        return self.logits(self.norm(x)), captures

    @torch.no_grad()
    def residuals(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream (B, T, d_model) after the embedding and after each block: n_layer + 1
        tensors. self.logits(self.norm(last)) is forward()'s output; the earlier ones through the same
        norm and head are the logit lens."""
        x, ropes = self._embed(idx, 0)
        out = [x]
        for i, block in enumerate(self.blocks):
            x, _ = block(x, ropes and ropes[self._rope_of[i]], None, i)
            out.append(x)
        return out
