"""A local stand-in for the Hugging Face Hub's HTTP API, served on 127.0.0.1 for the real huggingface_hub
client (HF_ENDPOINT points at it). It answers what the installed huggingface_hub asks:

- GET /api/models?search=&filter=&sort=&limit=&expand=       HfApi.list_models
- GET /api/models/OWNER/NAME[/revision/REV][?blobs=true]     HfApi.model_info (files_metadata: sizes, LFS sha256)
- HEAD, GET /OWNER/NAME/resolve/REV/PATH                      get_hf_file_metadata, hf_hub_download, http_get:
  X-Repo-Commit, ETag (X-Linked-Etag and X-Linked-Size for LFS files), Content-Length, Range requests (206).
  No X-Xet-Hash header: the library downloads over plain HTTP, as it does from any server without Xet.

Every request is logged (`log`: method, path, Range). Knobs: `cut(repo, file, at)`: the next GET of the whole
file sends `at` bytes and drops the connection, and every GET of that file is refused (500) until `heal()`,
so the library's own retries fail too; `spoil(repo, file)`: one byte changed in what is sent;
`slow(repo, file, seconds)`: that long a pause after each 64 KiB sent;
a repository made with gated=True answers 401 GatedRepo to a file request without a token.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


class Repo:
    def __init__(self, repo_id: str, files: dict[str, bytes], tags: list[str], config: dict | None = None,
                 gguf: dict | None = None, parameters: int | None = None, gated: bool = False,
                 downloads: int = 0, likes: int = 0):
        self.id, self.files, self.tags, self.config, self.gguf = repo_id, files, tags, config, gguf
        self.parameters, self.gated, self.downloads, self.likes = parameters, gated, downloads, likes
        h = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            h.update(name.encode() + hashlib.sha1(files[name]).digest())
        self.sha = h.hexdigest()

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else hashlib.sha1(data).hexdigest()

    def listing(self) -> dict:
        return {"_id": self.id, "id": self.id, "modelId": self.id, "downloads": self.downloads, "likes": self.likes,
                "gated": "auto" if self.gated else False, "private": False, "tags": self.tags, "sha": self.sha}

    def info(self, blobs: bool) -> dict:
        siblings = []
        for name, data in sorted(self.files.items()):
            s = {"rfilename": name}
            if blobs:
                s.update(size=len(data), blobId=hashlib.sha1(data).hexdigest())
                if name.endswith(LFS_SUFFIXES):
                    s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        out = {**self.listing(), "siblings": siblings, "library_name": "gguf" if self.gguf else "transformers"}
        if self.config is not None:
            out["config"] = self.config
        if self.gguf is not None:
            out["gguf"] = self.gguf
        if self.parameters is not None and not self.gguf:
            out["safetensors"] = {"parameters": {"F32": self.parameters}, "total": self.parameters}
        return out


class StandIn:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.cuts: dict[tuple, int] = {}
        self.refused: set[tuple] = set()
        self.pauses: dict[tuple, float] = {}
        self.corrupt: set[tuple] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: Repo) -> Repo:
        self.repos[repo.id] = repo
        return repo

    def cut(self, repo: str, file: str, at: int) -> None:
        self.cuts[(repo, file)] = at

    def heal(self) -> None:
        self.cuts.clear()
        self.refused.clear()

    def spoil(self, repo: str, file: str) -> None:
        """Serve the file with one byte changed (its size and the metadata's sha256 as before)."""
        self.corrupt.add((repo, file))

    def slow(self, repo: str, file: str, seconds: float) -> None:
        self.pauses[(repo, file)] = seconds

    def gets(self, repo: str, file: str | None = None, since: int = 0) -> list[dict]:
        """The GET requests for the files of `repo` (or of one file), from the `since`-th request of the log on."""
        prefix = f"/{repo}/resolve/"
        return [r for r in self.log[since:] if r["method"] == "GET" and r["path"].startswith(prefix)
                and (file is None or r["path"].split("/", 5)[-1] == file)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: StandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):   # quiet: the test reads hub.log
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        # ---- routing ------------------------------------------------------------------------------
        def _route(self, head: bool):
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            with hub.lock:
                hub.log.append({"method": self.command, "path": path, "range": self.headers.get("Range")})
            parts = path.strip("/").split("/")
            if path == "/api/models":
                return self._json(self._search(query))
            if parts[:2] == ["api", "models"] and len(parts) in (4, 6):
                repo = hub.repos.get("/".join(parts[2:4]))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if len(parts) == 6 and (parts[4] != "revision" or parts[5] not in ("main", repo.sha)):
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                return self._json(repo.info(blobs="blobs" in query))
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file(hub.repos.get("/".join(parts[:2])), parts[3], "/".join(parts[4:]), head)
            return self._error(404, None, "not found")

        def _search(self, query: dict) -> list:
            words = (query.get("search") or [""])[0].lower().split()
            filters = query.get("filter") or []
            found = [r for r in hub.repos.values() if all(w in r.id.lower() for w in words)
                     and all(f in r.tags for f in filters)]
            found.sort(key=lambda r: -r.downloads)
            limit = int((query.get("limit") or ["1000"])[0])
            return [r.listing() for r in found[:limit]]

        # ---- files --------------------------------------------------------------------------------
        def _file(self, repo: Repo | None, rev: str, name: str, head: bool):
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if rev not in ("main", repo.sha):
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            if name not in repo.files:
                return self._error(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": repo.sha})
            if repo.gated and not (self.headers.get("Authorization") or "").startswith("Bearer "):
                return self._error(401, "GatedRepo", f"Access to model {repo.id} is restricted. You must have "
                                   "access to it and be authenticated to access it. Please log in.")
            key = (repo.id, name)
            if not head and key in hub.refused:
                return self._error(500, None, "Internal Error: the stand-in refuses this file until heal()")
            data = repo.files[name]
            start, end, status = 0, len(data) - 1, 200
            rng = self.headers.get("Range")
            if rng and not head:
                lo, _, hi = rng.removeprefix("bytes=").partition("-")
                start, end, status = int(lo), int(hi) if hi else len(data) - 1, 206
                end = min(end, len(data) - 1)
            etag = f'"{repo.etag(name)}"'
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            if name.endswith(LFS_SUFFIXES):
                self.send_header("X-Linked-Etag", etag)
                self.send_header("X-Linked-Size", str(len(data)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if head:
                return
            if key in hub.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            body = data[start:end + 1]
            cut = hub.cuts.pop(key, None) if not rng else None
            if cut is not None:   # send the first `cut` bytes, then drop the connection; refuse the retries
                hub.refused.add(key)
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            pause = hub.pauses.get(key, 0.0)
            try:
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i:i + (1 << 16)])
                    if pause:
                        self.wfile.flush()
                        time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):   # the client stopped reading (a Cancel)
                self.close_connection = True

        # ---- answers ------------------------------------------------------------------------------
        def _json(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, extra: dict | None = None):
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


# ---- the repositories the tests serve ---------------------------------------------------------------
FOLDER_REPO = "sol-test/tiny-llama"
GGUF_REPO = "sol-test/tiny-llama-GGUF"
MAMBA_REPO = "sol-test/tiny-mamba"
GATED_REPO = "sol-test/tiny-gated"


def build_repos(tmp) -> list[Repo]:
    """A tiny Llama as a Hugging Face folder (safetensors + tokenizer, and files get must leave alone), the
    same family wider as GGUF files in two quantizations Sol reads (F32: ~4 MB, so a cut falls mid-file
    past the first MiB; Q8_0) and one it does not (IQ4_XS), a family Sol does not load, and a gated repo."""
    from pathlib import Path

    import torch
    import transformers
    from hf_models import byte_tokenizer, make_hf_model

    from sol.core.formats import gguf_io
    from sol.core.formats.checkpoint import load_model
    tmp = Path(tmp)
    folder = tmp / "tiny-llama"
    make_hf_model("llama-gqa-tied", folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    params = sum(p.numel() for p in load_model(folder).model.parameters())
    files["README.md"] = b"# tiny llama\n"
    files["pytorch_model.bin"] = b"not wanted: get takes the safetensors"
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    repos = [Repo(FOLDER_REPO, files, ["transformers", "safetensors", "llama", "text-generation"], config,
                  parameters=params, downloads=300, likes=7),
             Repo(GATED_REPO, dict(files), ["transformers", "safetensors", "llama"], config, parameters=params,
                  gated=True, downloads=5)]

    wide = tmp / "tiny-llama-wide"
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(wide, safe_serialization=True)
    byte_tokenizer(wide).save(wide / "tokenizer.json")
    lm = load_model(wide)
    ggufs = {f"tiny-llama-{q}.gguf": gguf_io.export_gguf(lm, tmp / f"tiny-llama-{q}.gguf", kind).read_bytes()
             for q, kind in (("F32", "f32"), ("Q8_0", "q8_0"))}
    ggufs["tiny-llama-IQ4_XS.gguf"] = b"GGUF" + bytes(60)   # listed, never downloaded: Sol does not read IQ4_XS
    ggufs["README.md"] = b"# tiny llama, GGUF\n"
    n = sum(p.numel() for p in lm.model.parameters())
    repos.append(Repo(GGUF_REPO, ggufs, ["gguf", "llama"], gguf={"total": n, "architecture": "llama",
                                                                  "context_length": 256},
                      downloads=200, likes=3))
    mamba = {"config.json": json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}).encode(),
             "model.safetensors": files["model.safetensors"], "tokenizer.json": files["tokenizer.json"]}
    repos.append(Repo(MAMBA_REPO, mamba, ["transformers", "safetensors", "mamba"],
                      {"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, parameters=params,
                      downloads=100))
    return repos
