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


def list_models() -> list[dict]:
    """Every loadable model: {"name", "path", "format", "architecture", "parameters"}."""
    from .checkpoint import inspect   # here, not at the top: it imports torch, which costs seconds
    found: list[dict] = []
    for root in (builtin_models_dir(), models_dir()):
        if root.is_dir():
            for d in sorted(root.iterdir()):
                info = inspect(d) if d.is_dir() else None
                if info:
                    found.append({"name": d.name, "path": str(d), **info})
    cache = hf_cache_dir()
    if cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            snap = _hf_snapshot(repo)
            info = inspect(snap) if snap else None
            if info:
                name = repo.name[len("models--"):].replace("--", "/")
                found.append({"name": name, "path": str(snap), **info})
    return found


def resolve(name_or_path: str) -> Path:
    """A model directory from a path, or from a name that `sol models list` shows."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    for m in list_models():
        if m["name"] == name_or_path:
            return Path(m["path"])
    raise SolError(f"--model {name_or_path}: no such directory, and no model of that name in `sol models list`")
