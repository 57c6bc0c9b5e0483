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

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name


# ---- reading JSON with errors that name the file ----------------------------
def read_json(path: Path) -> dict:
    path = Path(path)
    check_regular(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise SolError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SolError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise SolError(f"{path}: not a UTF-8 text file") from None
    except ValueError as e:   # NaN or Infinity: not JSON, and not a number a model can use
        raise SolError(f"{path}: {e}; write a finite number") from None
    except RecursionError:
        raise SolError(f"{path}: JSON nested too deeply to be a model file") from None


def read_json_object(path: Path) -> dict:
    d = read_json(path)
    if not isinstance(d, dict):
        raise SolError(f"{path}: expected a JSON object {{...}}, found a {type(d).__name__}")
    return d


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def check_regular(path: Path) -> None:
    """Only regular files are read: a FIFO or device named model.safetensors would block or never end."""
    import stat
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return   # the reader says "not found" in its own words
    except OSError as e:
        raise SolError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise SolError(f"{path}: not a regular file (a folder, FIFO or device); Sol reads model files only "
                       "from regular files")


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
    else:
        files = sorted(d.glob("*.safetensors"))
    for f in files:
        check_regular(f)
    return files


def _load_safetensors(f: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    read_safetensors_header(f)   # names what is wrong, and never hands the library a header it chokes on
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


def load_weights(d: Path) -> tuple[dict, str]:
    """All tensors of a model directory, and a description of where they came from (for errors)."""
    files = _safetensors_files(d)
    if files:
        sd = {}
        for f in files:
            sd.update(_load_safetensors(f))
        return sd, files[0].name if len(files) == 1 else f"{files[0].name} (+{len(files) - 1} more)"
    pickles = sorted(list(d.glob("*.bin")) + list(d.glob("*.pt")))
    if pickles:
        for f in pickles:
            check_regular(f)
        sd = {}
        for f in pickles:
            sd.update(_load_pickle(f))
        return sd, pickles[0].name
    raise SolError(f"{d}: no weights found (expected model.safetensors or *.safetensors)")


# ---- load -------------------------------------------------------------------
def detect_format(d: Path) -> str:
    if (d / "sol.json").is_file():
        return "sol"
    if (d / "config.json").exists():
        raw = read_json_object(d / "config.json")
        return "sol" if "positions" in raw and "n_layer" in raw else "hf"
    raise SolError(f"{d}: not a model directory (no config.json)")


def load_config(d: Path) -> tuple[ModelConfig, str]:
    fmt = detect_format(d)
    path = d / "config.json"
    raw = read_json_object(path)
    try:
        if fmt == "sol":
            return ModelConfig.from_dict(raw, source=str(path)), fmt
        return config_from_hf(raw, path), fmt
    except SolError as e:
        msg = str(e)   # ModelConfig's own checks say "config: ..."; name the file instead
        raise SolError(f"{path}: {msg[len('config: '):]}" if msg.startswith("config: ") else msg) from None
    except (TypeError, ValueError, AttributeError, OverflowError) as e:   # a field of the wrong kind
        raise SolError(f"{path}: {e}; check the field's type against the model family's config") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    d = Path(path).expanduser().resolve()   # one name per model, whatever the cwd later
    if not d.exists():
        raise SolError(f"{d}: no such model directory")
    if d.is_file():
        raise SolError(f"{d}: a model is a directory (config.json, model.safetensors, tokenizer.json); give its folder")
    cfg, fmt = load_config(d)
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
    check_size(cfg, sd, d / "config.json", d / source)
    with torch.device("meta"):   # shapes only, no memory: the config is checked before anything is allocated
        _check_shapes(Transformer(cfg), sd, d / source)
    check_finite(sd, d / source)
    check_vocab(tokenizer, cfg, tok_path, d / "config.json")
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=False)
    model.eval()
    if dtype is not None or str(device) != "cpu":
        model.to(device=device, dtype=dtype)
    meta = read_json(d / "sol.json") if fmt == "sol" else {}
    return LoadedModel(model, tokenizer, cfg, d, fmt, meta, extra)


def check_vocab(tok: Tokenizer, cfg: ModelConfig, tok_path: Path, cfg_path: Path) -> None:
    """A token id past the embedding table would fail mid-generation (IndexError); say so at load."""
    top = max(tok.hf.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= cfg.vocab_size:
        raise SolError(f"{tok_path}: has token id {top}, but {cfg_path} gives vocab_size {cfg.vocab_size}; "
                       "the tokenizer and the model do not belong together")


def check_size(cfg: ModelConfig, sd: dict, cfg_path: Path, source: Path) -> None:
    """Compare the config's size with the weights' (and with free memory) before building the model:
    n_layer 10^9 or d_model 2^20 would allocate gigabytes first and fail after."""
    want = cfg.n_params_estimate
    have = sum(t.numel() for t in sd.values())
    if want > 2 * have + 1_000_000:
        raise SolError(f"{cfg_path}: describes a model of about {want:,} parameters (n_layer {cfg.n_layer}, "
                       f"d_model {cfg.d_model}, vocab_size {cfg.vocab_size}) but {source} holds {have:,}; "
                       "the config and the weights do not belong together")
    free = available_memory()
    if free is not None and want * 4 > free:
        raise SolError(f"{cfg_path}: a model of about {want:,} parameters needs ~{want * 4 / 2**30:.1f} GiB, "
                       f"more than the {free / 2**30:.1f} GiB of memory free")


def available_memory() -> int | None:
    """Bytes of memory free for a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_finite(sd: dict, source: Path) -> None:
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SolError(f"{source}: tensor {name!r} holds NaN or infinite values; the weights are damaged "
                           "(a diverged training run?): use an earlier checkpoint")


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
MAX_HEADER = 100 * 2**20    # the safetensors format's own limit on the JSON header


def read_safetensors_header(f: Path) -> dict:
    """The JSON header of a safetensors file, checked: a header length past the file's end (2^60), a
    shape that is not a list of integers or a tensor past the file's end is named, never read."""
    check_regular(f)
    bad = f"{f}: not a valid safetensors file"
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise SolError(f"{bad} (only {len(raw)} bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise SolError(f"{bad}: its header claims {n:,} bytes, the file holds {size:,}; re-download or re-save it")
        try:
            header = json.loads(fh.read(n), parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise SolError(f"{bad}: its header is not valid JSON; re-download or re-save it") from None
    if not isinstance(header, dict):
        raise SolError(f"{bad}: its header is a {type(header).__name__}, not a JSON object")
    data = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        shape = v.get("shape") if isinstance(v, dict) else None
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise SolError(f"{bad}: tensor {k!r} has shape {shape!r}, not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise SolError(f"{bad}: tensor {k!r} lies outside the file (data_offsets {offsets!r}); "
                           "the file is truncated or corrupt")
    return header


def safetensors_numel(f: Path) -> int:
    """Number of parameters in a safetensors file, read from its header alone."""
    total = 0
    for k, v in read_safetensors_header(f).items():
        if k != "__metadata__":
            c = 1
            for s in v["shape"]:
                c *= s
            total += c
    return total


def inspect(path: Path) -> dict | None:
    """{"format", "architecture", "parameters"} for a loadable model directory, or None."""
    try:
        return inspect_or_raise(path)
    except SolError:
        return None


def inspect_or_raise(path: Path) -> dict | None:
    """Like inspect, but a folder that looks like a model and cannot be read raises SolError saying why.
    None: not a model folder at all (no config.json)."""
    if not (path / "config.json").exists() and not (path / "sol.json").exists():
        return None
    try:
        cfg, fmt = load_config(path)
        check_regular(path / "tokenizer.json")
        if not (path / "tokenizer.json").is_file():
            raise SolError(f"{path / 'tokenizer.json'}: tokenizer missing")
        files = _safetensors_files(path)
        if not files:
            return None   # pickled weights only: loadable by path, not listed (no size without reading them)
        params = sum(safetensors_numel(f) for f in files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error, RecursionError) as e:
        raise SolError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    arch = cfg.architecture if fmt == "hf" else ("llama-style" if cfg.positions == "rope" else "gpt2-style")
    return {"format": fmt, "architecture": arch, "parameters": params}
