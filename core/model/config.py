"""ModelConfig: every number and switch that shapes a Transformer, plus presets.

One config covers both families Sol speaks:
- GPT-2 style: LayerNorm, learned positions, GELU MLP, biases everywhere.
- Llama style: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention,
  optional q/k/v bias (Qwen2), tied or untied embeddings.
The Llama style's relatives are switches on it: sliding-window layers (Mistral, Qwen2, Gemma),
per-head q/k norms (Qwen3, Gemma 3), partial RoPE (Phi-3/4), and Gemma's scaled embeddings,
(1 + weight) norms, norms after attention and MLP, GeGLU and tanh soft-capping (Gemma 2).
Every switch defaults to off, which is the plain GPT-2/Llama network.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import SolError


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None      # None: same as n_head (no GQA)
    d_model: int = 384
    d_ff: int | None = None           # None: 4 * d_model (gelu) or Llama's 8/3 rule (swiglu)
    head_dim: int | None = None       # None: d_model // n_head
    context: int = 256
    norm: str = "layernorm"           # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    positions: str = "learned"        # "learned" | "rope"
    mlp: str = "gelu"                 # "gelu" (tanh approximation, as GPT-2) | "swiglu" | "geglu" (Gemma)
    bias: bool = True                 # biases on every linear layer (GPT-2)
    qkv_bias: bool = False            # biases on q/k/v only (Qwen2)
    proj_bias: bool = False           # a bias on the attention output too (Llama's attention_bias)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear"|"yarn"|"longrope", ...} as in HF configs,
    #                                   or {"rope_type": "freq_factors", "freq_factors": [...]} from a GGUF's rope_freqs
    rope_dim: int | None = None       # dimensions of each head that RoPE rotates; None: all (Phi-4-mini: 3/4)
    rope_local_theta: float | None = None  # sliding-window layers' RoPE base, when it differs (Gemma 3)
    sliding_window: int | None = None      # each position sees itself and the window - 1 before it
    layer_types: list | None = None   # "full_attention" | "sliding_attention" per layer; None: all sliding
    qk_norm: bool = False             # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False       # RMSNorm scales by (1 + weight) (Gemma)
    post_norms: bool = False          # norms on the attention and MLP outputs before the residual add (Gemma)
    scale_embeddings: bool = False    # embeddings times sqrt(d_model) (Gemma)
    attn_scale: float | None = None   # q·k scale; None: 1/sqrt(head_dim)
    attn_softcap: float | None = None   # scores -> cap * tanh(scores / cap) before the mask
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    dropout: float = 0.0
    architecture: str = "sol"         # what it was imported from: sol, gpt2, llama, qwen2, mistral
    extra: dict = field(default_factory=dict)  # e.g. special token ids read from an imported config

    def __post_init__(self):
        self._check_values()
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise SolError(f"config: d_model {self.d_model} is not divisible by n_head {self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            if self.gated:
                hidden = int(2 * 4 * self.d_model / 3)
                self.d_ff = 64 * ((hidden + 63) // 64)
            else:
                self.d_ff = 4 * self.d_model
        if self.n_head % self.n_kv_head:
            raise SolError(f"config: n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("positions", ("learned", "rope")),
                              ("mlp", ("gelu", "swiglu", "geglu"))):
            if getattr(self, name) not in allowed:
                raise SolError(f"config: {name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer:
                raise SolError(f"config: layer_types has {len(self.layer_types)} entries for {self.n_layer} layers")
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise SolError(f"config: layer_types may hold full_attention and sliding_attention, not {bad[0]!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise SolError(f"config: sliding_window must be at least 1, not {self.sliding_window}")

    @property
    def gated(self) -> bool:
        """Whether the MLP is a gated one (gate and up projections, then down)."""
        return self.mlp in ("swiglu", "geglu")

    def window(self, layer: int) -> int | None:
        """How many positions (itself included) a token sees in this layer; None: all before it."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def _check_values(self) -> None:
        """Each number of the right type and in a range a model can have: "768", null, -1, 10^12, NaN or
        Infinity would otherwise fail deep inside torch (or allocate gigabytes first)."""
        for name, (low, high, optional) in INT_LIMITS.items():
            v = getattr(self, name)
            if v is None and optional:
                continue
            if type(v) is not int:
                raise SolError(f"config: {name} must be a whole number, not {v!r}")
            if not low <= v <= high:
                raise SolError(f"config: {name} {v} is out of range ({low} to {high:,})")
        for name, (low, high) in FLOAT_LIMITS.items():
            v = getattr(self, name)
            if type(v) not in (int, float) or not low <= v <= high:   # NaN fails every comparison
                raise SolError(f"config: {name} must be a number from {low} to {high:g}, not {v!r}")
        for name in ("bias", "qkv_bias", "tie_embeddings"):
            if type(getattr(self, name)) is not bool:
                raise SolError(f"config: {name} must be true or false, not {getattr(self, name)!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise SolError(f"config: rope_scaling must be an object or null, not {self.rope_scaling!r}")
        if not isinstance(self.extra, dict):
            raise SolError(f"config: extra must be an object, not {self.extra!r}")

    @property
    def n_params_estimate(self) -> int:
        d, L = self.d_model, self.n_layer
        attn = d * self.head_dim * (self.n_head * 2 + self.n_kv_head * 2)
        mlp = d * self.d_ff * (3 if self.gated else 2)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.context * d if self.positions == "learned" else 0
        return L * (attn + mlp) + emb + pos

    def kv_cache_bytes(self, sequences: int, length: int, bytes_per_value: int) -> int:
        """KV-cache memory for `sequences` sequences of `length` positions: keys and values, for every
        layer, kv head and head dimension."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * length * sequences * bytes_per_value

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SolError(f"{source}: unknown field(s) {', '.join(unknown)}; remove them or check the spelling")
        try:
            return cls(**d)
        except TypeError as e:
            raise SolError(f"{source}: {e}") from None

    def save(self, path: Path) -> None:
        from ..atomic import write_text
        write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


# Bounds past every real model (Llama 3 405B: 126 layers, d_model 16384, 128k context) and short of sizes
# that cannot be allocated. (low, high, may be None)
INT_LIMITS = {"vocab_size": (1, 2**24, False), "n_layer": (1, 4096, False), "n_head": (1, 4096, False),
              "n_kv_head": (1, 4096, True), "d_model": (1, 2**17, False), "d_ff": (1, 2**20, True),
              "head_dim": (1, 2**14, True), "context": (1, 2**24, False)}
FLOAT_LIMITS = {"norm_eps": (0.0, 1.0), "rope_theta": (1e-6, 1e12), "dropout": (0.0, 1.0)}


# Named presets. "gpt2-*" follow the GPT-2 paper's table (the book's Fig. 78);
# "tiny"/"small" are what a laptop CPU trains in minutes.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, d_model=64, context=128),
    "shakespeare-cpu": dict(n_layer=4, n_head=4, d_model=128, context=64),
    "small": dict(n_layer=6, n_head=6, d_model=384, context=256),
    "starter": dict(n_layer=6, n_head=8, d_model=256, context=256),
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, context=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024, context=1024, vocab_size=50257),
    "llama-tiny": dict(n_layer=4, n_head=8, n_kv_head=2, d_model=256, context=512, norm="rmsnorm",
                       norm_eps=1e-6, positions="rope", mlp="swiglu", bias=False, tie_embeddings=True),
}


# A new model's embedding and LM head get a multiple of this many rows (nanoGPT's 50257 -> 50304):
# matrix kernels, GPU tensor cores above all, run fastest on such widths. The extra ids are padding,
# never a token: their logits are -inf (Transformer.vocab_limit).
VOCAB_MULTIPLE = 64


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """n token ids rounded up to a multiple of `multiple` rows (1: no padding)."""
    if multiple < 1:
        raise SolError(f"--vocab-multiple must be 1 or more, not {multiple}")
    return -(-n // multiple) * multiple


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise SolError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
