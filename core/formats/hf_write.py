"""A Hugging Face folder from a model Sol loaded from one: the inverse of checkpoint.py's renaming.

`sol models merge` folds an adapter into its base and writes the result in the base's own layout, so the
merged model loads in `transformers` (and Sol, and `sol models export --format gguf`) as the base did. The
base's other files (config.json, the tokenizer's files, the chat template, generation_config.json) are
copied as they are; only the weights are new.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..atomic import replace, temp_path_for
from ..model import lora

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def hf_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under the names (and GPT-2's Conv1D orientation) transformers reads."""
    sd = {k: v for k, v in model.state_dict().items()}
    cfg = model.cfg
    out = {}

    def put(name, t):
        out[name] = t.detach().to(dtype).contiguous()

    if lora.layout(cfg) == "gpt2":
        put("transformer.wte.weight", sd["embed.weight"])
        put("transformer.wpe.weight", sd["pos_embed.weight"])
        put("transformer.ln_f.weight", sd["norm.weight"])
        put("transformer.ln_f.bias", sd["norm.bias"])
        if not cfg.tie_embeddings:
            put("lm_head.weight", sd["lm_head.weight"])
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for src, dst in (("ln1", "ln_1"), ("ln2", "ln_2")):
                put(h + dst + ".weight", sd[b + src + ".weight"])
                put(h + dst + ".bias", sd[b + src + ".bias"])
            for src, dst in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                put(h + dst + ".weight", sd[b + src + ".weight"].t())
                put(h + dst + ".bias", sd[b + src + ".bias"])
        return out
    phi3 = lora.layout(cfg) == "phi3"
    put("model.embed_tokens.weight", sd["embed.weight"])
    put("model.norm.weight", sd["norm.weight"])
    if not cfg.tie_embeddings:
        put("lm_head.weight", sd["lm_head.weight"])
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        put(h + "input_layernorm.weight", sd[b + "ln1.weight"])
        if cfg.post_norms:
            put(h + "post_attention_layernorm.weight", sd[b + "post_attn_norm.weight"])
            put(h + "pre_feedforward_layernorm.weight", sd[b + "ln2.weight"])
            put(h + "post_feedforward_layernorm.weight", sd[b + "post_mlp_norm.weight"])
        else:
            put(h + "post_attention_layernorm.weight", sd[b + "ln2.weight"])
        a = h + "self_attn."
        qkv = sd[b + "attn.qkv.weight"]
        if phi3:
            put(a + "qkv_proj.weight", qkv)
        else:
            for name, t in zip("qkv", qkv.split([q, kv, kv])):
                put(a + f"{name}_proj.weight", t)
        if cfg.qkv_bias:
            for name, t in zip("qkv", sd[b + "attn.qkv.bias"].split([q, kv, kv])):
                put(a + f"{name}_proj.bias", t)
        put(a + "o_proj.weight", sd[b + "attn.proj.weight"])
        if cfg.proj_bias:
            put(a + "o_proj.bias", sd[b + "attn.proj.bias"])
        if cfg.qk_norm:
            put(a + "q_norm.weight", sd[b + "attn.q_norm.weight"])
            put(a + "k_norm.weight", sd[b + "attn.k_norm.weight"])
        m = h + "mlp."
        fc = sd[b + "mlp.fc.weight"]
        if phi3:
            put(m + "gate_up_proj.weight", fc)
        else:
            gate, up = fc.chunk(2)
            put(m + "gate_proj.weight", gate)
            put(m + "up_proj.weight", up)
        put(m + "down_proj.weight", sd[b + "mlp.proj.weight"])
    return out


def write_hf_folder(model, base: Path, out: Path, dtype: torch.dtype) -> Path:
    """`out` as a copy of the Hugging Face folder `base` with the model's weights in one model.safetensors."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(base.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name not in WEIGHT_INDEXES:
            tmp = temp_path_for(out / f.name)
            shutil.copyfile(f, tmp)
            replace(tmp, out / f.name)
    tmp = temp_path_for(out / "model.safetensors")
    save_file(hf_state_dict(model, dtype), str(tmp), metadata={"format": "pt"})
    replace(tmp, out / "model.safetensors")
    return out


def stored_float_dtype(folder: Path) -> torch.dtype:
    """The float type most of a Hugging Face folder's safetensors weights are stored in (float32 otherwise)."""
    from .checkpoint import _safetensors_files, read_safetensors_header
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    count: dict = {}
    for f in _safetensors_files(folder):
        for k, v in read_safetensors_header(f).items():
            if k != "__metadata__" and v.get("dtype") in names:
                n = 1
                for s in v["shape"]:
                    n *= s
                count[names[v["dtype"]]] = count.get(names[v["dtype"]], 0) + n
    return max(count, key=count.get) if count else torch.float32
