"""Will a model fit this machine: its files on the disk, its weights and KV cache in memory. Checked before
the first byte of the weights is fetched, from the model's config (config.json, or a GGUF file's header: its
first bytes, read by huggingface_hub with a Range request).

SOL_HUB_FREE_MEMORY and SOL_HUB_FREE_DISK (bytes) say what is free instead of the measure: for a machine
whose measure is wrong (a container's limits), and for tests.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
from pathlib import Path

from ..errors import SolError
from ..formats.registry import hf_cache_dir
from .client import Silent, calling, endpoint, headers_for

FREE_MEMORY_ENV = "SOL_HUB_FREE_MEMORY"
FREE_DISK_ENV = "SOL_HUB_FREE_DISK"
CONTEXT_CAP = 4096          # the KV cache counted by default: the model's context, at most this many tokens
HEADER_BYTES = 1 << 20      # a GGUF header is read in growing prefixes from this size (a big vocabulary: ~8 MB)


def size_text(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


# ---- what is free --------------------------------------------------------------------------------
def _knob(name: str) -> int | None:
    v = os.environ.get(name, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise SolError(f"{name}={v}: give a number of bytes") from None


def free_memory(device) -> int | None:
    """Bytes free for a model on `device` (a GPU's free memory, else the RAM available); None: unknown."""
    knob = _knob(FREE_MEMORY_ENV)
    if knob is not None:
        return knob
    if device.type == "cuda":
        import torch
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        from ..formats.loaded import available_memory   # Linux's MemAvailable, as the loader's own check reads it
        return available_memory()


def free_disk(folder: Path | None = None) -> int:
    """Bytes free where the Hugging Face cache is (its nearest folder that exists)."""
    knob = _knob(FREE_DISK_ENV)
    if knob is not None:
        return knob
    p = Path(folder or hf_cache_dir())
    while not p.exists() and p.parent != p:
        p = p.parent
    return shutil.disk_usage(p).free


# ---- what a model needs --------------------------------------------------------------------------
def read_head(repo: str, name: str, revision: str, n: int, token=None) -> bytes:
    """The first `n` bytes of a file of the repository, kept in memory (nothing is written to the cache)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    buf = io.BytesIO()
    url = hf_hub_url(repo, name, revision=revision, endpoint=endpoint())
    with calling(f"get {repo}", repo, token):
        meta = get_hf_file_metadata(url, token=token)
        headers = {**headers_for(url, meta.location, token), "Range": f"bytes=0-{n - 1}"}
        http_get(meta.location, buf, headers=headers, expected_size=n, displayed_filename=name, tqdm_class=Silent)
    return buf.getvalue()


def model_config(entry: dict, files: list[dict], token=None):
    """The ModelConfig of what `files` will make: config.json, or the GGUF file's header."""
    from ..formats.checkpoint import config_from_hf
    from ..formats.gguf_file import GGUFFile
    from ..formats.gguf_io import config_from_gguf
    repo, sha = entry["repo"], entry["sha"] or "main"
    if entry["format"] != "gguf":
        cfg_file = next(f for f in files if f["name"] == "config.json")
        text = read_head(repo, "config.json", sha, cfg_file["size"], token)
        try:
            return config_from_hf(json.loads(text), Path(f"{repo}/config.json"))
        except ValueError as e:
            raise SolError(f"{repo}/config.json: not JSON ({e})") from None
    f = files[0]
    n = min(HEADER_BYTES, f["size"])
    while True:
        head = read_head(repo, f["name"], sha, n, token)
        try:
            meta, shapes = GGUFFile.header(head)
            return config_from_gguf(meta, shapes, Path(f"{repo}/{f['name']}"))
        except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
            if n >= f["size"]:
                raise SolError(f"{repo}/{f['name']}: its GGUF header cannot be read ({e})") from None
            n = min(4 * n, f["size"])


def needs(entry: dict, files: list[dict], cfg, dtype: str, context: int | None, device) -> dict:
    """{"weights", "kv_cache", "memory", "context", "dtype"}: bytes of the weights as Sol will hold them at
    `dtype` (auto: a GGUF file's own blocks, a folder's stored type on the CPU, 16-bit on a GPU) and of the KV
    cache of `context` tokens (default: the model's context, at most CONTEXT_CAP)."""
    from ..devices import pick_dtype
    from ..model.quant import weight_bytes
    torch_dtype = pick_dtype(dtype, device)
    kind = None if torch_dtype is None else "float32" if str(torch_dtype) == "torch.float32" else "bfloat16"
    stored = sum(f["size"] or 0 for f in files if f["name"].endswith((".gguf", ".safetensors")))
    if kind is None or (dtype == "auto" and entry["format"] == "gguf"):
        weights = stored
    else:
        weights = weight_bytes(cfg, kind)
    ctx = min(cfg.context, CONTEXT_CAP) if context is None else context
    kv = cfg.kv_cache_bytes(1, ctx, 2 if kind == "bfloat16" else 4)
    return {"weights": weights, "kv_cache": kv, "memory": weights + kv, "context": ctx,
            "dtype": kind or "as stored"}


def check(repo: str, need: dict, device) -> None:
    """Refuse, with the numbers, a model the disk (need["disk"]: bytes still to download) or memory cannot hold."""
    disk = free_disk()
    if need["disk"] > disk:
        raise SolError(f"{repo}: its files need {size_text(need['disk'])} on the disk and {size_text(disk)} is "
                       f"free in {hf_cache_dir()} ({FREE_DISK_ENV} overrides the measure); nothing was downloaded")
    mem = free_memory(device)
    if mem is not None and need["memory"] > mem:
        raise SolError(f"{repo}: needs {size_text(need['memory'])} of memory on {device.type} "
                       f"({size_text(need['weights'])} of weights {need['dtype']}, {size_text(need['kv_cache'])} of "
                       f"KV cache for {need['context']:,} tokens) and {size_text(mem)} is free "
                       f"({FREE_MEMORY_ENV} overrides the measure); nothing was downloaded. Try a smaller --quant, "
                       "--context or --dtype")


def rough(files: list[dict], device) -> str | None:
    """Why `files` will not fit, judged from their sizes alone (for a list of search results: their bytes on
    the disk, and their weights as stored in memory; `get` also counts the KV cache), or None."""
    size = sum(f["size"] or 0 for f in files)
    disk = free_disk()
    if size > disk:
        return f"needs {size_text(size)} of disk, {size_text(disk)} free"
    weights = sum(f["size"] or 0 for f in files if f["name"].endswith((".gguf", ".safetensors")))
    mem = free_memory(device)
    if mem is not None and weights > mem:
        return f"needs {size_text(weights)} of memory, {size_text(mem)} free"
    return None
