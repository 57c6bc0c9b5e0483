"""LoRA adapters on disk, as PEFT writes and reads them.

An adapter folder holds
- `adapter_config.json`: PEFT's LoraConfig (peft_type LORA, r, lora_alpha, target_modules,
  base_model_name_or_path, ...), so `peft.PeftModel.from_pretrained(model, folder)` takes it;
- `adapter_model.safetensors`: A and B of every adapted projection under PEFT's names,
  `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (GPT-2 layouts:
  `base_model.model.transformer.h.N.attn.c_attn.lora_A.weight`), and any whole tensors a stage trained
  beside them (a reward head) under their Sol names;
- `sol.json` (Sol's runs only): format "lora", the stage, and the lineage with the base it was trained on.

Sol reads adapters written by peft (transformers + peft, Unsloth, LLaMA-Factory) for the families it runs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..atomic import replace, temp_path_for, write_text
from ..errors import SolError
from ..model import lora
from .loaded import read_json_object

CONFIG, WEIGHTS, LEGACY_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def is_adapter(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


# ---- names ------------------------------------------------------------------------------------------
def peft_keys(cfg) -> dict[tuple[str, str], str]:
    """{(Sol module name, PEFT part name): PEFT module path without PREFIX} for every projection."""
    out = {}
    for i in range(cfg.n_layer):
        for sol_name, (hf_prefix, parts) in lora.projections(cfg, i).items():
            for part, _ in parts:
                out[(sol_name, part)] = hf_prefix + part
    return out


def adapter_tensors(model, name: str = lora.DEFAULT) -> dict[str, torch.Tensor]:
    """PEFT's state dict of adapter `name`: {key: tensor}, float32, contiguous."""
    keys = peft_keys(model.cfg)
    out = {}
    for sol_name, layer in lora.lora_layers(model).items():
        a = layer.adapters[name] if name in layer.adapters else None
        if a is None:
            continue
        for part in a.lora_A:
            base = PREFIX + keys[(sol_name, part)]
            out[base + ".lora_A.weight"] = a.lora_A[part].detach().float().contiguous().cpu()
            out[base + ".lora_B.weight"] = a.lora_B[part].detach().float().contiguous().cpu()
    return out


def peft_config(model, settings: lora.LoraSettings, base_name: str, name: str = lora.DEFAULT) -> dict:
    targets = sorted({part for layer in lora.lora_layers(model).values() if name in layer.adapters
                      for part in layer.adapters[name].lora_A})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": targets, "bias": "none", "use_rslora": settings.rslora, "use_dora": False,
            "fan_in_fan_out": lora.layout(model.cfg) == "gpt2", "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


# ---- write ------------------------------------------------------------------------------------------
def save_adapter(out: str | Path, model, settings: lora.LoraSettings, base_name: str, meta: dict | None = None,
                 extra_tensors: dict | None = None, name: str = lora.DEFAULT) -> Path:
    """Write adapter `name` of `model` as a PEFT adapter folder (atomic files; sol.json last)."""
    from safetensors.torch import save_file
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model, name)
    tensors.update({k: v.detach().float().contiguous().cpu().clone() for k, v in (extra_tensors or {}).items()})
    tmp = temp_path_for(d / WEIGHTS)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    replace(tmp, d / WEIGHTS)
    write_text(d / CONFIG, json.dumps(peft_config(model, settings, base_name, name), indent=2) + "\n")
    if meta is not None:
        m = dict(meta)
        m["format"] = "lora"
        m["base"] = base_name
        m["parameters"] = sum(t.numel() for t in tensors.values())
        write_text(d / "sol.json", json.dumps(m, indent=2) + "\n")
    return d


# ---- read -------------------------------------------------------------------------------------------
def read_config(d: Path) -> dict:
    cfg = read_json_object(d / CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SolError(f"{d / CONFIG}: peft_type {cfg.get('peft_type')!r}; Sol reads LoRA adapters only")
    if cfg.get("use_dora"):
        raise SolError(f"{d / CONFIG}: use_dora is true; Sol reads plain LoRA adapters, not DoRA")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise SolError(f"{d / CONFIG}: field {key!r} is {cfg.get(key)!r}; it must be a number above 0")
    return cfg


def read_tensors(d: Path) -> tuple[dict[str, torch.Tensor], Path]:
    f = d / WEIGHTS
    if f.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(f)), f
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SolError(f"{f}: cannot be read as safetensors ({e}); the adapter is damaged") from None
    if (d / LEGACY_WEIGHTS).is_file():
        f = d / LEGACY_WEIGHTS
        try:
            return torch.load(str(f), map_location="cpu", weights_only=True), f
        except Exception as e:   # any unpickling failure: a damaged or hostile file
            raise SolError(f"{f}: cannot be read ({type(e).__name__}); the adapter is damaged") from None
    raise SolError(f"{f}: missing; an adapter folder holds {CONFIG} and {WEIGHTS}")


def check_base(d: Path, cfg: dict, lm) -> None:
    """An adapter names its base (base_model_name_or_path): refuse one trained on another model. The
    names are compared by their last part (a hub id's model name, a folder's name), case aside, so an
    adapter trained on `Qwen/Qwen2.5-0.5B` fits a local folder `qwen2.5-0.5b`."""
    want = str(cfg.get("base_model_name_or_path") or "").strip()
    if not want:
        return
    known = {_short(str(lm.path)), _short(lm.name)}
    for key in ("source", "hub_id", "base"):
        if lm.meta.get(key):
            known.add(_short(str(lm.meta[key])))
    if _short(want) not in known:
        raise SolError(f"{d / CONFIG}: base_model_name_or_path is {want!r}, but the model is {lm.path}; "
                       "load the adapter on the model it was trained on")


def _short(name: str) -> str:
    name = name.rstrip("/\\")
    for suffix in (".gguf",):
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
    return re.split(r"[/\\]", name)[-1].lower()


def read_adapter(lm, path: str | Path, check_name: bool = True) -> dict:
    """Read and check the adapter folder `path` against the loaded model `lm`, changing nothing: every tensor
    must be a LoRA weight of a projection the model has, with shapes that fit it. Returns {"parts": {(Sol
    module, PEFT part): (A, B, scaling)}, "settings", "extra", "path", "config"}. Errors name the file and
    the tensor."""
    d = Path(path).expanduser().resolve()
    if not is_adapter(d):
        raise SolError(f"{d}: not a LoRA adapter folder (no {CONFIG})")
    cfg = read_config(d)
    if check_name:
        check_base(d, cfg, lm)
    tensors, f = read_tensors(d)
    model = lm.model
    keys = peft_keys(model.cfg)
    where = {PREFIX + v: k for k, v in keys.items()}
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    extra = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if key.startswith("reward_head."):
                extra[key] = t
                continue
            raise SolError(f"{f}: tensor {key!r} is not a LoRA weight of a projection Sol adapts (PEFT's "
                           "modules_to_save, embeddings and the head are not read); train the adapter on "
                           "attention and MLP projections only")
        module = m.group("module")
        if module not in where:
            raise SolError(f"{f}: tensor {key!r} names a layer this {model.cfg.architecture} model does not have "
                           f"({model.cfg.n_layer} layers); the adapter was made for another model")
        found.setdefault(where[module], {})[m.group("ab")] = t
    if not found:
        raise SolError(f"{f}: holds no LoRA weights")
    r0, alpha0, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    parts = {}
    for (sol_name, part), ab in found.items():
        key = PREFIX + keys[(sol_name, part)]
        if set(ab) != {"A", "B"}:
            raise SolError(f"{f}: {key} has lora_{'A' if 'A' not in ab else 'B'} missing")
        layer = model.get_submodule(sol_name)
        size = dict(lora.projections(model.cfg, int(sol_name.split(".")[1]))[sol_name][1])[part]
        a, b = ab["A"], ab["B"]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != layer.in_features or tuple(b.shape) != (size, r):
            raise SolError(f"{f}: {key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                           f"the model's {part} ({size} x {layer.in_features}); the adapter was made for "
                           "another model")
        rank = _pattern(ranks, key, r0)
        if rank != r:
            raise SolError(f"{f}: {key}: rank {r} in the file, {rank} in {CONFIG}")
        alpha = _pattern(alphas, key, alpha0)
        parts[(sol_name, part)] = (a, b, alpha / (r ** 0.5 if rslora else r))
    settings = lora.LoraSettings(r=r0, alpha=alpha0, dropout=float(cfg.get("lora_dropout") or 0.0),
                                 targets=sorted({p for _, p in found}), rslora=rslora)
    return {"parts": parts, "settings": settings, "extra": extra, "path": d, "config": cfg}


def load_adapter(lm, path: str | Path, name: str = lora.DEFAULT, check_name: bool = True) -> dict:
    """Put the adapter folder `path` on the loaded model `lm` as adapter `name` (the model's projections are
    wrapped once; the base's weights are shared by every adapter). Returns read_adapter's dict: "extra" holds
    whole tensors the adapter carries (a reward head). Nothing changes where the adapter does not fit."""
    info = read_adapter(lm, path, check_name)
    layers = lora.wrap(lm.model)
    by_layer: dict[str, dict] = {}
    for (sol_name, part), abs_ in info["parts"].items():
        by_layer.setdefault(sol_name, {})[part] = abs_
    for sol_name, parts in by_layer.items():
        layer = layers[sol_name]
        if name in layer.adapters:
            raise SolError(f"{info['path']}: the model already has an adapter named {name!r}; give another name")
        # Each part's scaling (alpha_pattern, rank_pattern) is folded into its B, so one layer may mix ranks.
        adapter = layer.add(name, set(), 1, 1.0)
        with torch.no_grad():
            for part, (a, b, scaling) in parts.items():
                adapter.lora_A[part] = torch.nn.Parameter(a.float().clone(), requires_grad=False)
                adapter.lora_B[part] = torch.nn.Parameter(b.float() * scaling, requires_grad=False)
        adapter.to(lora._device_of(layer.base))
    return info


def _pattern(pattern: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first pattern the module's name ends with."""
    for pat, value in pattern.items():
        if re.search(rf"(^|\.){pat}$", key) or re.search(rf"(^|\.){pat}$", key.removeprefix(PREFIX)):
            return value
    return default


def restore_weights(model, path: Path, name: str = lora.DEFAULT) -> dict:
    """A checkpoint's adapter weights copied into the training model's adapter `name` (same settings),
    scaling as it was: for resuming. Returns the extra tensors."""
    tensors, f = read_tensors(Path(path))
    keys = peft_keys(model.cfg)
    with torch.no_grad():
        for sol_name, layer in lora.lora_layers(model).items():
            a = layer.adapters[name]
            for part in a.lora_A:
                k = PREFIX + keys[(sol_name, part)]
                try:
                    a.lora_A[part].copy_(tensors[k + ".lora_A.weight"])
                    a.lora_B[part].copy_(tensors[k + ".lora_B.weight"])
                except KeyError as e:
                    raise SolError(f"{f}: tensor {e.args[0]!r} missing; the checkpoint is damaged") from None
    return {k: v for k, v in tensors.items() if not _KEY.match(k)}


# ---- an adapter folder given where a model is expected ----------------------------------------------
def base_of(d: Path) -> str:
    """The base model an adapter folder names (base_model_name_or_path): a folder or file on this disk, or a
    name `sol models list` knows. An error says to give the base with --model where neither is found."""
    from .registry import resolve
    want = str(read_config(d).get("base_model_name_or_path") or "").strip()
    if not want:
        raise SolError(f"{d / CONFIG}: base_model_name_or_path is empty; give the base model with --model and "
                       "the adapter with --adapter")
    if Path(want).expanduser().exists():
        return want
    try:
        return str(resolve(want))
    except SolError:
        raise SolError(f"{d / CONFIG}: its base {want!r} is not on this disk; get it (sol models get) or give "
                       "the base with --model and the adapter with --adapter") from None


def load_with_adapter(name: str, loader):
    """`loader(name)`, or where `name` is an adapter folder, loader(its base) with the adapter on and active
    (its extra tensors, a reward head, become the model's)."""
    from .registry import resolve
    p = Path(name).expanduser()
    if not is_adapter(p):
        try:
            p = resolve(name)
        except SolError:
            return loader(name)
    if not is_adapter(p):
        return loader(name)
    lm = loader(base_of(p))
    info = load_adapter(lm, p)
    lm.extra_tensors = {**lm.extra_tensors, **info["extra"]}
    lora.use(lm.model, lora.DEFAULT)
    return lm
