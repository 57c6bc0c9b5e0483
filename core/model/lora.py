"""LoRA: a frozen linear layer plus small trainable updates, y = W x + b + (alpha / r) · B (A x).

Only A (r × in) and B (out × r) learn; W stays as it was loaded (float32, or Sol's int8 rows, whose
products get a backward pass here for the input's gradient). B starts at zero, so an untrained adapter
changes nothing, and A as PEFT initialises it (Kaiming-uniform, a = √5), so the same seed gives PEFT's
starting point.

Sol fuses q/k/v into one matrix and gate/up into another (core/model/layers.py). A fused layer carries one
adapter per projection it holds -- `parts` names them with PEFT's module names and sizes -- so Sol's
adapters map one to one onto PEFT's `q_proj`/`k_proj`/`v_proj` (and `gate_proj`/`up_proj`) and back.

A layer may hold several named adapters at once (`sol serve --adapter NAME=DIR` serves them from one copy
of the base); `use()` picks which one the model runs -- none, one, or one per batch row.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blockquant import BlockLinear
from .half import HalfLinear
from .quant import Int8Linear

DEFAULT = "default"   # PEFT's name for the adapter a model is trained with
_UNSET = object()
# Per-thread choices of adapter, {id(layer): active}, over each layer's own `active`: `sol serve`'s engine thread
# runs a batch mixing adapters while a route's thread scores a prompt with another, on one copy of the model.
_here = threading.local()


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False   # PEFT's use_rslora: scaling alpha / sqrt(r) instead of alpha / r

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# PEFT's module names for the projections of attention and the MLP, per layout.
LLAMA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
GPT2_NAMES = ("c_attn", "c_proj", "c_fc")
DEFAULT_TARGETS = ("attention", "mlp")   # every projection of both


def layout(cfg) -> str:
    """Which Hugging Face layout the model's adapters are named after: gpt2, phi3 or llama (the rest of
    the family, and Sol's own rope models)."""
    if cfg.architecture == "gpt2" or (cfg.architecture == "sol" and cfg.positions == "learned"):
        return "gpt2"
    return "phi3" if cfg.architecture == "phi3" else "llama"


def projections(cfg, block: int) -> dict[str, tuple[str, list[tuple[str, int]]]]:
    """{Sol module name: (Hugging Face module prefix, [(PEFT name, output rows), ...])} for one block."""
    q, kv, d, ff = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_model, cfg.d_ff
    b = f"blocks.{block}."
    kind = layout(cfg)
    if kind == "gpt2":
        h = f"transformer.h.{block}."
        return {b + "attn.qkv": (h + "attn.", [("c_attn", q + 2 * kv)]), b + "attn.proj": (h + "attn.", [("c_proj", d)]),
                b + "mlp.fc": (h + "mlp.", [("c_fc", ff)]), b + "mlp.proj": (h + "mlp.", [("c_proj", d)])}
    h = f"model.layers.{block}."
    qkv = [("qkv_proj", q + 2 * kv)] if kind == "phi3" else [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
    fc = [("gate_up_proj", 2 * ff)] if kind == "phi3" else [("gate_proj", ff), ("up_proj", ff)]
    return {b + "attn.qkv": (h + "self_attn.", qkv), b + "attn.proj": (h + "self_attn.", [("o_proj", d)]),
            b + "mlp.fc": (h + "mlp.", fc), b + "mlp.proj": (h + "mlp.", [("down_proj", d)])}


def all_names(cfg) -> tuple[str, ...]:
    return {"gpt2": GPT2_NAMES, "phi3": PHI3_NAMES}.get(layout(cfg), LLAMA_NAMES)


def expand_targets(cfg, targets: list[str]) -> set[str]:
    """PEFT module names from --lora-targets: PEFT's own names, Sol's short ones (q, k, v, o, gate, up, down,
    qkv), or the groups `attention`, `mlp` and `all`. An unknown name is an error naming it."""
    from ..errors import SolError
    names = all_names(cfg)
    attention = {n for n in names if n in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn")}
    if layout(cfg) == "gpt2":
        attention.add("c_proj")   # GPT-2's c_proj is both attention's output and the MLP's
    mlp = set(names) - attention | ({"c_proj"} if layout(cfg) == "gpt2" else set())
    out: set[str] = set()
    for t in targets:
        t = t.strip()
        if t in ("all", "all-linear"):
            out |= set(names)
        elif t == "attention":
            out |= attention
        elif t == "mlp":
            out |= mlp
        elif t in names:
            out.add(t)
        elif f"{t}_proj" in names:
            out.add(f"{t}_proj")
        elif t:
            raise SolError(f"--lora-targets {t!r}: matches no layer of this {cfg.architecture} model; its "
                           f"projections are {', '.join(names)} (or attention, mlp, all)")
    if not out:
        raise SolError("--lora-targets: names no layer; give e.g. attention,mlp or q,v")
    return out


class Adapter(nn.Module):
    """One adapter's A and B for each targeted part of a layer."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], targets: set[str], r: int,
                 scaling: float, dropout: float, device=None, dtype=torch.float32):
        super().__init__()
        self.r, self.scaling = r, scaling
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, size in parts:
            if name in targets:
                a = torch.empty(r, in_features, device=device, dtype=dtype)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))   # as PEFT's init_lora_weights=True
                self.lora_A[name] = nn.Parameter(a)
                self.lora_B[name] = nn.Parameter(torch.zeros(size, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        if name not in self.lora_A:
            return None
        a = self.lora_A[name]
        # Scaled at rank r, not at the output's width: the same sum (PEFT scales B's output), a fraction of the work.
        return F.linear(F.linear(x, a.to(x.dtype)) * self.scaling, self.lora_B[name].to(x.dtype))


class LoraLinear(nn.Module):
    """A frozen linear layer (nn.Linear, Int8Linear, HalfLinear or BlockLinear) with named adapters."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]]):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.parts = parts
        self.in_features, self.out_features = base.in_features, base.out_features
        assert sum(s for _, s in parts) == self.out_features, (parts, self.out_features)
        self.adapters = nn.ModuleDict()
        self.active: str | list | None = None   # an adapter's name, one per batch row, or None (the base)

    def add(self, name: str, targets: set[str], r: int, scaling: float, dropout: float = 0.0) -> Adapter:
        dev = _device_of(self.base)
        a = Adapter(self.in_features, self.parts, targets, r, scaling, dropout, device=dev)
        self.adapters[name] = a
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)   # Sol's own kernels pass the input's gradient through (core/model/frozen.py)
        chosen = getattr(_here, "active", None)
        active = self.active if not chosen else chosen.get(id(self), self.active)
        if active is None or not self.adapters:
            return y
        if isinstance(active, str):
            return y + self._delta(self.adapters[active], x, y) if active in self.adapters else y
        rows = []   # one adapter per batch row (a served batch mixing models)
        for i, name in enumerate(active):
            yi = y[i:i + 1]
            rows.append(yi + self._delta(self.adapters[name], x[i:i + 1], yi) if name in self.adapters else yi)
        return torch.cat(rows)

    def _delta(self, adapter: Adapter, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = adapter.dropout(x)
        pieces = []
        for name, size in self.parts:
            d = adapter.delta(h, name)
            pieces.append(d if d is not None else y.new_zeros(*y.shape[:-1], size))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)

    def merged_weight(self, name: str) -> torch.Tensor:
        """The float32 weight with adapter `name` folded in: W + scaling · B A per part."""
        w = dense_weight(self.base).clone()
        a = self.adapters[name]
        start = 0
        for part, size in self.parts:
            if part in a.lora_A:
                w[start:start + size] += a.scaling * (a.lora_B[part].float() @ a.lora_A[part].float())
            start += size
        return w

    def extra_repr(self) -> str:
        return f"parts={[p for p, _ in self.parts]}, adapters={list(self.adapters)}"


def _device_of(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


# ---- the base's weight -------------------------------------------------------------------------------
def dense_weight(m: nn.Module, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows start..stop of a linear layer's weight in float32, whatever form it holds them in."""
    stop = m.out_features if stop is None else stop
    if type(m) is nn.Linear:
        return m.weight[start:stop].float()
    if type(m) in (Int8Linear, HalfLinear, BlockLinear):
        return m.float_rows()(start, stop)
    raise TypeError(f"no weight rows for {type(m).__name__}")


# ---- putting adapters on a model ----------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if type(m) is LoraLinear}


def wrap(model: nn.Module) -> dict[str, LoraLinear]:
    """Every attention and MLP projection of the model as a LoraLinear (once; later calls return them)."""
    layers = lora_layers(model)
    if layers:
        return layers
    cfg = model.cfg
    for i, block in enumerate(model.blocks):
        for name, (_, parts) in projections(cfg, i).items():
            owner_name, attr = name.rsplit(".", 1)
            owner = model.get_submodule(owner_name)
            setattr(owner, attr, LoraLinear(getattr(owner, attr), parts))
    _changed()
    return lora_layers(model)


def add_adapter(model: nn.Module, settings: LoraSettings, name: str = DEFAULT) -> list[nn.Parameter]:
    """Freeze the model, add a fresh adapter `name` on the targeted projections, make it the active one,
    and return its parameters (what the optimizer trains). Errors: a rank below 1, targets matching nothing."""
    from ..errors import SolError
    if settings.r < 1:
        raise SolError(f"--lora-r {settings.r}: the rank must be at least 1 (16 is usual)")
    if not settings.alpha > 0:
        raise SolError(f"--lora-alpha {settings.alpha}: must be more than 0 (usually twice the rank)")
    if not 0 <= settings.dropout < 1:
        raise SolError(f"--lora-dropout {settings.dropout}: must be from 0 to below 1")
    targets = expand_targets(model.cfg, settings.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in wrap(model).values():
        a = layer.add(name, targets, settings.r, settings.scaling, settings.dropout)
        params += list(a.parameters())
    use(model, name)
    return params


def use(model: nn.Module, active: str | list | None) -> None:
    """Run the model with adapter `active` (None: the base alone; a list: one name per batch row)."""
    for layer in lora_layers(model).values():
        layer.active = active


def use_here(model: nn.Module, active: str | list | None, layers: list | None = None) -> None:
    """Like use(), for this thread only (other threads keep theirs, or the model's own choice). `layers`:
    the model's lora_layers, where the caller keeps them (a decode loop: no walk over the modules a step)."""
    chosen = getattr(_here, "active", None)
    if chosen is None:
        chosen = _here.active = {}
    for layer in lora_layers(model).values() if layers is None else layers:
        chosen[id(layer)] = active


@contextlib.contextmanager
def here(model: nn.Module, active: str | list | None):
    """use_here() for a block of code, then back to what this thread had."""
    layers = list(lora_layers(model).values())
    chosen = getattr(_here, "active", None)
    if chosen is None:
        chosen = _here.active = {}
    before = {id(layer): chosen.get(id(layer), _UNSET) for layer in layers}
    for layer in layers:
        chosen[id(layer)] = active
    try:
        yield
    finally:
        for k, v in before.items():
            if v is _UNSET:
                chosen.pop(k, None)
            else:
                chosen[k] = v


@contextlib.contextmanager
def using(model: nn.Module, active: str | list | None):
    """use() for a block of code, then back to the model's choice before it."""
    layers = list(lora_layers(model).values())
    before = layers[0].active if layers else None
    for layer in layers:
        layer.active = active
    try:
        yield
    finally:
        for layer in layers:
            layer.active = before


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in lora_layers(model).values():
        for n in layer.adapters:
            if n not in names:
                names.append(n)
    return names


def merge(model: nn.Module, name: str = DEFAULT) -> nn.Module:
    """Fold adapter `name` into float32 nn.Linear layers and drop every LoraLinear: a plain model again."""
    for full, layer in lora_layers(model).items():
        owner_name, attr = full.rsplit(".", 1)
        base = layer.base
        lin = nn.Linear(layer.in_features, layer.out_features, bias=getattr(base, "bias", None) is not None)
        with torch.no_grad():
            lin.weight.copy_(layer.merged_weight(name) if name in layer.adapters else dense_weight(base))
            if lin.bias is not None:
                lin.bias.copy_(base.bias.float())
        setattr(model.get_submodule(owner_name), attr, lin)
    _changed()
    return model


def _changed() -> None:
    """Tell the fast decode paths (which read the layers' types once) that the model's layers changed."""
    from .changes import changed
    changed()
