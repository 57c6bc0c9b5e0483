"""A Hub repository as Sol sees it, and `search`.

A repository is one entry: {"repo", "format" (gguf or safetensors), "family", "parameters", "downloads",
"likes", "gated", "sha", "loadable", "why_not", "files"}, each file {"name", "size", "quant", "sha256",
"why_not"}. What loads is what core/formats reads: HF_ARCHITECTURES for a folder, the GGUF architectures and
tensor types of gguf_io; the lists live there, not here.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from ..errors import SolError
from ..formats.checkpoint import HF_ARCHITECTURES, hf_model_type
from ..formats.gguf_io import ARCHITECTURES as GGUF_ARCHITECTURES
from ..formats.gguf_io import READ_TYPES
from .client import api, calling, offline

# What a Hugging Face folder needs beside its weights to load, tokenize and chat. config.json comes last on
# download: a snapshot is a model (for `sol models list`) only once everything else is there.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json", "model.safetensors.index.json", "config.json")
# A quantization's name in a GGUF file name (llama.cpp's file types: Q4_K_M, Q8_0, IQ4_XS, F16, ...).
QUANT = re.compile(r"I?Q\d+(_[0-9A-Z]+)*|TQ\d_\d|MXFP4(_MOE)?|BF16|F16|F32")
SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.I)
DEFAULT_QUANT = "Q4_K_M"   # what most GGUF repositories recommend: a quarter of float16's bytes, close to it
EXPAND = ["downloads", "likes", "gated", "tags"]


def quant_of(name: str) -> str | None:
    """The quantization a GGUF file's name says (the last part that reads as one), upper-case, or None."""
    stem = name.rsplit("/", 1)[-1][:-len(".gguf")] if name.lower().endswith(".gguf") else name
    for part in reversed(re.split(r"[-.]", stem)):
        if QUANT.fullmatch(part.upper()):
            return part.upper()
    return None


def quant_problem(quant: str | None) -> str | None:
    """Why Sol cannot read a GGUF file of this quantization, or None. A K-quant mix (Q4_K_M) is named by its
    main type (Q4_K); its other tensors are of types Sol reads too."""
    if quant is None:
        return None   # the name does not say: the file's own header will, on loading
    base = re.sub(r"^(Q\d_K)_(S|M|L|XS|XL)$", r"\1", quant)
    if base in READ_TYPES:
        return None
    return f"{quant}: Sol reads GGUF files of the types {', '.join(READ_TYPES)}"


def describe(info, fmt: str | None = None) -> dict:
    """The entry for a huggingface_hub ModelInfo read with files_metadata=True. `fmt`: the format asked for
    (a repository with both kinds of weights is described as that one)."""
    siblings = {s.rfilename: s for s in info.siblings or []}
    ggufs = [n for n in siblings if n.lower().endswith(".gguf") and not n.rsplit("/", 1)[-1].startswith("mmproj")]
    tensors = [n for n in siblings if n.endswith(".safetensors")]
    kind = "gguf" if ggufs and (fmt != "safetensors" or not tensors) else "safetensors" if tensors else None
    entry = {"repo": info.id, "format": kind, "family": None, "parameters": None, "downloads": info.downloads,
             "likes": info.likes, "gated": bool(info.gated), "sha": info.sha, "loadable": False, "why_not": None,
             "files": []}
    if kind == "gguf":
        _gguf_entry(entry, info, [siblings[n] for n in sorted(ggufs)])
    elif kind == "safetensors":
        _folder_entry(entry, info, siblings)
    else:
        entry["why_not"] = "no *.safetensors or *.gguf weights (Sol downloads those two formats)"
    return entry


def _file(s, why_not: str | None = None, quant: str | None = None) -> dict:
    lfs = s.lfs
    return {"name": s.rfilename, "size": s.size if s.size is not None else (lfs.size if lfs else None),
            "quant": quant, "sha256": lfs.sha256 if lfs else None, "why_not": why_not}


def _gguf_entry(entry: dict, info, files: list) -> None:
    gguf = info.gguf or {}
    arch = gguf.get("architecture")
    entry["family"], entry["parameters"] = arch, gguf.get("total")
    for s in files:
        q = quant_of(s.rfilename)
        why = "split into parts; Sol reads one-file GGUF models" if SPLIT.search(s.rfilename) else quant_problem(q)
        entry["files"].append(_file(s, why, q))
    entry["files"].sort(key=lambda f: (f["size"] is None, f["size"] or 0))
    if arch is not None and arch not in GGUF_ARCHITECTURES:
        entry["why_not"] = (f"architecture {arch!r} is not supported; Sol reads GGUF models of the "
                            f"{', '.join(GGUF_ARCHITECTURES)} architectures")
    elif not any(f["why_not"] is None for f in entry["files"]):
        entry["why_not"] = "; ".join(sorted({f["why_not"] for f in entry["files"]}))
    entry["loadable"] = entry["why_not"] is None


def _folder_entry(entry: dict, info, siblings: dict) -> None:
    config = info.config or {}
    mt = hf_model_type(config) if config else None
    entry["family"] = mt
    if info.safetensors:
        entry["parameters"] = info.safetensors.total
    weights = sorted(n for n in siblings if n.endswith(".safetensors") and "/" not in n)
    entry["files"] = [_file(siblings[n]) for n in weights] + [_file(siblings[n]) for n in SIDE_FILES if n in siblings]
    if "config.json" not in siblings:
        entry["why_not"] = "no config.json"
    elif mt not in HF_ARCHITECTURES:
        entry["why_not"] = f"model_type {mt!r} is not supported; Sol loads {', '.join(HF_ARCHITECTURES)}"
    elif "tokenizer.json" not in siblings:
        entry["why_not"] = "no tokenizer.json (Sol reads the Hugging Face tokenizers format)"
    elif not weights:
        entry["why_not"] = "no *.safetensors weights at the top of the repository"
    entry["loadable"] = entry["why_not"] is None


def search(query: str, fmt: str | None = None, limit: int = 20, token: str | None = None) -> list[dict]:
    """Repositories matching `query`, most downloaded first, each described (its files with their sizes).
    `fmt`: "gguf" or "safetensors" to ask only for those."""
    if offline():
        raise SolError("search: HF_HUB_OFFLINE=1 is set, so the Hub is not asked; unset it to search")
    hub = api()
    with calling("search"):
        hits = list(hub.list_models(search=query or None, filter=fmt, sort="downloads", limit=limit,
                                    expand=EXPAND, token=token))
    with ThreadPoolExecutor(max_workers=8) as pool:   # one file list a repository: read them side by side
        return list(pool.map(lambda m: _details(hub, m, fmt, token), hits))


def _details(hub, hit, fmt: str | None, token) -> dict:
    try:
        with calling(f"search: {hit.id}", hit.id, token):
            info = hub.model_info(hit.id, files_metadata=True, token=token)
    except SolError as e:   # one repository that cannot be read does not hide the others
        return {"repo": hit.id, "format": None, "family": None, "parameters": None, "downloads": hit.downloads,
                "likes": hit.likes, "gated": bool(hit.gated), "sha": None, "loadable": False,
                "why_not": f"its file list cannot be read: {e}", "files": []}
    entry = describe(info, fmt)
    # The search's own counts: the same numbers, and what the Hub sorted by.
    entry["downloads"], entry["likes"] = hit.downloads, hit.likes
    return entry


def repository(repo: str, revision: str | None = None, token: str | None = None, fmt: str | None = None) -> dict:
    """One repository's entry, read from the Hub."""
    with calling(f"get {repo}", repo, token):
        info = api().model_info(repo, revision=revision, files_metadata=True, token=token)
    return describe(info, fmt)


def choose(entry: dict, file: str | None = None, quant: str | None = None) -> list[dict]:
    """The files to download: a folder's weights and side files, or one GGUF file (--file, --quant, else
    Q4_K_M where there is one, else the smallest Sol reads)."""
    repo = entry["repo"]
    if entry["format"] != "gguf":
        if file or quant:
            raise SolError(f"--file/--quant choose one GGUF file; {repo} is a {entry['format']} repository, "
                           "and get downloads the files it needs")
        if not entry["loadable"]:
            raise SolError(f"{repo}: Sol cannot load it: {entry['why_not']}")
        return entry["files"]
    if entry["why_not"]:
        raise SolError(f"{repo}: Sol cannot load it: {entry['why_not']}")
    names = ", ".join(f"{f['name']} ({f['quant'] or '?'})" for f in entry["files"])
    if file:
        picked = [f for f in entry["files"] if f["name"] == file]
        if not picked:
            raise SolError(f"--file {file}: {repo} has no such GGUF file; it has {names}")
    elif quant:
        picked = [f for f in entry["files"] if (f["quant"] or "").upper() == quant.upper()]
        if not picked:
            raise SolError(f"--quant {quant}: {repo} has no file of that quantization; it has {names}")
        if len(picked) > 1:
            raise SolError(f"--quant {quant}: {repo} has {len(picked)} such files "
                           f"({', '.join(f['name'] for f in picked)}); choose one with --file")
    else:
        usable = [f for f in entry["files"] if f["why_not"] is None]
        picked = [f for f in usable if f["quant"] == DEFAULT_QUANT][:1] or usable[:1]
    if picked[0]["why_not"]:
        raise SolError(f"{repo}/{picked[0]['name']}: Sol cannot load it: {picked[0]['why_not']}")
    return picked[:1]


def public(entry: dict) -> dict:
    """The entry as `sol models search --json` prints it."""
    keys = ("repo", "format", "parameters", "downloads", "likes", "loadable", "why_not")
    return {**{k: entry[k] for k in keys},
            "files": [{k: f[k] for k in ("name", "size", "quant")} for f in entry["files"]]}
