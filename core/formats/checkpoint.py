"""The model directory: save Sol models, load Sol and Hugging Face models.

A Sol model directory:

    config.json        ModelConfig
    model.safetensors  weights
    tokenizer.json     Hugging Face tokenizers format
    sol.json           lineage: stage, parent, data, steps, metrics

Hugging Face directories of the GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text) and Phi-3 families (config.json + one or several *.safetensors +
tokenizer.json) load directly, their weights renamed into Sol's layout. Every
tensor of the checkpoint is used or refused by name: a weight Sol has no place
for would otherwise be dropped and the model silently computes something else.
Nothing in a model directory is ever
executed: no remote code, and pickles (.bin/.pt) only through
`torch.load(weights_only=True)`, which refuses anything but tensors.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..atomic import replace, temp_path_for, write_text
from ..errors import SolError
from ..model.config import ModelConfig
from ..model.transformer import Transformer
from .gguf_io import gguf_config, inspect_gguf, load_gguf, tokenizer_of_gguf
from .loaded import (LoadedModel, Progress, build_model, check_finite, check_regular, check_size, check_vocab,
                     no_json_constant, place, read_json, read_json_object, report, span, stored_dtype)
from .mapped import map_safetensors, release
from .tokenizer import Tokenizer

HF_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# Tensors beside the Transformer's own that a Sol directory may carry (a reward model's scalar head).
EXTRA_PREFIXES = ("reward_head.",)


# ---- reading JSON with errors that name the file ----------------------------


# ---- Hugging Face configs ---------------------------------------------------
def hf_model_type(cfg: dict) -> str | None:
    mt = cfg.get("model_type")
    if mt:
        return mt
    arch = (cfg.get("architectures") or [""])[0].lower()
    return next((a for a in HF_ARCHITECTURES if arch.startswith(a.split("_")[0])), None)


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
        return ModelConfig(**_llama_family(cfg, mt, source), extra=extra)
    except KeyError as e:
        raise SolError(f"{source}: missing field {e.args[0]!r} for a {mt} model") from None


def _llama_family(cfg: dict, mt: str, source: Path) -> dict:
    """ModelConfig fields for the Llama family and its relatives, read as transformers 5 reads each
    family's config (its defaults, the old and the new spelling of RoPE parameters)."""
    gemma = mt in ("gemma2", "gemma3_text")
    act_field = "hidden_activation" if gemma else "hidden_act"
    act = cfg.get(act_field, "gelu_pytorch_tanh" if gemma else "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise SolError(f"{source}: {act_field} {act!r} is not supported for {mt}")
    if mt == "llama" and cfg.get("mlp_bias"):
        raise SolError(f"{source}: mlp_bias=true is not supported")
    if gemma and cfg.get("use_bidirectional_attention"):
        raise SolError(f"{source}: use_bidirectional_attention=true (an embedding model) is not supported")
    d, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or {"qwen3": 128, "gemma2": 256, "gemma3_text": 256}.get(mt) or d // H
    context = cfg.get("max_position_embeddings", {"gemma2": 8192, "gemma3_text": 131072}.get(mt, 2048))
    # Which families' attention has biases, as transformers builds them.
    attention_bias = bool(cfg.get("attention_bias", False)) and mt in ("llama", "qwen3", "gemma2", "gemma3_text")
    f = dict(vocab_size=cfg["vocab_size"], n_layer=L, n_head=H, n_kv_head=cfg.get("num_key_value_heads") or H,
             d_model=d, d_ff=cfg["intermediate_size"], head_dim=head_dim, context=context, norm="rmsnorm",
             norm_eps=cfg.get("rms_norm_eps", 1e-5 if mt == "phi3" else 1e-6), positions="rope",
             mlp="geglu" if gemma else "swiglu", bias=False, qkv_bias=mt == "qwen2" or attention_bias,
             proj_bias=attention_bias, tie_embeddings=cfg.get("tie_word_embeddings", gemma), architecture=mt)
    f.update(_sliding(cfg, mt, L))
    if mt in ("qwen3", "gemma3_text"):
        f["qk_norm"] = True
    if gemma:
        f.update(norm_plus_one=True, post_norms=True, scale_embeddings=True,
                 attn_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5)
    if mt == "gemma2":
        f.update(attn_softcap=cfg.get("attn_logit_softcapping", 50.0),
                 logit_softcap=cfg.get("final_logit_softcapping", 30.0))
    if mt == "gemma3_text":
        # attn_logit_softcapping stays unread: transformers 5's Gemma 3 attention never applies it.
        f["logit_softcap"] = cfg.get("final_logit_softcapping")
    f.update(_rope(cfg, mt, source, head_dim, context))
    return f


def _sliding(cfg: dict, mt: str, n_layer: int) -> dict:
    """sliding_window and layer_types as transformers 5 derives them for each family."""
    if mt in ("mistral", "phi3"):            # every layer, when set (Mistral's default: 4096)
        return {"sliding_window": cfg.get("sliding_window", 4096 if mt == "mistral" else None)}
    if mt in ("qwen2", "qwen3"):             # layers from max_window_layers on, when use_sliding_window
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window") else None
        types = cfg.get("layer_types") or [
            "sliding_attention" if window is not None and i >= cfg.get("max_window_layers", 28) else "full_attention"
            for i in range(n_layer)]
        return {"sliding_window": window, "layer_types": list(types)}
    if mt in ("gemma2", "gemma3_text"):     # Gemma 3: five sliding layers, then a global one; Gemma 2: 1 and 1
        pattern = cfg.get("sliding_window_pattern", 6) if mt == "gemma3_text" else 2
        types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
        return {"sliding_window": cfg.get("sliding_window", 4096), "layer_types": list(types)}
    return {}


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def _rope(cfg: dict, mt: str, source: Path, head_dim: int, context: int) -> dict:
    """rope_theta, rope_scaling (standardised as transformers' standardize_rope_params does), rope_dim and,
    for Gemma 3, the sliding layers' own base."""
    out = {}
    rp = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if mt == "gemma3_text":
        if "full_attention" in rp or "sliding_attention" in rp:
            full, local = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
        else:   # the older spelling: rope_scaling for the global layers, rope_local_base_freq for the others
            full, local = dict(cfg.get("rope_scaling") or {}), {}
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise SolError(f"{source}: RoPE scaling on the sliding layers is not supported for gemma3_text")
        out["rope_local_theta"] = float(local["rope_theta"])
        rp = full
    else:
        rp = dict(rp)
        rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if mt == "phi3" and kind in ("su", "yarn"):   # Phi-3's older names for longrope
        kind = "longrope"
    if kind not in ROPE_TYPES:
        raise SolError(f"{source}: rope type {kind!r} is not supported (Sol knows {', '.join(ROPE_TYPES[1:])})")
    if kind == "longrope" and mt != "phi3":
        raise SolError(f"{source}: rope type 'longrope' is supported for phi3 models only, not {mt}")
    out["rope_theta"] = float(rp["rope_theta"])
    partial = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        if mt != "phi3":
            raise SolError(f"{source}: partial_rotary_factor is supported for phi3 models only, not {mt}")
        out["rope_dim"] = int(head_dim * partial)
    if kind != "default":
        rp = {k: v for k, v in rp.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
        rp["rope_type"] = kind
        if kind in ("llama3", "yarn", "longrope"):
            # transformers gives a top-level original_max_position_embeddings priority (Phi-3 keeps it there).
            top = cfg.get("original_max_position_embeddings", 4096 if mt == "phi3" else None)
            if top is not None:
                rp["original_max_position_embeddings"] = top
            rp.setdefault("original_max_position_embeddings", context)
        if kind == "longrope":
            half = (out.get("rope_dim") or head_dim) // 2
            for name in ("short_factor", "long_factor"):
                if len(rp.get(name) or []) != half:
                    raise SolError(f"{source}: rope_scaling.{name} must list {half} numbers for this model")
        out["rope_scaling"] = rp
    return out


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
class UnusedTensors(Exception):
    """Tensors a checkpoint holds that the model built from its config has no place for."""

    def __init__(self, names: list[str]):
        super().__init__(names[0])
        self.names = names


# Buffers some older checkpoints saved although the model recomputes them; skipped by name, nothing else is.
RECOMPUTED_BUFFERS = (
    ".rotary_emb.inv_freq",   # Llama-family RoPE frequencies (non-persistent in transformers 5)
    ".attn.bias",             # GPT-2's causal-mask buffer
    ".attn.masked_bias",      # GPT-2's mask fill value
)


class _Weights:
    """The checkpoint's tensors, taken one by one; whatever is left at the end is an error."""

    def __init__(self, sd: dict, prefix: str, progress=None):
        self.sd = {k: v for k, v in sd.items() if not k.endswith(RECOMPUTED_BUFFERS)}
        self.prefix = prefix if any(k.startswith(prefix) for k in sd) else ""
        self.progress, self.total = progress, max(len(self.sd), 1)   # progress(taken / total, name)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.sd

    def take(self, name: str) -> torch.Tensor:
        report(self.progress, 1 - len(self.sd) / self.total, f"reading {self.prefix}{name}")
        return self.sd.pop(self.prefix + name)   # KeyError: load_model names the missing tensor

    def lm_head(self, out: dict, cfg: ModelConfig, embed: torch.Tensor) -> None:
        head = self.sd.pop("lm_head.weight", None)
        if not cfg.tie_embeddings:
            if head is None:
                raise KeyError("lm_head.weight")
            out["lm_head.weight"] = head
        elif head is not None and not torch.equal(head, embed):
            # Tied in config.json but a different head on disk: transformers would use the embedding.
            raise UnusedTensors(["lm_head.weight"])

    def done(self) -> None:
        if self.sd:
            raise UnusedTensors(sorted(self.sd))


def convert_gpt2(sd: dict, cfg: ModelConfig, progress=None) -> dict:
    w = _Weights(sd, "transformer.", progress)
    out = {"embed.weight": w.take("wte.weight"), "pos_embed.weight": w.take("wpe.weight"),
           "norm.weight": w.take("ln_f.weight"), "norm.bias": w.take("ln_f.bias")}
    w.lm_head(out, cfg, out["embed.weight"])
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for src, dst in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[b + dst + ".weight"] = w.take(h + src + ".weight")
            out[b + dst + ".bias"] = w.take(h + src + ".bias")
        # GPT-2 stores Conv1D weights as (in, out); nn.Linear wants (out, in).
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                         ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            out[b + dst + ".weight"] = w.take(h + src + ".weight").t().contiguous()
            out[b + dst + ".bias"] = w.take(h + src + ".bias")
    w.done()
    return out


def fuse(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sol's fused layers (q/k/v, gate/up) from a checkpoint's separate ones; the parts' mapped pages are
    given back, so a fused weight is in memory once."""
    out = torch.cat(parts)
    for p in parts:
        release(p)
    return out


def convert_llama(sd: dict, cfg: ModelConfig, progress=None) -> dict:
    """Llama and its relatives (Mistral, Qwen2/3, Gemma 3, Phi-3): separate or fused q/k/v and gate/up."""
    w = _Weights(sd, "model.", progress)
    out = {"embed.weight": w.take("embed_tokens.weight"), "norm.weight": w.take("norm.weight")}
    w.lm_head(out, cfg, out["embed.weight"])
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        out[b + "ln1.weight"] = w.take(h + "input_layernorm.weight")
        if cfg.post_norms:   # Gemma's post_attention_layernorm normalises the attention output
            out[b + "post_attn_norm.weight"] = w.take(h + "post_attention_layernorm.weight")
            out[b + "ln2.weight"] = w.take(h + "pre_feedforward_layernorm.weight")
            out[b + "post_mlp_norm.weight"] = w.take(h + "post_feedforward_layernorm.weight")
        else:
            out[b + "ln2.weight"] = w.take(h + "post_attention_layernorm.weight")
        a = h + "self_attn."
        if w.has(a + "qkv_proj.weight"):    # Phi-3: already fused as [q; k; v]
            out[b + "attn.qkv.weight"] = w.take(a + "qkv_proj.weight")
        else:
            out[b + "attn.qkv.weight"] = fuse([w.take(a + f"{p}_proj.weight") for p in "qkv"])
        if cfg.qkv_bias:
            out[b + "attn.qkv.bias"] = fuse([w.take(a + f"{p}_proj.bias") for p in "qkv"])
        out[b + "attn.proj.weight"] = w.take(a + "o_proj.weight")
        if cfg.proj_bias:
            out[b + "attn.proj.bias"] = w.take(a + "o_proj.bias")
        if cfg.qk_norm:
            out[b + "attn.q_norm.weight"] = w.take(a + "q_norm.weight")
            out[b + "attn.k_norm.weight"] = w.take(a + "k_norm.weight")
        m = h + "mlp."
        if w.has(m + "gate_up_proj.weight"):   # Phi-3: already fused as [gate; up]
            out[b + "mlp.fc.weight"] = w.take(m + "gate_up_proj.weight")
        else:
            out[b + "mlp.fc.weight"] = fuse([w.take(m + "gate_proj.weight"), w.take(m + "up_proj.weight")])
        out[b + "mlp.proj.weight"] = w.take(m + "down_proj.weight")
    w.done()
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
    header = read_safetensors_header(f)   # names what is wrong, and never hands a reader a header it chokes on
    mapped = map_safetensors(f, header)
    if mapped is not None:
        return mapped
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
    """The pickled weights: pytorch_model*.bin when there are some (a fine-tune's folder often also holds
    training_args.bin, which is not weights), else any *.bin and *.pt."""
    files = sorted(d.glob("pytorch_model*.bin")) or sorted(list(d.glob("*.bin")) + list(d.glob("*.pt")))
    for f in files:
        check_regular(f)
    return files


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


def is_gguf(path: Path) -> bool:
    """A GGUF file: named *.gguf, or (Ollama's blobs have no suffix) starting with GGUF's magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_config(d: Path) -> tuple[ModelConfig, str]:
    if is_gguf(d):
        return gguf_config(d), "gguf"
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A model's tokenizer without its weights: a model folder's tokenizer.json (with its chat templates),
    a GGUF file's from its metadata, or a tokenizer.json file itself."""
    p = Path(path).expanduser()
    if is_gguf(p):
        return tokenizer_of_gguf(p)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise SolError(f"{f}: tokenizer missing; a model directory needs its tokenizer.json")
    return Tokenizer.from_file(f)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: str | None = None, progress: Progress | None = None) -> LoadedModel:
    """quantize: "int8" keeps linear weights int8 (core/model/quant.py); None or "auto": a quantized or 16-bit
    GGUF file runs in its own blocks on the CPU unless a dtype is given (core/model/blockquant.py).
    progress(fraction, what), if given, is told how far the load is as it goes (from the loading thread),
    ending with (1.0, "ready"); one that raises is ignored."""
    d = Path(path).expanduser().resolve()   # one name per model, whatever the cwd later
    if not d.exists():
        raise SolError(f"{d}: no such model directory")
    if is_gguf(d):   # by the name given: a GGUF file of the Hugging Face cache links to a blob named by its hash
        return load_gguf(Path(path).expanduser(), device=device, dtype=dtype, quantize=quantize, progress=progress)
    if d.is_file():
        raise SolError(f"{d}: a model is a directory (config.json, model.safetensors, tokenizer.json); give its folder")
    report(progress, 0.0, f"opening {d.name}")
    cfg, fmt = load_config(d)
    stop_ids, sampling = read_generation_config(d)
    with_stop_ids(cfg, stop_ids)
    tok_path = d / "tokenizer.json"
    if not tok_path.is_file():
        raise SolError(f"{tok_path}: tokenizer missing; a model directory needs its tokenizer.json")
    tokenizer = Tokenizer.from_file(tok_path)
    sd, source = load_weights(d)
    # Where each stage ends, as a fraction of the load. The time goes into reading the weights' bytes (renaming
    # fuses a Hugging Face folder's q/k/v and gate/up, checking reads the rest), then into place():
    # quantizing (an int8 load: ~10x the reading) or moving to a GPU.
    int8 = quantize == "int8"
    placed = 0.3 if int8 else 0.9 if str(device) != "cpu" else 0.98
    renamed = 0.05 + (0.4 * (placed - 0.05) if fmt == "hf" else 0.0)
    checked = renamed + 0.9 * (placed - renamed)
    report(progress, 0.05, f"opened {source}")
    if fmt == "hf":
        renaming = span(progress, 0.05, renamed)
        try:
            sd = (convert_gpt2(sd, cfg, renaming) if cfg.architecture == "gpt2"
                  else convert_llama(sd, cfg, renaming))
        except KeyError as e:
            raise SolError(f"{d / source}: tensor {e.args[0]!r} is missing for a {cfg.architecture} model") from None
        except UnusedTensors as e:
            more = f" ({len(e.names)} in all)" if len(e.names) > 1 else ""
            raise SolError(f"{d / source}: tensor {e.names[0]!r}{more} has no place in a {cfg.architecture} model "
                           "as config.json describes it; Sol refuses it rather than run a different network "
                           "(check config.json, or this variant is not supported)") from None
    extra = {k: sd.pop(k) for k in [k for k in sd if k.startswith(EXTRA_PREFIXES)]}
    check_size(cfg, sd, d / "config.json", d / source)
    check_finite(sd, d / source, span(progress, renamed, checked), give_back=int8)
    limit = check_vocab(tokenizer, cfg, tok_path, d / "config.json")
    # int8 is quantized from float32 weights; otherwise each tensor goes straight to the dtype it runs in.
    run = stored_dtype(sd, device) if dtype is None else dtype
    model = build_model(cfg, sd, d / source, torch.float32 if int8 else run, span(progress, checked, placed))
    sd.clear()   # the model holds the tensors now: quantizing frees each float32 matrix as it goes
    model.vocab_limit = limit
    report(progress, placed, "quantizing to int8" if int8 else f"moving to {device}" if str(device) != "cpu"
           else "placing the weights")
    place(model, device, dtype if int8 else run, int8)
    report(progress, 1.0, "ready")
    meta = read_json(d / "sol.json") if fmt == "sol" else {}
    return LoadedModel(model, tokenizer, cfg, d, fmt, meta, extra, sampling)


# ---- save -------------------------------------------------------------------
def save_model(out_dir: str | Path, model: Transformer, tokenizer: Tokenizer, meta: dict | None = None,
               extra_tensors: dict | None = None) -> Path:
    """Write a Sol model directory. Every file is replaced atomically; sol.json goes last,
    so a directory with a sol.json is always complete."""
    from safetensors.torch import save_file
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: _own_storage(v) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)   # safetensors refuses shared storage; it is the embedding
    sd.update({k: _own_storage(v) for k, v in (extra_tensors or {}).items()})
    tmp = temp_path_for(d / "model.safetensors")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    replace(tmp, d / "model.safetensors")
    model.cfg.save(d / "config.json")
    tokenizer.save(d / "tokenizer.json")
    save_chat_files(tokenizer, d)
    meta = dict(meta or {})
    meta.setdefault("format", "sol")
    meta.setdefault("stage", "base")
    meta["parameters"] = model.num_parameters()
    write_text(d / "sol.json", json.dumps(meta, indent=2) + "\n")
    return d


def save_chat_files(tok: Tokenizer, out: Path) -> None:
    """Beside a trained model's tokenizer.json, what makes it chat as its parent did: its chat templates
    (chat_template.jinja, additional_chat_templates/NAME.jinja, as transformers 5 writes them) and
    tokenizer_config.json (bos/eos tokens). Sol's own models have neither and get neither."""
    for name, template in tok.templates.items():
        f = out / "chat_template.jinja" if name == "default" else out / "additional_chat_templates" / f"{name}.jinja"
        f.parent.mkdir(parents=True, exist_ok=True)
        write_text(f, template)
    if tok.config:
        write_text(out / "tokenizer_config.json", json.dumps(tok.config, indent=2, ensure_ascii=False) + "\n")


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that alone holds its storage: safetensors refuses tensors that share one, and a
    model loaded from a mapped file holds views of the file's single mapping."""
    t = t.detach().to("cpu").contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


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
            header = json.loads(fh.read(n), parse_constant=no_json_constant)
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
        return inspect_or_raise(path)
    except SolError:
        return None


def inspect_or_raise(path: Path) -> dict | None:
    """Like inspect, but a folder that looks like a model and cannot be read raises SolError saying why.
    None: not a model folder at all (no config.json)."""
    if is_gguf(path):
        return inspect_gguf(path)
    if not (path / "config.json").exists() and not (path / "sol.json").exists():
        return None
    try:
        cfg, fmt = load_config(path)
        check_regular(path / "tokenizer.json")
        if not (path / "tokenizer.json").is_file():
            raise SolError(f"{path / 'tokenizer.json'}: tokenizer missing")
        files = _safetensors_files(path)
        if files:
            params = sum(safetensors_numel(f) for f in files)
        elif _pickle_files(path):   # pytorch_model.bin only: shapes from the pickle, no tensor data read
            params = sum(pickle_numel(f) for f in _pickle_files(path))
        else:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error, RecursionError,
            RuntimeError, EOFError) as e:
        raise SolError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    arch = cfg.architecture if fmt == "hf" else ("llama-style" if cfg.positions == "rope" else "gpt2-style")
    return {"format": fmt, "architecture": arch, "parameters": params}
