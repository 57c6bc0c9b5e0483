"""Paths to Sol's icons and stylesheet (resources/ is the package sol.resources)."""
from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def icon_path(name: str | None) -> str:
    if not name:
        return ""
    if Path(name).is_absolute():   # a plugin's own icon, shipped in its package
        return name if Path(name).is_file() else ""
    p = RESOURCES / "icons" / name
    return str(p) if p.is_file() else ""


def stylesheet() -> str:
    p = RESOURCES / "style.qss"
    return p.read_text(encoding="utf-8") if p.is_file() else ""
