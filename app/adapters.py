"""LoRA adapters in the models list (core/formats/registry.list_models): which model each belongs to.

An adapter entry is {"name", "path", "format": "lora", "base", ...}, where "base" is its base model's name in
the same list when that model is here, else the path or hub id its adapter_config.json names."""
from __future__ import annotations

from pathlib import Path


def is_adapter(entry: dict) -> bool:
    return entry.get("format") == "lora"


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return a == b


def base_entry(adapter: dict, models: list[dict]) -> dict | None:
    """The list entry of the adapter's base model, or None where that model is not in the list."""
    want = adapter.get("base") or ""
    if not want:
        return None
    for m in models:
        if not is_adapter(m) and (m["name"] == want or _same_path(m["path"], want)):
            return m
    return None


def adapters_for(models: list[dict], base_path: str, base_name: str | None = None) -> list[dict]:
    """The adapters in `models` made for the model at `base_path` (named `base_name` where it was loaded from
    elsewhere), broken ones left out."""
    out = []
    for a in models:
        if not is_adapter(a) or "broken" in a:
            continue
        base = base_entry(a, models)
        if base is not None and _same_path(base["path"], base_path):
            out.append(a)
        elif base is None and (_same_path(a.get("base") or "", base_path)
                               or (base_name and a.get("base") == base_name)):
            out.append(a)
    return out


def with_adapters_under_bases(models: list[dict]) -> list[tuple[dict, int]]:
    """The list as the Models panel shows it: each model, then its adapters (depth 1); adapters whose base is
    not in the list last, at depth 1 too (the panel says which base they need)."""
    bases = [m for m in models if not is_adapter(m)]
    placed: set[int] = set()
    rows: list[tuple[dict, int]] = []
    for m in bases:
        rows.append((m, 0))
        for i, a in enumerate(models):
            if i not in placed and is_adapter(a) and base_entry(a, models) is m:
                rows.append((a, 1))
                placed.add(i)
    rows += [(a, 1) for i, a in enumerate(models) if is_adapter(a) and i not in placed]
    return rows
