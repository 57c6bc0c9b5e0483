"""Where models live on disk, and finding them by name.

- Sol models: the user data directory's `models/` folder (platformdirs;
  `SOL_HOME` overrides it), plus the starter model shipped in the package.
- Hugging Face models: the HF cache (`HF_HUB_CACHE`, or `HF_HOME`/hub, or
  ~/.cache/huggingface/hub), read in place, never copied.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import SolError


def data_dir() -> Path:
    env = os.environ.get("SOL_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs
    return Path(platformdirs.user_data_dir("sol", appauthor=False))


def models_dir() -> Path:
    return data_dir() / "models"


def builtin_models_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "resources" / "models"


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
    from .checkpoint import inspect   # here, not at the top: it imports torch, which costs seconds
    found: list[dict] = []
    for root in (builtin_models_dir(), models_dir()):
        for d in _sol_model_dirs(root):
            entry = _sol_entry(d)
            if entry and (include_broken or "broken" not in entry):
                found.append(entry)
    cache = hf_cache_dir()
    if cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            snap = _hf_snapshot(repo)
            info = inspect(snap) if snap else None
            if info:
                name = repo.name[len("models--"):].replace("--", "/")
                found.append({"name": name, "path": str(snap), **info})
    return found


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
    for m in list_models(include_broken=True):   # a broken one loads, to say what is wrong with it
        if m["name"] == name_or_path:
            return Path(m["path"])
    raise SolError(f"--model {name_or_path}: no such directory, and no model of that name in `sol models list`")
