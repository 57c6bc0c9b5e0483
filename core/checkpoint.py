"""The model directory: save Sol models, load Sol and Hugging Face models.

A Sol model directory:

    config.json        ModelConfig
    model.safetensors  weights
    tokenizer.json     Hugging Face tokenizers format
    sol.json           lineage: stage, parent, data, steps, metrics

Hugging Face directories of the GPT-2, Llama, Qwen2 and Mistral families
(config.json + one or several *.safetensors + tokenizer.json) load directly,
their weights renamed into Sol's layout. Nothing in a model directory is ever
executed: no remote code, and pickles (.bin/.pt) only through
`torch.load(weights_only=True)`, which refuses anything but tensors.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import replace, temp_path_for, write_text
from .config import ModelConfig
from .errors import SolError
from .model import Transformer
from .tokenizer import Tokenizer

HF_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2")
# Tensors beside the Transformer's own that a Sol directory may carry (a reward model's scalar head).
EXTRA_PREFIXES = ("reward_head.",)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    format: str                 # "sol" | "hf"
    meta: dict = field(default_factory=dict)  # sol.json, or {} for imported models
    extra_tensors: dict = field(default_factory=dict)  # e.g. a reward model's "reward_head.*"
    sampling: dict = field(default_factory=dict)  # generation_config.json's sampling defaults, for the chat

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name


# ---- reading JSON with errors that name the file ----------------------------
def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SolError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SolError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise SolError(f"{path}: not a UTF-8 text file") from None


# ---- Hugging Face configs ---------------------------------------------------
def hf_model_type(cfg: dict) -> str | None:
    mt = cfg.get("model_type")
    if mt:
        return mt
    arch = (cfg.get("architectures") or [""])[0].lower()
    return next((a for a in HF_ARCHITECTURES if arch.startswith(a)), None)


def config_from_hf(cfg: dict, source: Path) -> ModelConfig:
    mt = hf_model_type(cfg)
    if mt not in HF_ARCHITECTURES:
        raise SolError(f"{source}: model_type {mt!r} is not supported; Sol loads {', '.join(HF_ARCHITECTURES)}")
    extra = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    try:
        if mt == "gpt2":
            act = cfg.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
                raise SolError(f"{source}: activation_function {act!r} is not supported (Sol's GPT-2 uses tanh GELU)")
            d = cfg["n_embd"]
            return ModelConfig(vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                               d_model=d, d_ff=cfg.get("n_inner") or 4 * d, context=cfg["n_positions"],
                               norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), positions="learned",
                               mlp="gelu", bias=True, tie_embeddings=cfg.get("tie_word_embeddings", True),
                               architecture="gpt2", extra=extra)
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise SolError(f"{source}: hidden_act {act!r} is not supported (Sol's Llama family uses silu)")
        d, H = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("mlp_bias"):
            raise SolError(f"{source}: mlp_bias=true is not supported")
        return ModelConfig(vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"], n_head=H,
                           n_kv_head=cfg.get("num_key_value_heads") or H, d_model=d, d_ff=cfg["intermediate_size"],
                           head_dim=cfg.get("head_dim") or d // H, context=cfg.get("max_position_embeddings", 2048),
                           norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6), positions="rope", mlp="swiglu",
                           bias=False, qkv_bias=(mt == "qwen2") or bool(cfg.get("attention_bias", False)),
                           tie_embeddings=cfg.get("tie_word_embeddings", False),
                           rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                           rope_scaling=_rope_scaling(cfg, source), architecture=mt, extra=extra)
    except KeyError as e:
        raise SolError(f"{source}: missing field {e.args[0]!r} for a {mt} model") from None


def _rope_scaling(cfg: dict, source: Path) -> dict | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise SolError(f"{source}: rope_scaling type {kind!r} is not supported (Sol knows linear and llama3)")
    return rs


# ---- generation_config.json ---------------------------------------------------
SAMPLING_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float}


def read_generation_config(d: Path) -> tuple[list[int], dict]:
    """generation_config.json's stop ids (Llama-3-Instruct ends turns with <|eot_id|>, which config.json's
    eos_token_id does not name) and its sampling defaults; ([], {}) without the file."""
    f = d / "generation_config.json"
    if not f.is_file():
        return [], {}
    gen = read_json(f)
    eos = gen.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if eos is not None and not (isinstance(eos, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                for i in eos)):
        raise SolError(f"{f}: eos_token_id must be a token id or a list of them, not {gen.get('eos_token_id')!r}")
    sampling = {}
    for k, kind in SAMPLING_FIELDS.items():
        v = gen.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise SolError(f"{f}: {k} must be a number, not {v!r}")
        sampling[k] = kind(v)
    if gen.get("do_sample") is False:   # transformers then decodes greedily, whatever the temperature says
        sampling["temperature"] = 0.0
    return list(eos or []), sampling


def with_stop_ids(cfg: ModelConfig, ids: list[int]) -> None:
    """Add stop ids to those config.json names (stop_ids_for reads config.extra["eos_token_id"])."""
    if ids:
        have = cfg.extra.get("eos_token_id")
        have = [have] if isinstance(have, int) else list(have or [])
        cfg.extra = {**cfg.extra, "eos_token_id": sorted(set(have) | set(ids))}


# ---- renaming Hugging Face weights into Sol's layout --------------------------
def _strip(sd: dict, prefixes) -> dict:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def convert_gpt2(sd: dict, cfg: ModelConfig) -> dict:
    sd = _strip(sd, ("transformer.",))
    out = {"embed.weight": sd["wte.weight"], "pos_embed.weight": sd["wpe.weight"],
           "norm.weight": sd["ln_f.weight"], "norm.bias": sd["ln_f.bias"]}
    if "lm_head.weight" in sd and not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        # GPT-2 stores Conv1D weights as (in, out); nn.Linear wants (out, in).
        pairs = {"ln_1": "ln1", "ln_2": "ln2"}
        for src, dst in pairs.items():
            out[b + dst + ".weight"] = sd[h + src + ".weight"]
            out[b + dst + ".bias"] = sd[h + src + ".bias"]
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                         ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            out[b + dst + ".weight"] = sd[h + src + ".weight"].t().contiguous()
            out[b + dst + ".bias"] = sd[h + src + ".bias"]
    return out


def convert_llama(sd: dict, cfg: ModelConfig) -> dict:
    sd = _strip(sd, ("model.",))
    out = {"embed.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        out[b + "ln1.weight"] = sd[h + "input_layernorm.weight"]
        out[b + "ln2.weight"] = sd[h + "post_attention_layernorm.weight"]
        a = h + "self_attn."
        out[b + "attn.qkv.weight"] = torch.cat([sd[a + f"{p}_proj.weight"] for p in "qkv"])
        if cfg.qkv_bias:
            out[b + "attn.qkv.bias"] = torch.cat([sd[a + f"{p}_proj.bias"] for p in "qkv"])
        out[b + "attn.proj.weight"] = sd[a + "o_proj.weight"]
        m = h + "mlp."
        out[b + "mlp.fc.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]])
        out[b + "mlp.proj.weight"] = sd[m + "down_proj.weight"]
    return out


# ---- weight files -----------------------------------------------------------
def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [d / n for n in names]
        for f in files:
            if not f.is_file():
                raise SolError(f"{index}: lists {f.name}, which is missing from the directory")
        return files
    return sorted(d.glob("*.safetensors"))


def _load_safetensors(f: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SolError(f"{f}: cannot read weights, the file is truncated or corrupt ({str(e).splitlines()[0]}); "
                       "re-download or re-save it") from None


def _load_pickle(f: Path) -> dict:
    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
        raise SolError(f"{f}: refused to load this pickle: it holds more than plain tensors, and Sol never runs "
                       f"code from a model file ({str(e).splitlines()[0][:120]}); convert it to safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SolError(f"{f}: expected a dictionary of tensors")
    return sd


def _pickle_files(d: Path) -> list[Path]:
    return sorted(list(d.glob("*.bin")) + list(d.glob("*.pt")))


def load_weights(d: Path) -> tuple[dict, str]:
    """All tensors of a model directory, and a description of where they came from (for errors)."""
    files = _safetensors_files(d)
    if files:
        sd = {}
        for f in files:
            sd.update(_load_safetensors(f))
        return sd, files[0].name if len(files) == 1 else f"{files[0].name} (+{len(files) - 1} more)"
    pickles = _pickle_files(d)
    if pickles:
        sd = {}
        for f in pickles:
            sd.update(_load_pickle(f))
        return sd, pickles[0].name
    raise SolError(f"{d}: no weights found (expected model.safetensors or *.safetensors)")


# ---- load -------------------------------------------------------------------
def detect_format(d: Path) -> str:
    if (d / "sol.json").is_file():
        return "sol"
    if (d / "config.json").is_file():
        raw = read_json(d / "config.json")
        return "sol" if "positions" in raw and "n_layer" in raw else "hf"
    raise SolError(f"{d}: not a model directory (no config.json)")


def load_config(d: Path) -> tuple[ModelConfig, str]:
    fmt = detect_format(d)
    raw = read_json(d / "config.json")
    if fmt == "sol":
        return ModelConfig.from_dict(raw, source=str(d / "config.json")), fmt
    return config_from_hf(raw, d / "config.json"), fmt


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    d = Path(path).expanduser().resolve()   # one name per model, whatever the cwd later
    if not d.exists():
        raise SolError(f"{d}: no such model directory")
    if d.is_file():
        raise SolError(f"{d}: a model is a directory (config.json, model.safetensors, tokenizer.json); give its folder")
    cfg, fmt = load_config(d)
    stop_ids, sampling = read_generation_config(d)
    with_stop_ids(cfg, stop_ids)
    tok_path = d / "tokenizer.json"
    if not tok_path.is_file():
        raise SolError(f"{tok_path}: tokenizer missing; a model directory needs its tokenizer.json")
    tokenizer = Tokenizer.from_file(tok_path)
    sd, source = load_weights(d)
    if fmt == "hf":
        try:
            sd = convert_gpt2(sd, cfg) if cfg.architecture == "gpt2" else convert_llama(sd, cfg)
        except KeyError as e:
            raise SolError(f"{d / source}: tensor {e.args[0]!r} is missing for a {cfg.architecture} model") from None
    extra = {k: sd.pop(k) for k in [k for k in sd if k.startswith(EXTRA_PREFIXES)]}
    model = Transformer(cfg)
    _check_shapes(model, sd, d / source)
    model.load_state_dict(sd, strict=False)
    model.eval()
    if dtype is not None or str(device) != "cpu":
        model.to(device=device, dtype=dtype)
    meta = read_json(d / "sol.json") if fmt == "sol" else {}
    return LoadedModel(model, tokenizer, cfg, d, fmt, meta, extra, sampling)


def _check_shapes(model: Transformer, sd: dict, source: Path) -> None:
    expected = model.state_dict()
    for name, t in expected.items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        if name not in sd:
            raise SolError(f"{source}: tensor {name!r} is missing; config.json describes a bigger model than "
                           "these weights (or the file is incomplete)")
        if tuple(sd[name].shape) != tuple(t.shape):
            raise SolError(f"{source}: tensor {name!r} has shape {tuple(sd[name].shape)} but config.json "
                           f"implies {tuple(t.shape)}; the weights and config.json do not belong together")
    unknown = sorted(set(sd) - set(expected))
    if unknown:
        raise SolError(f"{source}: unexpected tensor {unknown[0]!r} ({len(unknown)} in all) for this config")


# ---- save -------------------------------------------------------------------
def save_model(out_dir: str | Path, model: Transformer, tokenizer: Tokenizer, meta: dict | None = None,
               extra_tensors: dict | None = None) -> Path:
    """Write a Sol model directory. Every file is replaced atomically; sol.json goes last,
    so a directory with a sol.json is always complete."""
    from safetensors.torch import save_file
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)   # safetensors refuses shared storage; it is the embedding
    sd.update({k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()})
    tmp = temp_path_for(d / "model.safetensors")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    replace(tmp, d / "model.safetensors")
    model.cfg.save(d / "config.json")
    tokenizer.save(d / "tokenizer.json")
    meta = dict(meta or {})
    meta.setdefault("format", "sol")
    meta.setdefault("stage", "base")
    meta["parameters"] = model.num_parameters()
    write_text(d / "sol.json", json.dumps(meta, indent=2) + "\n")
    return d


# ---- cheap inspection (no weights loaded) ------------------------------------
def safetensors_numel(f: Path) -> int:
    """Number of parameters in a safetensors file, read from its header alone."""
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    total = 0
    for k, v in header.items():
        if k != "__metadata__":
            c = 1
            for s in v["shape"]:
                c *= s
            total += c
    return total


def pickle_numel(f: Path) -> int:
    """Number of parameters in a .bin/.pt file: loaded onto the meta device (shapes only) and with
    weights_only, so nothing in it runs."""
    try:
        sd = torch.load(str(f), map_location="meta", weights_only=True, mmap=True)
    except Exception as e:
        raise SolError(f"{f}: cannot read ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(sd, dict):
        raise SolError(f"{f}: expected a dictionary of tensors")
    return sum(v.numel() for v in sd.values() if isinstance(v, torch.Tensor))


def inspect(path: Path) -> dict | None:
    """{"format", "architecture", "parameters"} for a loadable model directory, or None."""
    try:
        cfg, fmt = load_config(path)
        if not (path / "tokenizer.json").is_file():
            return None
        files = _safetensors_files(path)
        if files:
            params = sum(safetensors_numel(f) for f in files)
        elif _pickle_files(path):   # pytorch_model.bin only: shapes from the pickle, no tensor data read
            params = sum(pickle_numel(f) for f in _pickle_files(path))
        else:
            return None
    except (SolError, OSError, ValueError, KeyError, struct.error, RuntimeError, EOFError):
        return None
    arch = cfg.architecture if fmt == "hf" else ("llama-style" if cfg.positions == "rope" else "gpt2-style")
    return {"format": fmt, "architecture": arch, "parameters": params}
