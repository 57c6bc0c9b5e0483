"""`get`: the files a model needs, from the Hub into the Hugging Face cache, named as `sol models list` names
them (OWNER/REPO for a folder, OWNER/REPO/FILE.gguf for a GGUF file).

A weight file (an LFS file of the repository) is fetched into Sol's own partial file in the cache,
blobs/<sha256>.incomplete: huggingface_hub's http_get asks for the bytes from where that file ends (a Range
request), so Ctrl-C or a dropped connection leaves it for the next `get` to finish. The library's own
hf_hub_download would delete its partial file, and it checks sizes only: Sol checks the finished file's sha256
against the repository's LFS metadata, and only then moves it into the blob store, where hf_hub_download
finds it and links it into the snapshot (refs/ and snapshots/, as every tool that shares the cache expects).
A corrupt download is removed, never listed. config.json comes last: until it is there a folder is no model.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data.corpus import sha256
from ..errors import SolError
from ..formats.registry import hf_cache_dir
from .catalog import choose, quant_of, repository
from .client import Cancelled, Silent, Unreachable, calling, endpoint, headers_for, offline
from .fit import check, model_config, needs, size_text

# huggingface_hub reads a download in pieces of DOWNLOAD_CHUNK_SIZE (10 MiB) and writes, reports and checks for
# Cancel only between them, and a dropped connection loses the piece in flight: Sol reads 1 MiB pieces.
CHUNK = 1 << 20


def repo_dir(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))


def partial_path(repo: str, f: dict) -> Path:
    return repo_dir(repo) / "blobs" / f"{f['sha256']}.incomplete"


def missing_bytes(repo: str, files: list[dict], commit: str | None) -> int:
    """Bytes still to download: files neither in the snapshot of `commit` nor (weights) in the blob store,
    less what partial downloads hold."""
    total = 0
    for f in files:
        if commit and (repo_dir(repo) / "snapshots" / commit / f["name"]).is_file():
            continue
        if f["sha256"] and (repo_dir(repo) / "blobs" / f["sha256"]).is_file():
            continue
        part = partial_path(repo, f) if f["sha256"] else None
        total += (f["size"] or 0) - (part.stat().st_size if part is not None and part.is_file() else 0)
    return max(total, 0)


def reporting(report, cancel=None):
    """A progress-bar class for huggingface_hub that hands (bytes done, bytes in all, file name) of each file
    to `report`, and stops the download (Cancelled) once `cancel` (a threading.Event) is set."""
    class Bar(Silent):
        def __init__(self, *args, total=None, initial=0, desc="", **kwargs):
            self.n, self.total, self.desc = initial or 0, total, desc
            report(self.n, self.total, self.desc)

        def update(self, n=1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("download cancelled")
            self.n += n
            report(self.n, self.total, self.desc)
    return Bar


def get(repo: str, file: str | None = None, quant: str | None = None, revision: str | None = None,
        dtype: str = "auto", context: int | None = None, device: str = "auto", token: str | None = None,
        bar=None, say=None, cancel=None) -> dict:
    """Download what `repo` needs to run (one GGUF file: `file`, or one of quantization `quant`) unless it is
    cached; refuse, before any weight byte, a model that will not fit. `bar`: the progress-bar class
    (huggingface_hub's own by default); `say(line)`: what is happening; `cancel`: a threading.Event that
    stops it (between files here, within one through a reporting() bar).
    Returns {"name", "path", "files", "downloaded"}."""
    from ..devices import pick_device
    say = say or (lambda line: None)
    if context is not None and context < 1:
        raise SolError(f"--context {context}: must be at least 1")
    if offline():
        return _from_cache(repo, file, quant, f"get {repo}: HF_HUB_OFFLINE=1 is set, so the Hub is not asked")
    try:
        entry = repository(repo, revision, token)
    except Unreachable as e:
        return _from_cache(repo, file, quant, str(e))
    files = choose(entry, file, quant)
    dev = pick_device(device)
    need = needs(entry, files, model_config(entry, files, token), dtype, context, dev)
    need["disk"] = missing_bytes(repo, files, entry["sha"])
    check(repo, need, dev)
    total = sum(f["size"] or 0 for f in files)
    say(f"{repo}: {len(files)} file{'s' * (len(files) > 1)}, {size_text(total)} ({size_text(need['disk'])} to "
        f"download); memory: {size_text(need['memory'])} for weights {need['dtype']} and {need['context']:,} "
        "tokens of KV cache")
    paths = {}
    for f in sorted(files, key=lambda f: f["name"] == "config.json"):
        if cancel is not None and cancel.is_set():
            raise Cancelled("download cancelled")
        if f["sha256"]:
            _fetch_verified(repo, f, revision or "main", token, bar)
        paths[f["name"]] = _link(repo, f, revision or "main", token, bar)
    if entry["format"] == "gguf":
        name, path = f"{repo}/{files[0]['name']}", paths[files[0]["name"]]
    else:
        name, path = repo, paths["config.json"].parent
    return {"name": name, "path": str(path), "files": [f["name"] for f in files], "downloaded": need["disk"]}


def _fetch_verified(repo: str, f: dict, revision: str, token, bar) -> None:
    """The LFS file `f` into the blob store, resumed from its partial file, its sha256 checked."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    blobs = repo_dir(repo) / "blobs"
    if (blobs / f["sha256"]).is_file():
        return
    url = hf_hub_url(repo, f["name"], revision=revision, endpoint=endpoint())
    with calling(f"get {repo}", repo, token):
        meta = get_hf_file_metadata(url, token=token)
    from huggingface_hub import constants
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, CHUNK)
    blob = blobs / (meta.etag or f["sha256"])   # the name hf_hub_download looks for (an LFS file's etag: its sha256)
    if blob.is_file():
        return
    part = partial_path(repo, f)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > f["size"]:          # not a prefix of this file: start again
        part.unlink()
        have = 0
    try:
        with open(part, "ab") as out, calling(f"get {repo}/{f['name']}", repo, token):
            http_get(meta.location, out, resume_size=have, headers=headers_for(url, meta.location, token),
                     expected_size=f["size"], displayed_filename=f["name"], tqdm_class=bar)
    except Cancelled:
        part.unlink(missing_ok=True)  # cancelled: the user does not want it (Ctrl-C keeps it to resume)
        raise
    except SolError as e:
        kept = part.stat().st_size if part.is_file() else 0
        raise SolError(f"{e}; {size_text(kept)} of {size_text(f['size'])} are kept: run the same get again to "
                       "resume") from None
    got = sha256(part)
    if got != f["sha256"]:
        part.unlink()
        raise SolError(f"{repo}/{f['name']}: the downloaded file's sha256 is {got}, the repository's is "
                       f"{f['sha256']}; the corrupt download was removed, run get again")
    os.replace(part, blob)


def _link(repo: str, f: dict, revision: str, token, bar) -> Path:
    """hf_hub_download: links a blob Sol fetched into the snapshot, or downloads a small file itself."""
    from huggingface_hub import hf_hub_download
    with calling(f"get {repo}/{f['name']}", repo, token):
        # cache_dir: Sol's reading of HF_HOME now; the library's was fixed when it was imported.
        return Path(hf_hub_download(repo, f["name"], revision=revision, token=token, endpoint=endpoint(),
                                    cache_dir=hf_cache_dir(), tqdm_class=bar))


def _from_cache(repo: str, file: str | None, quant: str | None, why: str) -> dict:
    """The cached model `get` would have made, when the Hub cannot be asked; else one error line."""
    from ..formats.registry import list_models
    for m in list_models():
        name = m["name"]
        own = name[len(repo) + 1:] if m.get("format") == "gguf" and name.startswith(repo + "/") else None
        if (name == repo and not (file or quant)) or (own and (own == file or (quant and quant_of(own) ==
                                                                               quant.upper()) or not (file or quant))):
            return {"name": name, "path": m["path"], "files": [], "downloaded": 0, "cached": why}
    raise SolError(f"{why}; and {repo} is not in the Hugging Face cache ({hf_cache_dir()})")
