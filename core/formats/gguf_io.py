"""GGUF files (llama.cpp, Ollama, LM Studio): read them into Sol, write Sol models out as GGUF.

Read with the `gguf` package (llama.cpp's own reader/writer). These architectures map onto Sol's one
Transformer: `llama` (Llama, Mistral and what llama.cpp converts as llama), `qwen2`, `gpt2`, and the
families Sol also imports from Hugging Face folders, `qwen3`, `gemma2`, `gemma3` (text) and `phi3`, each
read into the ModelConfig and weights the folder gives (src/models/<arch>.cpp is what llama.cpp reads).
llama.cpp's conventions (convert_hf_to_gguf.py), undone on reading and followed on writing:
- a llama-arch model's Q and K rows are stored permuted (llama.cpp rotates adjacent pairs, transformers
  rotates the two halves of each head); the other architectures are stored as is (rotated NEOX-style);
- GGUF shapes list the fastest dimension first: a torch (out, in) weight is ggml [in, out];
- GPT-2's fused qkv, fc and proj weights are stored as nn.Linear's (out, in), not Conv1D's (in, out);
- Gemma's norm weights are stored as 1 + weight (what its RMSNorm multiplies by);
- Phi-3 keeps q/k/v fused in attn_qkv and gate/up fused in ffn_up, its longrope factors as the tensors
  rope_factors_long/rope_factors_short.
The tokenizer is rebuilt from the metadata as a Hugging Face `tokenizers` object: `gpt2` (byte-level BPE,
with the pre-tokenizer `tokenizer.ggml.pre` names) or `llama` (SentencePiece: merges ranked by score,
byte fallback). Sol's own exports also carry the exact tokenizer.json under `sol.tokenizer.json`.
"""
from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..atomic import replace, temp_path_for
from ..errors import SolError
from ..kernels import blocks, int8_kernel
from ..model.blockquant import BlockEmbedding, BlockLinear, BlockRows
from ..model.config import ModelConfig
from ..model.layers import rope_frequencies
from ..model.quant import Int8Embedding, Int8Linear, quantize_rows
from ..model.transformer import Transformer
from .gguf_file import GGUFFile
from .loaded import (LoadedModel, build_model, check_finite, check_regular, check_shapes, check_size, check_vocab,
                     place, report, span)
from .mapped import release_pages
from .tokenizer import Tokenizer

ARCHITECTURES = ("llama", "qwen2", "gpt2", "qwen3", "gemma2", "gemma3", "phi3")
# The Hugging Face model_type of each GGUF architecture whose family has switches beyond Llama's: a GGUF file
# of one reads into the same ModelConfig as the model's folder (core/formats/checkpoint.py).
FAMILIES = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}
SOL_TOKENIZER_KEY = "sol.tokenizer.json"
# Tensors that hold RoPE's frequency factors: read into the config (rope_scaling), not into the weights.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# Tensor types Sol reads (dequantized to float, or kept int8 for Q8_0 where asked).
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
WRITE_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
# llama.cpp's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes llama.cpp knows by tokenizer.ggml.pre (llama-vocab.cpp); gpt-2's is ByteLevel's own.
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"gpt-2": None, "default": None, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
              "qwen2": _QWEN2_SPLIT}


# ---- reading -----------------------------------------------------------------
def open_gguf(path: Path):
    """The file's header read and its tensors mapped (gguf_file.GGUFFile), or one error line naming the file
    and what is wrong with it."""
    path = Path(path)
    check_regular(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise SolError(f"{path}: file not found") from None
    if magic != b"GGUF":
        raise SolError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); re-download it")
    try:
        reader = GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        msg = str(e)
        if "is not a valid GGMLQuantizationType" in msg:
            raise SolError(f"{path}: unknown tensor type ({msg}); this file needs a newer llama.cpp, "
                           f"Sol reads {', '.join(READ_TYPES)}") from None
        raise SolError(f"{path}: the GGUF file is truncated or corrupt ({msg}); re-download it") from None
    except (IndexError, KeyError, OverflowError, MemoryError, OSError) as e:
        raise SolError(f"{path}: the GGUF file is truncated or corrupt ({type(e).__name__}: {e}); "
                       "re-download it") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise SolError(f"{path}: tensor {t.name!r} lies past the end of the file: the GGUF file is truncated; "
                           "re-download it")
    return reader


def metadata(reader) -> dict:
    """Every key/value of the header as plain Python values (tensor infos left out); `reader` is a GGUFFile
    or the gguf package's GGUFReader."""
    if isinstance(reader, GGUFFile):
        return dict(reader.metadata)
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = f.contents()
    return out


def _arch(meta: dict, path: Path) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise SolError(f"{path}: architecture {arch!r} is not supported; Sol reads GGUF models of the "
                       f"{', '.join(ARCHITECTURES)} architectures")
    return arch


def config_from_gguf(meta: dict, tensors: dict, path: Path, rope_freqs: list | None = None,
                     rope_factors: dict | None = None) -> ModelConfig:
    """ModelConfig from the metadata (`tensors`: name -> torch shape, for the vocabulary and tied head;
    `rope_freqs`: the values of rope_freqs.weight, if the file has it; `rope_factors`: name -> values of
    Phi-3's rope_factors_long.weight and rope_factors_short.weight, if it has them)."""
    arch = _arch(meta, path)

    def get(key, default=KeyError):
        v = meta.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise SolError(f"{path}: metadata {arch}.{key} is missing; the file is incomplete")
        return v
    if "token_embd.weight" not in tensors:
        raise SolError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab, d = tensors["token_embd.weight"]
    tie = "output.weight" not in tensors
    common = dict(vocab_size=vocab, n_layer=int(get("block_count")), n_head=int(get("attention.head_count")),
                  d_model=int(get("embedding_length")), d_ff=int(get("feed_forward_length")),
                  context=int(get("context_length")), tie_embeddings=tie, architecture=arch)
    if common["d_model"] != d:
        raise SolError(f"{path}: token_embd.weight is {d} wide, but {arch}.embedding_length says {common['d_model']}")
    if arch == "gpt2":
        return ModelConfig(**common, norm="layernorm", norm_eps=_decimal(get("attention.layer_norm_epsilon", 1e-5)),
                           positions="learned", mlp="gelu", bias=True, extra=_token_ids(meta))
    head_dim = int(get("attention.key_length", common["d_model"] // common["n_head"]))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim and arch != "phi3":
        raise SolError(f"{path}: {arch}.rope.dimension_count {rope_dim} differs from the head size {head_dim}; "
                       "partial RoPE is not supported for GGUF models")
    # llama.cpp reads q/k/v biases for every architecture here (fused for Phi-3), an output bias for llama only.
    qkv_bias = arch == "qwen2" or "blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors
    cfg = dict(common, n_kv_head=int(get("attention.head_count_kv", common["n_head"])), head_dim=head_dim,
               norm="rmsnorm", norm_eps=_decimal(get("attention.layer_norm_rms_epsilon", 1e-5)), positions="rope",
               mlp="swiglu", bias=False, qkv_bias=qkv_bias,
               proj_bias=arch not in FAMILIES and "blk.0.attn_output.bias" in tensors,
               rope_theta=_decimal(get("rope.freq_base", 10000.0)))
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": _decimal(get("rope.scaling.factor"))}
    elif kind == "longrope" and arch == "phi3":
        pass   # the factors are tensors, read with the rest of Phi-3's switches
    elif kind not in ("none", None):
        raise SolError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported for GGUF models")
    if rope_freqs is not None:
        if arch in FAMILIES:
            raise SolError(f"{path}: tensor 'rope_freqs.weight' has no place in a {arch} model (llama.cpp's {arch} "
                           "does not read it); Sol refuses it rather than run a different network")
        cfg["rope_scaling"] = _freq_factors(rope_freqs, kind, head_dim, path)
    if arch in FAMILIES:
        cfg.update(_family(arch, get, cfg, rope_dim, rope_factors or {}, path))
    return ModelConfig(**cfg, extra=_token_ids(meta))


def _decimal(v) -> float:
    """A float32 metadata value as the shortest decimal that is that float32 (1e-05, not 9.999999747378752e-06):
    the number config.json had, so a GGUF file and its model's folder give equal configs. Float32 arithmetic
    rounds both to the same value."""
    f = np.float32(v)
    return float(str(f)) if float(f) == float(v) else float(v)


def _family(arch: str, get, cfg: dict, rope_dim: int, rope_factors: dict, path: Path) -> dict:
    """The switches of qwen3, gemma2, gemma3 and phi3 files, read as llama.cpp reads them
    (src/models/<arch>.cpp) and spelled as checkpoint.config_from_hf spells the same model's config.json."""
    out = {"architecture": FAMILIES[arch]}
    if arch == "qwen3":   # llama.cpp's qwen3 has no sliding window; the folder's config lists every layer full
        return dict(out, qk_norm=True, layer_types=["full_attention"] * cfg["n_layer"])
    if arch == "phi3":
        # convert_hf_to_gguf.py writes sliding_window 0 for none (Phi-4). llama.cpp runs Phi-3 without its
        # window for now (src/models/phi3.cpp says so); Sol keeps it, as transformers runs the model.
        out["sliding_window"] = int(get("attention.sliding_window", 0)) or None
        if rope_dim != cfg["head_dim"]:
            out["rope_dim"] = rope_dim
        if rope_factors:
            out["rope_scaling"] = _longrope(get, rope_factors, rope_dim, cfg["context"], path)
        return out
    return dict(out, **_gemma(arch, get, cfg, path))


# Gemma's 27B models, known to llama.cpp by their layer count: their q·k scale is 1/sqrt(d_model / n_head).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma(arch: str, get, cfg: dict, path: Path) -> dict:
    n = cfg["n_layer"]
    # No key holds the q·k scale: llama.cpp takes 1/sqrt(head_dim), or 1/sqrt(d_model / n_head) for the 27B
    # models, which is what Google's query_pre_attn_scalar is for each of them.
    scalar = cfg["d_model"] // cfg["n_head"] if n == GEMMA_27B_LAYERS[arch] else cfg["head_dim"]
    out = {"mlp": "geglu", "norm_plus_one": True, "post_norms": True, "scale_embeddings": True,
           "qk_norm": arch == "gemma3", "attn_scale": scalar ** -0.5}
    if arch == "gemma2":
        # llama.cpp's gemma2 always soft-caps (50 and 30 unless the keys say otherwise), always slides (4096
        # unless said), takes the sliding layers' RoPE base from the global one, and ties the output layer.
        out.update(attn_softcap=_decimal(get("attn_logit_softcapping", 50.0)),
                   logit_softcap=_decimal(get("final_logit_softcapping", 30.0)), tie_embeddings=True)
        if _decimal(get("rope.freq_base_swa", cfg["rope_theta"])) != cfg["rope_theta"]:
            raise SolError(f"{path}: {arch}.rope.freq_base_swa differs from rope.freq_base; a separate RoPE base "
                           "for Gemma 2's sliding layers is not supported")
        window, pattern = int(get("attention.sliding_window", 4096)), 2
        if window <= 0:
            raise SolError(f"{path}: {arch}.attention.sliding_window is {window}; llama.cpp's gemma2 needs a window "
                           "of at least 1 position; the file is corrupt")
    else:
        cap = get("final_logit_softcapping", 0.0)
        out["logit_softcap"] = _decimal(cap) if cap else None
        window, pattern = int(get("attention.sliding_window", 0)), 6
    if window > 0:   # without one (a Gemma 3 with sliding_window 0) every layer is global, with the global base
        out.update(sliding_window=window, layer_types=_layer_types(get("attention.sliding_window_pattern", pattern),
                                                                   n, f"{arch}.attention.sliding_window_pattern",
                                                                   path))
        if arch == "gemma3":   # llama.cpp's default for the sliding layers' base is 10000, as transformers'
            out["rope_local_theta"] = _decimal(get("rope.freq_base_swa", 10000.0))
    return out


def _layer_types(pattern, n: int, key: str, path: Path) -> list:
    """llama.cpp's sliding_window_pattern: a flag per layer (true: sliding), or a number p: every p-th layer
    global (llama_hparams::set_swa_pattern: layer i slides when i % p < p - 1; 0: every layer slides)."""
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise SolError(f"{path}: {key} lists {len(pattern)} layers for a model of {n}; the file is corrupt")
        slides = [bool(p) for p in pattern]
    else:
        p = int(pattern)
        slides = [p == 0 or i % p < p - 1 for i in range(n)]
    return ["sliding_attention" if s else "full_attention" for s in slides]


def _longrope(get, factors: dict, rope_dim: int, context: int, path: Path) -> dict:
    """Phi-3's longrope as transformers' rope_scaling, from rope_factors_long/short.weight (convert_hf_to_gguf.py
    writes no rope.scaling.type for Phi-3: the tensors say it); the attention factor stays transformers' default
    unless the file's rope.scaling.attn_factor differs from it."""
    out = {"rope_type": "longrope"}
    for kind in ("long", "short"):
        name = f"rope_factors_{kind}.weight"
        values = factors.get(name)
        if values is None:
            raise SolError(f"{path}: tensor {name!r} is missing; a phi3 model with longrope has both "
                           "rope_factors_long.weight and rope_factors_short.weight")
        if len(values) != rope_dim // 2:
            raise SolError(f"{path}: tensor {name!r} holds {len(values)} numbers; this model's RoPE needs "
                           f"{rope_dim // 2} (half of rope.dimension_count {rope_dim}); the file is corrupt")
        if not all(np.isfinite(values)) or min(values) <= 0:
            raise SolError(f"{path}: tensor {name!r} holds a value that is not a positive number; the file is corrupt")
        out[f"{kind}_factor"] = [_decimal(v) for v in values]
    old = int(get("rope.scaling.original_context_length"))
    out["original_max_position_embeddings"] = old
    scale = context / old
    default = math.sqrt(1 + math.log(scale) / math.log(old)) if scale > 1 else 1.0
    attention = get("rope.scaling.attn_factor", None)
    if attention is not None and not math.isclose(attention, default, rel_tol=1e-6):
        out["attention_factor"] = _decimal(attention)
    return out


def _freq_factors(factors: list, kind, head_dim: int, path: Path) -> dict:
    """rope_freqs.weight: what convert_hf_to_gguf.py writes for Llama 3.1+'s "llama3" RoPE scaling, one
    divisor per frequency (llama.cpp divides each rotation angle by it). Sol uses the divisors as they are,
    as llama.cpp does: the metadata does not keep the low/high frequency factors they came from."""
    if kind not in ("none", None):
        raise SolError(f"{path}: rope_freqs.weight together with rope.scaling.type {kind!r} is not supported")
    if len(factors) != head_dim // 2:
        raise SolError(f"{path}: rope_freqs.weight holds {len(factors)} numbers; this model's heads need "
                       f"{head_dim // 2} (half the head size {head_dim}); the file is corrupt")
    if not all(np.isfinite(factors)) or min(factors) <= 0:
        raise SolError(f"{path}: rope_freqs.weight holds a value that is not a positive number; the file is corrupt")
    return {"rope_type": "freq_factors", "freq_factors": [float(f) for f in factors]}


def _token_ids(meta: dict) -> dict:
    """The special ids the engine stops on: eos and end-of-turn (eot, eom)."""
    out = {}
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        out["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    stops = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                    "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    if stops:
        out["eos_token_id"] = sorted(set(stops))
    return out


def _unpermute(w, n_head: int):
    """Undo convert_hf_to_gguf.py's permute: per head, rows (pairs, 2) back to (2, halves). Blocks are moved
    whole rows at a time, in the order the same permutation gives their row numbers."""
    if isinstance(w, BlockRows):
        moved = w.take_rows(_unpermute(torch.arange(w.rows), n_head))
        _release(w)   # copied: the file's pages need not stay in memory
        return moved
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _cat(ts: list):
    """torch.cat of rows, for float tensors or GGUF blocks (a mix goes float: no kernel takes F32 rows)."""
    if not any(isinstance(t, BlockRows) for t in ts):
        return torch.cat(ts)
    if all(isinstance(t, BlockRows) for t in ts):
        return BlockRows.cat(ts)
    return torch.cat([t.to_float() if isinstance(t, BlockRows) else t for t in ts])


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's permute: per head, rows (2, halves) to (pairs, 2), for llama.cpp's RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


Q8_0_BLOCK = 34   # bytes of a Q8_0 block: a float16 scale d, then 32 int8 codes q; the numbers are d * q


def q8_0_to_float(raw: np.ndarray, shape: tuple) -> torch.Tensor:
    """Q8_0 blocks as float32, in one pass of torch's threaded arithmetic (gguf.quants does it a group
    of rows at a time in numpy: 3.7 s of a 0.5B model's load, where this takes a fraction of a second).
    The same float32 products as gguf's and llama.cpp's: float(d) * float(q)."""
    blocks = np.ascontiguousarray(raw).reshape(-1, Q8_0_BLOCK)
    with warnings.catch_warnings():   # the mapped file is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        b = torch.from_numpy(blocks)
    d = b[:, :2].contiguous().view(torch.float16).float()
    out = b[:, 2:].view(torch.int8).float()
    return out.mul_(d).reshape(shape)


def tensor_to_torch(t, path: Path) -> torch.Tensor:
    """One GGUF tensor as float32, in torch's dimension order."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    shape = tuple(int(s) for s in reversed(t.shape))
    name = t.tensor_type.name
    if name not in READ_TYPES:
        raise SolError(f"{path}: tensor {t.name!r} has type {name}, which Sol does not read "
                       f"(it reads {', '.join(READ_TYPES)})")
    try:
        if t.tensor_type == Q.F32:
            a = np.asarray(t.data, dtype=np.float32)
        elif t.tensor_type == Q.F16:
            a = np.asarray(t.data).view(np.float16).astype(np.float32)
        elif t.tensor_type == Q.Q8_0:
            a = None
            out = q8_0_to_float(np.asarray(t.data), shape)
        else:
            a = dequantize(np.asarray(t.data), t.tensor_type)
        if a is not None:
            out = torch.from_numpy(np.ascontiguousarray(a).reshape(shape).copy())
        release_pages(t.data)   # decoded: the file's pages need not stay in this process's memory
        return out
    except (ValueError, TypeError) as e:
        raise SolError(f"{path}: tensor {t.name!r} ({name}, shape {shape}) cannot be read ({e}); "
                       "the file is corrupt") from None


def tensor_to_blocks(t, path: Path):
    """A 2-D GGUF tensor of a type Sol's block kernels run, as BlockRows viewing the mapped file (no copy);
    any other tensor as float32 (tensor_to_torch). Truncated data, a width that is not whole blocks and
    non-finite scales are refused, naming the tensor."""
    name = t.tensor_type.name
    if len(t.shape) != 2 or name not in blocks.BLOCKS:
        return tensor_to_torch(t, path)
    width, rows = (int(s) for s in t.shape)
    try:
        size = blocks.row_bytes(name, width)
    except ValueError as e:
        raise SolError(f"{path}: tensor {t.name!r} ({name}, {rows} x {width}): {e}; the file is corrupt") from None
    data = np.asarray(t.data)
    if data.nbytes != rows * size:
        raise SolError(f"{path}: tensor {t.name!r} ({name}) holds {data.nbytes:,} bytes where {rows} rows of "
                       f"{width} need {rows * size:,}; the file is truncated or corrupt (download it again)")
    with warnings.catch_warnings():   # the mapped file is read-only; the kernels only read it
        warnings.simplefilter("ignore", UserWarning)
        part = torch.from_numpy(data.view(np.uint8).reshape(rows, size))
    _check_scales(part, name, t.name, path)
    return BlockRows([(name, part)], width, [t.data])   # t.data: the np.memmap view (asarray drops it)


def _release(rows: BlockRows) -> None:
    for a in rows.sources:
        release_pages(a)


GROUP_ROWS = 8192   # rows interleaved at a time: the copy grows as the file's pages are given back


def _interleave_all(matrices: dict) -> dict:
    """{name: BlockRows} with every part that has Sol's interleaved layout (blocks.group: the quantized
    types; the same bytes, about twice as fast to multiply) copied into it, all in one region of memory
    (huge pages where the OS gives them: a token streams every weight, and one region keeps small layers
    from each taking a page of their own). The file's pages are given back as the copy is made, a slice at
    a time, so a token table (136 MB in Qwen2.5-0.5B's Q8_0) is never held twice."""
    total = sum(part.numel() for rows in matrices.values() for name, part in rows.parts
                if blocks.interleaves(part, name))
    region = int8_kernel._huge_region(total).view(torch.uint8) if total else None
    at, out = 0, {}
    for key, rows in matrices.items():
        by_part = len(rows.sources) == len(rows.parts) and all(
            getattr(src, "shape", (None,))[0] == part.shape[0] for src, (_, part) in zip(rows.sources, rows.parts))
        parts, copied = [], True
        for k, (name, part) in enumerate(rows.parts):
            if not blocks.interleaves(part, name):   # no interleaved layout for it: keep the file's view
                parts.append((name, part))
                copied = False
                continue
            dest = region[at:at + part.numel()].view(part.shape)
            at += part.numel()
            for r in range(0, part.shape[0], GROUP_ROWS):
                blocks.group(part[r:r + GROUP_ROWS], name, dest[r:r + GROUP_ROWS])
                if by_part:
                    release_pages(rows.sources[k][r:r + GROUP_ROWS])
            parts.append(("G" + name, dest))
        out[key] = BlockRows(parts, rows.width, [] if copied else rows.sources)
        if copied:
            _release(rows)
    return out


def _check_scales(part: torch.Tensor, type_name: str, tensor: str, path: Path) -> None:
    """Every float16 scale finite (F16, BF16: every number): a NaN here would surface as NaN at some token.
    Checked by the block kernels' library (one pass), which every caller of tensor_to_blocks has loaded."""
    i = blocks.bad_scale(part, blocks.TYPES[type_name])
    if i < 0:
        return
    per_row = part.shape[1] // blocks.BLOCKS[type_name][2]
    what = "number" if type_name in ("F16", "BF16") else "scale in block"
    raise SolError(f"{path}: tensor {tensor!r} ({type_name}) has a NaN or infinite {what} {i % per_row} of row "
                   f"{i // per_row}; the file is corrupt (download it again)")


class _Out(dict):
    """weights_from_gguf's result: each tensor handed to `finish` as it is stored (int8 loads quantize a
    matrix as soon as it is whole, so the float32 model never exists at once)."""

    def __init__(self, finish):
        super().__init__()
        self.finish = finish

    def __setitem__(self, name, t):
        super().__setitem__(name, self.finish(name, t) if self.finish else t)


def weights_from_gguf(reader, cfg: ModelConfig, path: Path, finish=None, read=tensor_to_torch,
                      progress=None) -> dict:
    """The tensors renamed into Sol's layout (float32, or what `read(tensor, path)` gives, such as blocks;
    then what `finish(name, tensor)` makes of each); every tensor in the file used or refused by name.
    progress(taken / total, name) as each tensor is read."""
    raw = {t.name: t for t in reader.tensors}
    raw.pop("rope_freqs.weight", None)   # read into cfg.rope_scaling already
    if _rope_kind(cfg) == "longrope":    # so are Phi-3's
        raw.pop("rope_factors_long.weight", None)
        raw.pop("rope_factors_short.weight", None)
    out = _Out(finish)
    total = len(raw)

    def take(name):
        if name not in raw:
            raise SolError(f"{path}: tensor {name!r} is missing for a {cfg.architecture} model")
        report(progress, (total - len(raw)) / total, f"reading {name}")
        return read(raw.pop(name), path)

    def norm(name):   # convert_hf_to_gguf.py stores Gemma's norms as 1 + weight, the factor llama.cpp applies
        return take(name) - 1 if cfg.norm_plus_one else take(name)
    out["embed.weight"] = take("token_embd.weight")
    if cfg.positions == "learned":
        out["pos_embed.weight"] = take("position_embd.weight")
    out["norm.weight"] = norm("output_norm.weight")
    if cfg.norm == "layernorm":
        out["norm.bias"] = take("output_norm.bias")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("output.weight")
    for i in range(cfg.n_layer):
        g, b = f"blk.{i}.", f"blocks.{i}."
        out[b + "ln1.weight"] = norm(g + "attn_norm.weight")
        out[b + "ln2.weight"] = norm(g + "ffn_norm.weight")
        if cfg.architecture == "gpt2":
            for src, dst in (("attn_norm", "ln1"), ("ffn_norm", "ln2")):
                out[b + dst + ".bias"] = take(g + src + ".bias")
            for src, dst in (("attn_qkv", "attn.qkv"), ("attn_output", "attn.proj"), ("ffn_up", "mlp.fc"),
                             ("ffn_down", "mlp.proj")):
                out[b + dst + ".weight"] = take(g + src + ".weight")
                out[b + dst + ".bias"] = take(g + src + ".bias")
            continue
        if cfg.post_norms:   # Gemma: the attention's and the MLP's outputs normalised too
            out[b + "post_attn_norm.weight"] = norm(g + "post_attention_norm.weight")
            out[b + "post_mlp_norm.weight"] = norm(g + "post_ffw_norm.weight")
        # llama.cpp takes q/k/v fused in attn_qkv too (Phi-3's converter writes them so), in Sol's order;
        # not for llama, whose q and k would be permuted inside it.
        fused = cfg.architecture != "llama" and g + "attn_qkv.weight" in raw
        if fused:
            out[b + "attn.qkv.weight"] = take(g + "attn_qkv.weight")
        else:
            q, k, v = take(g + "attn_q.weight"), take(g + "attn_k.weight"), take(g + "attn_v.weight")
            if cfg.architecture == "llama":
                q, k = _unpermute(q, cfg.n_head), _unpermute(k, cfg.n_kv_head)
            out[b + "attn.qkv.weight"] = _cat([q, k, v])
        if cfg.qkv_bias and fused and g + "attn_qkv.bias" in raw:
            out[b + "attn.qkv.bias"] = take(g + "attn_qkv.bias")
        elif cfg.qkv_bias:
            qb, kb, vb = take(g + "attn_q.bias"), take(g + "attn_k.bias"), take(g + "attn_v.bias")
            if cfg.architecture == "llama":
                qb, kb = _unpermute(qb, cfg.n_head), _unpermute(kb, cfg.n_kv_head)
            out[b + "attn.qkv.bias"] = _cat([qb, kb, vb])
        if cfg.qk_norm:   # Qwen3, Gemma 3: an RMSNorm over each head of q and of k
            out[b + "attn.q_norm.weight"] = norm(g + "attn_q_norm.weight")
            out[b + "attn.k_norm.weight"] = norm(g + "attn_k_norm.weight")
        out[b + "attn.proj.weight"] = take(g + "attn_output.weight")
        if cfg.proj_bias:
            out[b + "attn.proj.bias"] = take(g + "attn_output.bias")
        if cfg.architecture == "phi3":   # llama.cpp's phi3 has gate and up fused in ffn_up, in Sol's order
            out[b + "mlp.fc.weight"] = take(g + "ffn_up.weight")
        else:
            out[b + "mlp.fc.weight"] = _cat([take(g + "ffn_gate.weight"), take(g + "ffn_up.weight")])
        out[b + "mlp.proj.weight"] = take(g + "ffn_down.weight")
    if raw:
        names = sorted(raw)
        raise SolError(f"{path}: tensor {names[0]!r} ({len(names)} in all) has no place in a {cfg.architecture} "
                       "model as the metadata describes it; Sol refuses it rather than run a different network")
    report(progress, 1.0, "tensors read")
    return dict(out)


def quantization(reader) -> str:
    """The file's quantization as people name it: the type most of its 2-D weights have (Q4_K, Q8_0, F16)."""
    counts: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return max(counts, key=counts.get) if counts else "F32"


def inspect_gguf(path: Path) -> dict:
    """{"format", "architecture", "parameters", "quantization"} from the header alone (tensor data untouched)."""
    reader = open_gguf(path)
    meta = metadata(reader)
    arch = _arch(meta, path)
    return {"format": "gguf", "architecture": arch, "parameters": sum(int(t.n_elements) for t in reader.tensors),
            "quantization": quantization(reader)}


def gguf_config(path: Path) -> ModelConfig:
    """The ModelConfig a GGUF file describes, from its header alone."""
    reader = open_gguf(path)
    return _config(reader, metadata(reader), Path(path))


def _config(reader, meta: dict, path: Path) -> ModelConfig:
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
    values = {t.name: tensor_to_torch(t, path).flatten().tolist() for t in reader.tensors if t.name in ROPE_TENSORS}
    try:
        return config_from_gguf(meta, shapes, path, values.pop("rope_freqs.weight", None), values)
    except SolError as e:
        msg = str(e)
        raise SolError(f"{path}: {msg[len('config: '):]}" if msg.startswith("config: ") else msg) from None
    except (TypeError, ValueError) as e:
        raise SolError(f"{path}: metadata of the wrong kind ({e})") from None


def tokenizer_of_gguf(path: str | Path) -> Tokenizer:
    """The tokenizer a GGUF file carries, from its metadata alone (no tensor is read)."""
    path = Path(path).expanduser().resolve()
    return tokenizer_from_gguf(metadata(open_gguf(path)), path)


def _int8_model(reader, cfg: ModelConfig, path: Path, progress=None):
    """The Transformer with every linear layer int8, each matrix quantized into Sol's rows
    (quant.quantize_rows) as soon as it is read, so only one is ever float32 at a time: the same int8 values
    as quantizing the float32 model (load_model then quant.quantize_model), without holding it. Where Sol's
    int8 kernel runs, see _int8_blocked: less memory still."""
    if int8_kernel.available():
        return _int8_blocked(reader, cfg, path, progress)
    model = Transformer.empty(cfg)
    linear = {f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear}
    rows = {}

    def finish(name: str, t: torch.Tensor) -> torch.Tensor:
        check_finite({name: t}, path)
        if name in linear or name == "embed.weight":
            rows[name] = quantize_rows(t)
            return torch.empty(t.shape, device="meta")   # its shape, for check_shapes
        return t
    sd = weights_from_gguf(reader, cfg, path, finish, progress=progress)
    check_shapes(model, sd, path)
    for name, (q, scales) in rows.items():
        owner, _, _ = name.rpartition(".")
        if owner == "embed":
            model.embed = Int8Embedding.from_rows(q, scales)
        else:
            parent, _, attr = owner.rpartition(".")
            bias = sd.pop(f"{owner}.bias", None)
            setattr(model.get_submodule(parent), attr, Int8Linear.from_rows(q, scales, bias))
    if cfg.tie_embeddings:   # the head reads the table's own int8 rows (quantize_model would make equal ones)
        model.lm_head = Int8Linear.from_rows(*rows["embed.weight"])
    model.load_state_dict({k: t for k, t in sd.items() if k not in rows}, strict=False, assign=True)
    return model.eval()


SLICE_ROWS = 1024   # rows dequantized at a time (a multiple of the kernel's 4-row tiles): ~20 MB of float32


def _int8_blocked(reader, cfg: ModelConfig, path: Path, progress=None):
    """_int8_model where Sol's int8 kernel runs: each linear layer's rows quantized a slice at a time straight
    into the kernel's blocked layout, in one region of huge pages sized from the config (int8_kernel.block_all's
    region, without a plain int8 copy beside it); the token table, and a tied head, stay the file's own
    Q8_0 blocks (BlockEmbedding, BlockLinear: mapped, not copied). A Q8_0 Qwen2.5-0.5B: ~0.5 GB over torch,
    where quantizing the table and blocking afterwards held 1.15 GB at its peak."""
    model = Transformer.empty(cfg)
    shapes = {f"{name}.weight": (m.out_features, m.in_features) for name, m in model.named_modules()
              if type(m) is nn.Linear and not (name == "lm_head" and cfg.tie_embeddings)}
    sizes = {name: int8_kernel.blocked_bytes(*shape) for name, shape in shapes.items()}
    region = int8_kernel._huge_region(sum(sizes.values()))
    views, at = {}, 0
    for name, n in sizes.items():
        o, i = shapes[name]
        views[name] = region[at:at + n].view(-(-o // int8_kernel.ROWS), -(-i // int8_kernel.STEP),
                                             int8_kernel.ROWS, int8_kernel.STEP)
        at += n
    made, table = {}, {}

    def finish(name: str, t):
        if name in views:
            made[name] = _block_rows_into(t, views[name], name, path)
            return torch.empty(shapes[name], device="meta")
        if name == "embed.weight" and isinstance(t, BlockRows):
            table[name] = t
            return torch.empty(t.shape, device="meta")
        t = t.to_float() if isinstance(t, BlockRows) else t
        check_finite({name: t}, path)
        return t
    sd = weights_from_gguf(reader, cfg, path, finish, read=tensor_to_blocks, progress=progress)
    check_shapes(model, sd, path)
    for name, scales in made.items():
        owner = name.rpartition(".")[0]
        parent, _, attr = owner.rpartition(".")
        o, i = shapes[name]
        layer = Int8Linear.from_blocked(views[name], scales, sd.pop(f"{owner}.bias", None), i, o)
        setattr(model.get_submodule(parent), attr, layer)
    if table:
        table = _interleave_all(table)
        model.embed = BlockEmbedding(table["embed.weight"])
        if cfg.tie_embeddings:
            model.lm_head = BlockLinear(table["embed.weight"])
    model.load_state_dict({k: t for k, t in sd.items() if k not in made and k not in table}, strict=False,
                          assign=True)
    if cfg.tie_embeddings and not table:
        model.lm_head = Int8Linear.from_linear(_tied_head(model))
    return model.eval()


def _tied_head(model) -> nn.Linear:
    head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
    head.weight = model.embed.weight
    return head


def _block_rows_into(t, blocked: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """Rows of t (BlockRows or float32) as int8 rows (quantize_rows) written into `blocked`, the kernel's
    layout, SLICE_ROWS at a time; returns the float32 scales. Checks finiteness slice by slice."""
    rows = t.rows if isinstance(t, BlockRows) else t.shape[0]
    scales = torch.empty(rows)
    tiles = blocked.view(blocked.shape[0], -1)
    for r in range(0, rows, SLICE_ROWS):
        w = t.slice_rows(r, r + SLICE_ROWS).to_float() if isinstance(t, BlockRows) else t[r:r + SLICE_ROWS]
        check_finite({name: w}, path)
        q, s = quantize_rows(w)
        scales[r:r + len(s)] = s
        b = int8_kernel.block(q)
        first = r // int8_kernel.ROWS
        tiles[first:first + b.shape[0]] = b.view(b.shape[0], -1)
    if isinstance(t, BlockRows):
        _release(t)   # read: the file's pages need not stay in this process's memory
    return scales


# Types whose models run from their blocks on the CPU. Q8_0 too: in Sol's interleaved layout its product is as
# fast as Sol's int8 rows, and the file's bytes are all it holds (int8 rows re-quantized from it held 0.8 GB
# over torch for a 0.5 GB Qwen2.5-0.5B file, and took 2.7 s to make); `--quantize int8` still makes them.
BLOCK_FILES = {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


def _block_model(reader, cfg: ModelConfig, path: Path, progress=None):
    """The Transformer with every linear layer and the token table held in the file's own blocks (views of
    the mapped file where a layer is one tensor), norms and biases float32."""
    model = Transformer.empty(cfg)
    linear = {f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear}
    held = {}

    def finish(name: str, t):
        if isinstance(t, BlockRows):
            if name in linear or name == "embed.weight":
                held[name] = t
                return torch.empty(t.shape, device="meta")   # its shape, for check_shapes
            t = t.to_float()   # a learned position table: added, not multiplied
        check_finite({name: t}, path)
        return t
    sd = weights_from_gguf(reader, cfg, path, finish, read=tensor_to_blocks, progress=progress)
    check_shapes(model, sd, path)
    held = _interleave_all(held)
    for name, rows in held.items():
        owner, _, _ = name.rpartition(".")
        if owner == "embed":
            model.embed = BlockEmbedding(rows)
        else:
            parent, _, attr = owner.rpartition(".")
            setattr(model.get_submodule(parent), attr, BlockLinear(rows, sd.pop(f"{owner}.bias", None)))
    if cfg.tie_embeddings:   # the head multiplies the table's own blocks
        model.lm_head = BlockLinear(held["embed.weight"]) if "embed.weight" in held else model.lm_head
    model.load_state_dict({k: t for k, t in sd.items() if k not in held}, strict=False, assign=True)
    if cfg.tie_embeddings and type(model.lm_head) is not BlockLinear:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def _runs_in_blocks(reader, quant: str, device, dtype, quantize: str | None) -> bool:
    """Whether a file runs from its own blocks: on the CPU, with no dtype or int8 asked for, where the
    kernels are built."""
    return (quant in BLOCK_FILES and str(device) == "cpu" and dtype is None and quantize != "int8"
            and blocks.available())


def load_gguf(path: str | Path, device="cpu", dtype: torch.dtype | None = None, quantize: str | None = None,
              progress=None):
    """A LoadedModel from a .gguf file, with the same checks as a model directory. progress(fraction, what)
    as its tensors are read (core/formats/loaded.report), ending with (1.0, "ready")."""
    # The name is the one given: a file of the Hugging Face cache is a link to a blob named by its sha256.
    name = Path(path).expanduser().name
    path = Path(path).expanduser().resolve()
    report(progress, 0.0, f"reading {name}")
    reader = open_gguf(path)
    meta = metadata(reader)
    cfg = _config(reader, meta, path)
    tokenizer = tokenizer_from_gguf(meta, path)
    check_size(cfg, {"x": torch.empty(sum(int(t.n_elements) for t in reader.tensors), device="meta")}, path, path)
    check_vocab(tokenizer, cfg, path, path)
    quant = quantization(reader)
    in_blocks = _runs_in_blocks(reader, quant, device, dtype, quantize)
    # Sol's int8 rows, re-quantized per row from whatever the file holds: `--quantize int8`, or a Q8_0 file
    # where the block kernels cannot run (fbgemm then takes the int8 rows).
    int8 = quantize == "int8" or (quantize == "auto" and quant == "Q8_0" and not in_blocks)
    # Reading the tensors is most of the work; a float32 load then checks and builds (~20% of it).
    if in_blocks:
        model = _block_model(reader, cfg, path, span(progress, 0.0, 0.98))
    elif int8:
        model = _int8_model(reader, cfg, path, span(progress, 0.0, 0.98))
    else:
        sd = weights_from_gguf(reader, cfg, path, progress=span(progress, 0.0, 0.8))
        check_finite(sd, path, span(progress, 0.8, 0.95))
        model = build_model(cfg, sd, path, torch.float32 if dtype is None else dtype, span(progress, 0.95, 0.98))
        sd.clear()
    model.vocab_limit = id_limit(meta, tokenizer)
    if not in_blocks:
        report(progress, 0.98, "placing the weights" if str(device) == "cpu" else f"moving to {device}")
        place(model, device, dtype, int8)
    report(progress, 1.0, "ready")
    info = {"name": name, "quantization": quant}
    return LoadedModel(model, tokenizer, cfg, path, "gguf", info)


# ---- the tokenizer from metadata ---------------------------------------------
def id_limit(meta: dict, tokenizer: Tokenizer) -> int:
    """One past the last id a token owns. llama.cpp's converters pad a vocabulary to the model's rows with
    UNUSED entries ([PAD151665], ...), as Sol's exporter does: those rows are no token to sample."""
    if meta.get(SOL_TOKENIZER_KEY):
        return tokenizer.id_limit
    types = meta.get("tokenizer.ggml.token_type") or []
    n = len(types)
    while n and types[n - 1] == UNUSED:
        n -= 1
    return min(tokenizer.id_limit, n) if types else tokenizer.id_limit


def tokenizer_from_gguf(meta: dict, path: Path, prefer_sol: bool = True) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    if prefer_sol and meta.get(SOL_TOKENIZER_KEY):
        hf = HFTokenizer.from_str(meta[SOL_TOKENIZER_KEY])
    else:
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise SolError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.tokens is missing)")
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if kind not in ("gpt2", "llama"):
            raise SolError(f"{path}: tokenizer.ggml.model {kind!r} is not supported; Sol reads 'gpt2' (byte-level "
                           "BPE) and 'llama' (SentencePiece) vocabularies")
        if len(types) != len(tokens):
            raise SolError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        try:
            hf = (_bpe_tokenizer if kind == "gpt2" else _spm_tokenizer)(meta, tokens, types, path)
            _add_special(hf, tokens, types)
            _post_process(hf, meta, tokens)
        except SolError:
            raise
        except Exception as e:   # tokenizers raises plain Exceptions (a merge of unknown tokens, ...)
            raise SolError(f"{path}: the tokenizer in the metadata cannot be built ({str(e).splitlines()[0][:160]})") \
                from None
    config = {}
    for key, name in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{name}")
        if i is not None and hf.id_to_token(int(i)) is not None:
            config[key] = hf.id_to_token(int(i))
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(hf, config, None, {"default": template} if template else {})


def _bpe_tokenizer(meta: dict, tokens: list, types: list, path: Path):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise SolError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; Sol knows "
                       f"{', '.join(PRE_SPLITS)}")
    vocab = _vocab(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    # A merge of two tokens into a string that is no token changes nothing in llama.cpp (the pieces stay
    # as they were); Sol's own exports of a character vocabulary carry one, since GGUF lists cannot be empty.
    merges = [m for m in merges if len(m) < 2 or m[0] + m[1] in vocab or m[0] not in vocab or m[1] not in vocab]
    # llama.cpp takes a whole word that is a token as is (ignore_merges) for Llama 3's vocabulary.
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3")))
    split = PRE_SPLITS[pre]
    if split is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _vocab(tokens: list) -> dict:
    """token -> id; special tokens too (their added-token entries then keep these ids); a repeated string
    keeps its first id."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _spm_tokenizer(meta: dict, tokens: list, types: list, path: Path):
    """SentencePiece as transformers' LlamaConverter builds it: BPE whose merges are ranked by the merged
    piece's score, unknown characters as <0xNN> byte tokens, spaces as ▁."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = _vocab(tokens)
    merges = []
    for piece, i in vocab.items():
        if types[i] != NORMAL:   # no merge ever makes a control or byte token
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    hf = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                                byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] +
                                   ([decoders.Strip(" ", 1, 0)] if steps else []))
    return hf


def _add_special(hf, tokens: list, types: list) -> None:
    """Control tokens as special added tokens; user-defined ones as plain added tokens; ids as in the file."""
    from tokenizers import AddedToken
    added = [(i, AddedToken(t, special=types[i] == CONTROL, normalized=False))
             for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    for i, tok in added:
        hf.add_tokens([tok]) if not tok.special else hf.add_special_tokens([tok])
        if hf.token_to_id(tok.content) != i:
            raise ValueError(f"added token {tok.content!r} would get id {hf.token_to_id(tok.content)}, "
                           f"not {i}")


def _post_process(hf, meta: dict, tokens: list) -> None:
    from tokenizers import processors
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    first = [tokens[int(bos)]] if add_bos and bos is not None else []
    last = [tokens[int(eos)]] if add_eos and eos is not None else []
    if first or last:
        single = " ".join(first + ["$A"] + last)
        pair = " ".join(first + ["$A"] + last + first + ["$B:1"] + last)
        hf.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(first + last)])


# ---- writing -----------------------------------------------------------------
def gguf_architecture(cfg: ModelConfig, source) -> str:
    """Which llama.cpp architecture computes exactly what this config describes, or an error saying why none."""
    arch = next((a for a, family in FAMILIES.items() if family == cfg.architecture), None)
    if arch is not None:   # written as convert_hf_to_gguf.py writes the family, if llama.cpp can run it so
        why = _family_limits(cfg, arch)
        if why:
            raise SolError(f"{source}: this {cfg.architecture} model cannot be written as GGUF: {'; '.join(why)}; "
                           "keep it as a folder, which Sol runs as it is")
        return arch
    unsupported = [name for name in ("sliding_window", "qk_norm", "norm_plus_one", "post_norms", "scale_embeddings",
                                     "attn_scale", "attn_softcap", "logit_softcap", "rope_dim", "rope_local_theta")
                   if getattr(cfg, name)]
    rope = _rope_kind(cfg)
    if rope not in ("default", "linear", "llama3", "freq_factors"):
        unsupported.append(f"rope_scaling {rope}")
    if not unsupported:
        if (cfg.positions, cfg.norm, cfg.mlp, cfg.bias) == ("learned", "layernorm", "gelu", True) \
                and cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.d_model:
            return "gpt2"
        if (cfg.positions, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rmsnorm", "swiglu", False):
            # llama.cpp reads rope_freqs.weight for the llama architecture (which takes q/k/v biases too)
            per_freq = rope in ("llama3", "freq_factors")
            return "qwen2" if cfg.qkv_bias and not cfg.proj_bias and not per_freq else "llama"
    why = ", ".join(unsupported) or f"{cfg.positions} positions, {cfg.norm}, {cfg.mlp}, bias={cfg.bias}"
    raise SolError(f"{source}: this model ({why}) has no GGUF architecture Sol writes (gpt2, llama, qwen2; "
                   "qwen3, gemma2, gemma3 and phi3 for models of those families)")


def _family_limits(cfg: ModelConfig, arch: str) -> list[str]:
    """What in this config llama.cpp's `arch` (src/models/<arch>.cpp) would compute otherwise, each naming the
    config's key (and config.json's where it differs); an empty list when the file can hold it all."""
    gemma = arch in ("gemma2", "gemma3")
    want = {"positions": "rope", "norm": "rmsnorm", "mlp": "geglu" if gemma else "swiglu", "bias": False,
            "proj_bias": False, "qk_norm": arch in ("qwen3", "gemma3"), "norm_plus_one": gemma,
            "post_norms": gemma, "scale_embeddings": gemma}
    why = [f"{k} is {getattr(cfg, k)!r}, llama.cpp's {arch} has {v!r}" for k, v in want.items() if getattr(cfg, k) != v]
    rope = _rope_kind(cfg)
    if rope not in ("default", "linear") and not (arch == "phi3" and rope == "longrope"):
        why.append(f"rope_scaling {rope!r} has no place in a GGUF {arch} model")
    if cfg.rope_dim not in (None, cfg.head_dim) and arch != "phi3":
        why.append(f"rope_dim {cfg.rope_dim} (partial RoPE): of these, only llama.cpp's phi3 rotates part of a head")
    if cfg.rope_local_theta is not None and arch != "gemma3":
        why.append(f"rope_local_theta {cfg.rope_local_theta}: llama.cpp's {arch} has one RoPE base for all layers")
    if cfg.attn_softcap is not None and arch != "gemma2":
        why.append(f"attn_softcap {cfg.attn_softcap} (attn_logit_softcapping): llama.cpp's {arch} never caps scores")
    if cfg.logit_softcap is not None and not gemma:
        why.append(f"logit_softcap {cfg.logit_softcap} (final_logit_softcapping): llama.cpp's {arch} never caps logits")
    return why + (_gemma_limits(cfg, arch) if gemma else _window_limits(cfg, arch))


def _gemma_limits(cfg: ModelConfig, arch: str) -> list[str]:
    why = []
    scalar = cfg.d_model // cfg.n_head if cfg.n_layer == GEMMA_27B_LAYERS[arch] else cfg.head_dim
    scale = cfg.attn_scale or cfg.head_dim ** -0.5
    if not math.isclose(scale, scalar ** -0.5, rel_tol=1e-9):
        why.append(f"attn_scale {scale:.6g} (query_pre_attn_scalar {scale ** -2:.6g}): no GGUF key holds it, "
                   f"llama.cpp's {arch} takes 1/sqrt({scalar}) for this shape")
    if arch == "gemma2":
        if not cfg.tie_embeddings:
            why.append("tie_embeddings is false (tie_word_embeddings): llama.cpp's gemma2 always uses token_embd "
                       "as the output layer")
        if cfg.attn_softcap is None or cfg.logit_softcap is None:
            why.append("attn_softcap or logit_softcap is null (attn_logit_softcapping, final_logit_softcapping): "
                       "llama.cpp's gemma2 always soft-caps both")
        if cfg.sliding_window is None:
            why.append("sliding_window is null: llama.cpp's gemma2 always slides")
    elif cfg.sliding_window is None and cfg.rope_local_theta not in (None, cfg.rope_theta):
        why.append("rope_local_theta without a sliding_window: llama.cpp's gemma3 then uses the global base everywhere")
    return why


def _window_limits(cfg: ModelConfig, arch: str) -> list[str]:
    """qwen3 has no sliding window in llama.cpp; phi3's covers every layer or none."""
    why = []
    slides = {cfg.window(i) is not None for i in range(cfg.n_layer)}
    if arch == "qwen3" and True in slides:
        why.append(f"sliding_window {cfg.sliding_window} (use_sliding_window): llama.cpp's qwen3 has no sliding window")
    if arch == "phi3" and len(slides) > 1:
        why.append("layer_types: llama.cpp's phi3 has one sliding_window for every layer, or none")
    if arch == "phi3" and cfg.n_head * cfg.head_dim != cfg.d_model:
        why.append(f"head_dim {cfg.head_dim}: llama.cpp's phi3 needs n_head * head_dim = d_model ({cfg.d_model})")
    return why


def _rope_kind(cfg: ModelConfig) -> str:
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_freq_factors(cfg: ModelConfig) -> np.ndarray | None:
    """rope_freqs.weight for a model whose RoPE frequencies are scaled one by one (Llama 3.1's "llama3"
    scaling, or factors read from a GGUF): each plain frequency over the scaled one, which llama.cpp divides
    every rotation angle by. None for any other model."""
    from dataclasses import replace

    kind = _rope_kind(cfg)
    if kind == "freq_factors":
        return np.asarray(cfg.rope_scaling["freq_factors"], dtype=np.float32)
    if kind != "llama3":
        return None
    plain, _ = rope_frequencies(replace(cfg, rope_scaling=None))
    scaled, _ = rope_frequencies(cfg)
    return (plain / scaled).numpy().astype(np.float32)


def _gguf_tensors(sd: dict, cfg: ModelConfig, arch: str) -> list[tuple[str, np.ndarray]]:
    """Sol's tensors as llama.cpp names and lays them out (float32 numpy, torch dimension order)."""
    def f(t):
        return t.detach().to("cpu", torch.float32).contiguous().numpy()

    def norm(t):   # Gemma's norms as convert_hf_to_gguf.py stores them: 1 + weight, the factor llama.cpp applies
        return f(t.detach().float() + 1) if cfg.norm_plus_one else f(t)
    factors = rope_freq_factors(cfg)
    out = [] if factors is None else [("rope_freqs.weight", factors)]
    if _rope_kind(cfg) == "longrope":   # Phi-3: the factors as tensors, the converter's first two
        out += [(f"rope_factors_{kind}.weight", np.asarray(cfg.rope_scaling[f"{kind}_factor"], dtype=np.float32))
                for kind in ("long", "short")]
    out.append(("token_embd.weight", f(sd["embed.weight"])))
    if cfg.positions == "learned":
        out.append(("position_embd.weight", f(sd["pos_embed.weight"])))
    out.append(("output_norm.weight", norm(sd["norm.weight"])))
    if "norm.bias" in sd:
        out.append(("output_norm.bias", f(sd["norm.bias"])))
    if not cfg.tie_embeddings:
        out.append(("output.weight", f(sd["lm_head.weight"])))
    H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    for i in range(cfg.n_layer):
        g, b = f"blk.{i}.", f"blocks.{i}."
        if arch == "gpt2":
            for dst, src in (("attn_norm", "ln1"), ("ffn_norm", "ln2"), ("attn_qkv", "attn.qkv"),
                             ("attn_output", "attn.proj"), ("ffn_up", "mlp.fc"), ("ffn_down", "mlp.proj")):
                out += [(g + dst + ".weight", f(sd[b + src + ".weight"])), (g + dst + ".bias", f(sd[b + src + ".bias"]))]
            continue
        out.append((g + "attn_norm.weight", norm(sd[b + "ln1.weight"])))
        if arch == "phi3":   # q, k and v stay fused, as the converter writes Phi-3's qkv_proj
            out.append((g + "attn_qkv.weight", f(sd[b + "attn.qkv.weight"])))
            if cfg.qkv_bias:
                out.append((g + "attn_qkv.bias", f(sd[b + "attn.qkv.bias"])))
        else:
            q, k, v = sd[b + "attn.qkv.weight"].split([H * hd, KV * hd, KV * hd])
            if arch == "llama":
                q, k = _permute(q, H), _permute(k, KV)
            out += [(g + "attn_q.weight", f(q)), (g + "attn_k.weight", f(k)), (g + "attn_v.weight", f(v))]
        if cfg.qkv_bias and arch != "phi3":
            qb, kb, vb = sd[b + "attn.qkv.bias"].split([H * hd, KV * hd, KV * hd])
            if arch == "llama":
                qb, kb = _permute(qb, H), _permute(kb, KV)
            out += [(g + "attn_q.bias", f(qb)), (g + "attn_k.bias", f(kb)), (g + "attn_v.bias", f(vb))]
        if cfg.qk_norm:
            out += [(g + "attn_q_norm.weight", norm(sd[b + "attn.q_norm.weight"])),
                    (g + "attn_k_norm.weight", norm(sd[b + "attn.k_norm.weight"]))]
        out.append((g + "attn_output.weight", f(sd[b + "attn.proj.weight"])))
        if cfg.proj_bias:
            out.append((g + "attn_output.bias", f(sd[b + "attn.proj.bias"])))
        if cfg.post_norms:
            out.append((g + "post_attention_norm.weight", norm(sd[b + "post_attn_norm.weight"])))
        out.append((g + "ffn_norm.weight", norm(sd[b + "ln2.weight"])))
        if arch == "phi3":   # gate and up stay fused in ffn_up, as the converter writes Phi-3's gate_up_proj
            out.append((g + "ffn_up.weight", f(sd[b + "mlp.fc.weight"])))
        else:
            gate, up = sd[b + "mlp.fc.weight"].chunk(2)
            out += [(g + "ffn_gate.weight", f(gate)), (g + "ffn_up.weight", f(up))]
        out.append((g + "ffn_down.weight", f(sd[b + "mlp.proj.weight"])))
        if cfg.post_norms:
            out.append((g + "post_ffw_norm.weight", norm(sd[b + "post_mlp_norm.weight"])))
    return out


def _write_metadata(w, cfg: ModelConfig, arch: str) -> None:
    w.add_uint32(f"{arch}.context_length", cfg.context)
    w.add_uint32(f"{arch}.embedding_length", cfg.d_model)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.d_ff)
    w.add_uint32(f"{arch}.block_count", cfg.n_layer)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_head)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    if arch == "gpt2":
        w.add_float32(f"{arch}.attention.layer_norm_epsilon", cfg.norm_eps)
        return
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_head)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_uint32(f"{arch}.rope.dimension_count", cfg.rope_dim or cfg.head_dim)
    w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
    if _rope_kind(cfg) == "linear":   # llama3 / freq_factors scaling travels as rope_freqs.weight instead
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", float(cfg.rope_scaling["factor"]))
    if arch in ("gemma2", "gemma3"):
        _write_gemma(w, cfg, arch)
    elif arch == "phi3":
        _write_phi3(w, cfg)


def _write_gemma(w, cfg: ModelConfig, arch: str) -> None:
    """Soft-caps, the window and which layers slide, as convert_hf_to_gguf.py and llama.cpp spell them
    (gguf_architecture has checked llama.cpp computes the rest as this config says)."""
    if cfg.attn_softcap is not None:
        w.add_float32(f"{arch}.attn_logit_softcapping", cfg.attn_softcap)
    if cfg.logit_softcap is not None:
        w.add_float32(f"{arch}.final_logit_softcapping", cfg.logit_softcap)
    if cfg.sliding_window is None:   # a Gemma 3 without one: llama.cpp then runs every layer global
        return
    w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    if arch == "gemma3":   # llama.cpp's default base for the sliding layers is 10000, not the global one
        w.add_float32(f"{arch}.rope.freq_base_swa", cfg.rope_local_theta or cfg.rope_theta)
    # The converter writes no pattern and llama.cpp assumes Gemma 2's 1 in 2 or Gemma 3's 1 in 6 global
    # layers; any other model gets a flag per layer, which llama.cpp reads too.
    types = ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.n_layer)]
    key = f"{arch}.attention.sliding_window_pattern"
    if types != _layer_types(2 if arch == "gemma2" else 6, cfg.n_layer, key, None):
        w.add_array(key, [t == "sliding_attention" for t in types])


def _write_phi3(w, cfg: ModelConfig) -> None:
    """The window (0: none, as the converter writes it for Phi-4) and longrope's numbers; its factors are
    tensors and, as from the converter, no rope.scaling.type says so."""
    w.add_uint32("phi3.attention.sliding_window", cfg.sliding_window or 0)
    if _rope_kind(cfg) == "longrope":
        w.add_uint32("phi3.rope.scaling.original_context_length", cfg.rope_scaling["original_max_position_embeddings"])
        w.add_float32("phi3.rope.scaling.attn_factor", rope_frequencies(cfg)[1])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel writes tokens in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _pre_name(pre: dict | None) -> str | None:
    """tokenizer.ggml.pre for a byte-level pre-tokenizer, or None if it is not byte-level."""
    if not pre:
        return None
    if pre["type"] == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    if pre["type"] == "Sequence":
        steps = pre["pretokenizers"]
        if len(steps) == 2 and steps[0]["type"] == "Split" and steps[1]["type"] == "ByteLevel" \
                and not steps[1].get("use_regex", True):
            regex = steps[0]["pattern"].get("Regex")
            for name in ("qwen2", "llama-bpe"):
                if regex == PRE_SPLITS[name]:
                    return name
    return None


def _write_tokenizer(w, tok: Tokenizer, cfg: ModelConfig, source) -> None:
    """The vocabulary as llama.cpp reads it, plus Sol's exact tokenizer.json for Sol."""
    spec = json.loads(tok.hf.to_str())
    model = spec["model"]
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    n = max(cfg.vocab_size, len(by_id))
    pre = _pre_name(spec.get("pre_tokenizer"))
    if model["type"] == "BPE" and model.get("byte_fallback"):
        kind, convert = "llama", (lambda t: t)
    elif model["type"] == "BPE" and pre:
        kind, convert = "gpt2", (lambda t: t)
    else:   # a character-level vocabulary: its characters as byte-level tokens, no merges
        table = _bytes_to_unicode()
        kind, pre, convert = "gpt2", "gpt-2", (lambda t: "".join(table[b] for b in t.encode("utf-8")))
    tokens, types, scores = [], [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(convert(t))
            is_byte = kind == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">")
            types.append(BYTE if is_byte else UNKNOWN if t == model.get("unk_token") else NORMAL)
        scores.append(-float(i) if types[-1] == NORMAL else 0.0)
    w.add_string("tokenizer.ggml.model", kind)
    if kind == "gpt2":
        w.add_string("tokenizer.ggml.pre", pre)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        # llama.cpp refuses a gpt2 vocabulary without tokenizer.ggml.merges, and GGUF has no empty list:
        # a character vocabulary gets one merge whose result is no token, which changes nothing.
        w.add_array("tokenizer.ggml.merges", merges or [_placeholder_merge(tokens, types)])
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    if kind == "llama":
        w.add_array("tokenizer.ggml.scores", scores)
        norm = json.dumps(spec.get("normalizer"))
        w.add_bool("tokenizer.ggml.add_space_prefix", '"Prepend"' in norm)
    ids = {"bos_token_id": tok.bos_id if tok.bos_id is not None else cfg.extra.get("bos_token_id"),
           "eos_token_id": tok.eos_id, "eot_token_id": tok.token_to_id("<|end|>") if tok.is_sol else None,
           "unknown_token_id": tok.token_to_id(model["unk_token"]) if model.get("unk_token") else None,
           "padding_token_id": tok.token_to_id("<|pad|>")}
    for key, i in ids.items():
        if isinstance(i, int):
            w.add_uint32(f"tokenizer.ggml.{key}", i)
    probe = tok.encode_ids("a", add_special_tokens=True)
    w.add_bool("tokenizer.ggml.add_bos_token", ids["bos_token_id"] is not None and probe[:1] == [ids["bos_token_id"]])
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    template = tok.chat_template
    if template:
        w.add_string("tokenizer.chat_template", template)
    w.add_string(SOL_TOKENIZER_KEY, tok.hf.to_str())


def _placeholder_merge(tokens: list, types: list) -> str:
    """Two ordinary tokens whose joined string is no token."""
    normal = [t for t, k in zip(tokens, types) if k == NORMAL]
    have = set(tokens)
    return next(f"{a} {b}" for a in normal for b in normal if a + b not in have)


def export_gguf(lm, out: str | Path, kind: str = "f32") -> Path:
    """Write a loaded model (Sol's own or an imported one) as a GGUF file; atomic."""
    if kind not in WRITE_TYPES:
        raise SolError(f"--type {kind}: choose one of {', '.join(WRITE_TYPES)}")
    out = Path(out)
    cfg = lm.config
    arch = gguf_architecture(cfg, lm.path)
    tmp = temp_path_for(out)
    try:
        _write(tmp, lm, cfg, arch, kind)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace(tmp, out)
    return out


def _write(tmp: Path, lm, cfg: ModelConfig, arch: str, kind: str) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q
    sd = lm.model.state_dict()
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(lm.name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    if kind == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_metadata(w, cfg, arch)
    _write_tokenizer(w, lm.tokenizer, cfg, lm.path)
    for name, a in _gguf_tensors(sd, cfg, arch):
        if a.ndim == 2 and kind == "q8_0" and a.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        elif a.ndim == 2 and kind in ("f16", "q8_0"):
            w.add_tensor(name, a.astype(np.float16))
        else:   # norms and biases stay float32, as llama.cpp keeps them
            w.add_tensor(name, a)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
