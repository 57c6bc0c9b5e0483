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
    sd = model.state_dict()
    cfg = model.cfg
    gpt2 = lora.layout(cfg) == "gpt2"
    out = {}

    def put(name, t):
        out[name] = t.detach().to(dtype).contiguous()

    if gpt2:
        put("transformer.wte.weight", sd["embed.weight"])
        put("transformer.wpe.weight", sd["pos_embed.weight"])
        put("transformer.ln_f.weight", sd["norm.weight"])
        put("transformer.ln_f.bias", sd["norm.bias"])
    else:
        put("model.embed_tokens.weight", sd["embed.weight"])
        put("model.norm.weight", sd["norm.weight"])
    if not cfg.tie_embeddings:
        put("lm_head.weight", sd["lm_head.weight"])
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        if gpt2:
            h = f"transformer.h.{i}."
            for src, dst in (("ln1", "ln_1"), ("ln2", "ln_2")):
                put(h + dst + ".weight", sd[b + src + ".weight"])
                put(h + dst + ".bias", sd[b + src + ".bias"])
        else:
            h = f"model.layers.{i}."
            put(h + "input_layernorm.weight", sd[b + "ln1.weight"])
            if cfg.post_norms:
                put(h + "post_attention_layernorm.weight", sd[b + "post_attn_norm.weight"])
                put(h + "pre_feedforward_layernorm.weight", sd[b + "ln2.weight"])
                put(h + "post_feedforward_layernorm.weight", sd[b + "post_mlp_norm.weight"])
            else:
                put(h + "post_attention_layernorm.weight", sd[b + "ln2.weight"])
            if cfg.qk_norm:
                put(h + "self_attn.q_norm.weight", sd[b + "attn.q_norm.weight"])
                put(h + "self_attn.k_norm.weight", sd[b + "attn.k_norm.weight"])
        # The projections, Sol's fused q/k/v and gate/up cut into the modules the layout has (the names and
        # sizes LoRA's adapters use too); GPT-2's Conv1D stores (in, out).
        for name, (prefix, parts) in lora.projections(cfg, i).items():
            for kind in ("weight", "bias"):
                t = sd.get(f"{name}.{kind}")
                if t is None:
                    continue
                for (part, _), piece in zip(parts, t.split([size for _, size in parts])):
                    put(f"{prefix}{part}.{kind}", piece.t() if gpt2 and kind == "weight" else piece)
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
