"""Where models live on disk, and finding them by name.

- Sol models: the user data directory's `models/` folder (platformdirs;
  `SOL_HOME` overrides it), plus the starter model shipped in the package.
- Hugging Face models: the HF cache (`HF_HUB_CACHE`, or `HF_HOME`/hub, or
  ~/.cache/huggingface/hub), read in place, never copied.
- GGUF files, read in place: *.gguf in Sol's models folder and in the HF cache's snapshots; Ollama's store
  (`OLLAMA_MODELS`, default ~/.ollama/models: a manifest per model and tag names the model layer's blob) as
  `ollama:name:tag`; LM Studio's models folders (~/.lmstudio/models, ~/.cache/lm-studio/models:
  publisher/repo/file.gguf) as `lmstudio:publisher/repo/file.gguf`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import SolError


def data_dir() -> Path:
    env = os.environ.get("SOL_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs
    return Path(platformdirs.user_data_dir("sol", appauthor=False))


def models_dir() -> Path:
    return data_dir() / "models"


def builtin_models_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "resources" / "models"


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def _hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot `refs/main` points at, else the newest one."""
    snaps = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = snaps / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if snaps.is_dir():
        dirs = sorted((d for d in snaps.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
        return dirs[-1] if dirs else None
    return None


def list_models(include_broken: bool = False) -> list[dict]:
    """Every loadable model: {"name", "path", "format", "architecture", "parameters"}. With include_broken,
    also the folders of Sol's models folder that cannot be read, as {"name", "path", "broken": why}."""
    from .checkpoint import inspect  # here, not at the top: it imports torch, which costs seconds
    found: list[dict] = []
    adapters: list[dict] = []
    for root in (builtin_models_dir(), models_dir()):
        for d in _sol_model_dirs(root):
            entry = _adapter_entry(d) if (d / "adapter_config.json").is_file() else _sol_entry(d)
            if entry and (include_broken or "broken" not in entry):
                (adapters if entry.get("format") == "lora" else found).append(entry)
    cache = hf_cache_dir()
    if cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            snap = _hf_snapshot(repo)
            info = inspect(snap) if snap else None
            if info:
                name = repo.name[len("models--"):].replace("--", "/")
                found.append({"name": name, "path": str(snap), **info})
    for name, path in gguf_files():
        entry = _gguf_entry(name, path)
        if include_broken or "broken" not in entry:
            found.append(entry)
    return found + [_with_base(a, found) for a in adapters]


def _adapter_entry(d: Path) -> dict:
    """A LoRA adapter folder: {"name", "path", "format": "lora", "base", "parameters"}; base is what its
    adapter_config.json names (base_model_name_or_path) until _with_base finds that model here."""
    import json
    try:
        cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
        base = str(cfg.get("base_model_name_or_path") or "")
    except (OSError, ValueError, AttributeError) as e:
        return {"name": d.name, "path": str(d), "format": "lora", "base": None, "architecture": None,
                "parameters": None, "broken": f"{d / 'adapter_config.json'}: cannot be read ({e})"}
    params = None
    try:
        from .checkpoint import safetensors_numel
        params = safetensors_numel(d / "adapter_model.safetensors")
    except Exception:   # a missing or damaged weights file: the adapter still lists, loading says why
        pass
    return {"name": d.name, "path": str(d), "format": "lora", "base": base, "architecture": None,
            "parameters": params, "r": cfg.get("r")}


def _with_base(entry: dict, models: list[dict]) -> dict:
    """The adapter's base as `sol models list` names it, where that model is here (matched by path, or by its
    last name part as a hub id's model name matches a local folder)."""
    want = entry.get("base") or ""
    if not want:
        return entry
    short = want.rstrip("/").split("/")[-1].lower()
    for m in models:
        if (str(Path(m["path"])) == str(Path(want).expanduser()) or m["name"] == want
                or m["name"].split("/")[-1].lower() == short):
            return {**entry, "base": m["name"]}
    return entry


# ---- GGUF files: Sol's folder, the HF cache, Ollama, LM Studio ------------------
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


def ollama_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def lmstudio_dirs() -> list[Path]:
    return [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def gguf_files() -> list[tuple[str, Path]]:
    """(name, path) of every GGUF file Sol knows where to find; names only, no file is opened but manifests."""
    out = [(f.name, f) for f in _glob(models_dir(), "*.gguf")]
    cache = hf_cache_dir()
    for repo in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        snap = _hf_snapshot(repo)
        if snap:
            repo_name = repo.name[len("models--"):].replace("--", "/")
            out += [(f"{repo_name}/{f.relative_to(snap).as_posix()}", f) for f in _glob(snap, "**/*.gguf")]
    out += ollama_models()
    seen = set()
    for root in lmstudio_dirs():
        for f in _glob(root, "*/*/*.gguf"):
            name = "lmstudio:" + f.relative_to(root).as_posix()
            if name not in seen:
                seen.add(name)
                out.append((name, f))
    return out


def _glob(root: Path, pattern: str) -> list[Path]:
    try:
        return sorted(p for p in root.glob(pattern) if p.is_file()) if root.is_dir() else []
    except OSError:
        return []


def ollama_models() -> list[tuple[str, Path]]:
    """Ollama's manifests/<registry>/<namespace>/<model>/<tag>, each naming its model layer's blob."""
    root = ollama_dir()
    out = []
    for manifest in _glob(root / "manifests", "*/*/*/*"):
        registry, namespace, model, tag = manifest.relative_to(root / "manifests").parts
        name = f"{model}:{tag}"
        if namespace != "library":
            name = f"{namespace}/{name}"
        if registry != "registry.ollama.ai":
            name = f"{registry}/{name}"
        blob = _ollama_blob(root, manifest)
        if blob is not None:
            out.append((f"ollama:{name}", blob))
    return out


def _ollama_blob(root: Path, manifest: Path) -> Path | None:
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    for layer in layers:
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_LAYER:
            digest = str(layer.get("digest", ""))
            if re.fullmatch(r"sha256:[0-9a-f]{64}", digest):   # a name, never a path out of the store
                return root / "blobs" / digest.replace(":", "-")
    return None


def _gguf_entry(name: str, path: Path) -> dict:
    from .gguf_io import inspect_gguf
    try:
        return {"name": name, "path": str(path), **inspect_gguf(path)}
    except SolError as e:
        return {"name": name, "path": str(path), "format": "gguf", "architecture": None, "parameters": None,
                "quantization": None, "broken": str(e)}


def _sol_model_dirs(root: Path) -> list[Path]:
    try:
        return sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    except OSError:
        return []


def _sol_entry(d: Path) -> dict | None:
    """One folder of Sol's models folder: a model, a broken one (with why), or None (not a model)."""
    from .checkpoint import inspect_or_raise
    try:
        info = inspect_or_raise(d)
    except SolError as e:
        return {"name": d.name, "path": str(d), "format": None, "architecture": None, "parameters": None,
                "broken": str(e)}
    return {"name": d.name, "path": str(d), **info} if info else None


def resolve(name_or_path: str) -> Path:
    """A model directory from a path, or from a name that `sol models list` shows."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    wanted = name_or_path
    if wanted.startswith("ollama:") and ":" not in wanted[len("ollama:"):]:
        wanted += ":latest"   # as Ollama reads a name without a tag
    for name, path in gguf_files():
        if name == wanted:
            return path
    for m in list_models(include_broken=True):   # a broken one loads, to say what is wrong with it
        if m["name"] == name_or_path:
            return Path(m["path"])
    raise SolError(f"--model {name_or_path}: no such directory, and no model of that name in `sol models list`")
