"""A loaded model, and the checks every reader runs before it trusts a file.

Both readers (Sol and Hugging Face folders in core/formats/checkpoint.py, GGUF files in
core/formats/gguf_io.py) return a LoadedModel and refuse a damaged file the same way: the file named,
what is wrong in it, and what to do. They share these from here, so neither imports the other's module.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SolError
from ..model.config import ModelConfig
from ..model.transformer import Transformer
from .mapped import release
from .tokenizer import Tokenizer

FINITE_SLICE = 1 << 22   # numbers checked at a time: at most 16 MB of float32 or mask, whatever the tensor

# progress(fraction, what): how far a load is (0.0 to 1.0) and what it is reading or doing now.
Progress = Callable[[float, str], None]


def report(progress: Progress | None, fraction: float, what: str) -> None:
    """Tell `progress`, if given, how far the load is. A callback that raises is ignored: it only watches
    the load (a window's bar, a closed one's emit), and a model that read fine must not fail for it."""
    if progress is None:
        return
    try:
        progress(min(max(float(fraction), 0.0), 1.0), what)
    except Exception:   # the watcher's problem, not the load's (see above)
        pass


def span(progress: Progress | None, start: float, end: float) -> Progress | None:
    """A callback for one stage of a load: the stage's own 0..1 reported as start..end of the whole."""
    if progress is None:
        return None
    return lambda fraction, what: report(progress, start + (end - start) * fraction, what)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    format: str                 # "sol" | "hf" | "gguf"
    meta: dict = field(default_factory=dict)  # sol.json, or {} for imported models
    extra_tensors: dict = field(default_factory=dict)  # e.g. a reward model's "reward_head.*"
    sampling: dict = field(default_factory=dict)  # generation_config.json's sampling defaults, for the chat

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name


def read_json(path: Path) -> dict:
    path = Path(path)
    check_regular(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_json_constant)
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


def no_json_constant(name: str):
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


def place(model: Transformer, device, dtype, int8: bool) -> None:
    """Quantize (from the float32 weights) then move: int8 weights stay int8 whatever the dtype."""
    if int8:
        from ..model.quant import quantize_model
        # One layer at a time, each float matrix given back as soon as its int8 rows exist: the file's pages
        # (release) and the fused q/k/v and gate/up copies (their last reference goes with the layer), so the
        # float32 model is never in memory whole (a Qwen2.5-0.5B load peaked at 2.7 GB holding it all).
        quantize_model(model, release)
    if dtype is not None or str(device) != "cpu":
        model.to(device=device, dtype=dtype)
    if int8 and str(device) == "cpu":
        from ..model.quant import pack_model
        pack_model(model)
    elif dtype == torch.float16 and str(device) == "cpu":   # fbgemm's float16 products (core/model/half.py)
        from ..model.half import pack_half
        pack_half(model)


def check_vocab(tok: Tokenizer, cfg: ModelConfig, tok_path: Path, cfg_path: Path) -> int:
    """A token id past the embedding table would fail mid-generation (IndexError); say so at load.
    Returns the tokenizer's id limit (one past its highest id)."""
    limit = tok.id_limit
    if limit > cfg.vocab_size:
        raise SolError(f"{tok_path}: has token id {limit - 1}, but {cfg_path} gives vocab_size {cfg.vocab_size}; "
                       "the tokenizer and the model do not belong together")
    return limit


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


def check_finite(sd: dict, source: Path, progress: Progress | None = None, give_back: bool = False) -> None:
    """NaN or infinity anywhere in the weights is refused, named. Each slice of a tensor is summed once in
    float32 (a NaN or infinity makes the sum non-finite), so a mapped tensor is read, never copied whole;
    only a slice whose sum is not finite is looked at number by number, since finite numbers can also
    add up past float32's range. `give_back`: a mapped tensor's pages leave this process once checked
    (an int8 load reads each one once more to quantize it; otherwise the whole file would be resident at
    once, 2 GB for a float32 Qwen2.5-0.5B)."""
    for n, (name, t) in enumerate(sd.items()):
        report(progress, n / max(len(sd), 1), f"checking {name}")
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), FINITE_SLICE):
            part = flat[i:i + FINITE_SLICE]
            if not bool(torch.isfinite(part.sum(dtype=torch.float32))) and not bool(torch.isfinite(part).all()):
                raise SolError(f"{source}: tensor {name!r} holds NaN or infinite values; the weights are damaged "
                               "(a diverged training run?): use an earlier checkpoint")
            if give_back:
                release(part)


def check_shapes(model: Transformer, sd: dict, source: Path) -> None:
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


def build_model(cfg: ModelConfig, sd: dict, source: Path, dtype: torch.dtype = torch.float32,
                progress: Progress | None = None) -> Transformer:
    """The Transformer holding `sd`'s own tensors. It is built on the meta device, so no memory is taken
    and no weight is randomly initialised only to be overwritten (that took 11 of a 0.5B model's 15 s of
    loading), checked against the weights' shapes, then given the tensors themselves: one stored in
    `dtype` is used as it is (for a mapped file, its pages are read when first used), others are
    converted once."""
    model = Transformer.empty(cfg)
    check_shapes(model, sd, source)
    def own(n: int, name: str, t: torch.Tensor) -> torch.Tensor:
        report(progress, n / max(len(sd), 1), f"building {name}")
        if not t.is_floating_point() or t.dtype == dtype:
            return t.contiguous()
        out = t.to(dtype).contiguous()
        release(t)   # a mapped tensor's pages, read once for the conversion, are given back
        return out
    model.load_state_dict({k: own(n, k, t) for n, (k, t) in enumerate(sd.items())}, strict=False, assign=True)
    if cfg.tie_embeddings:   # assigning the embedding replaced the Parameter the head shared
        model.lm_head.weight = model.embed.weight
    return model.eval()


def stored_dtype(sd: dict, device) -> torch.dtype:
    """What dtype None (`--dtype auto`) means on `device` for weights `sd`. On the CPU, bfloat16 weights
    stay bfloat16: used where they lie in the mapped file, half float32's memory, and torch's bfloat16
    products beat float32's even without native bfloat16 (a Qwen2.5-0.5B shape: 0.8 s to load instead of
    2.7 s, 8.7 tokens/s instead of 6.6, on an AVX2-only CPU). float16 weights become float32 (on such a CPU
    torch's float16 products are slower still, and fbgemm's packing took 8 s of that model's load), and
    float32 stays float32. Elsewhere float32, which callers replace with the device's own choice."""
    if str(device) != "cpu":
        return torch.float32
    sizes: dict = {}
    for t in sd.values():
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return torch.bfloat16 if sizes and max(sizes, key=sizes.get) == torch.bfloat16 else torch.float32
