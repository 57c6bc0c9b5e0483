"""Where a model's evaluation results are kept, and reading them back across its lineage.

Results go beside the model, `MODEL/evals/NAME.json`, when the model is a folder Sol may write: one of
its own or the user's. The shipped models, the Hugging Face cache, Ollama's and LM Studio's stores and
single GGUF files are left as they are: their results go under Sol's data folder instead,
`DATA/evals/<model name>/NAME.json`. NAME is the task and the data file's name (`choice-arith.json`);
the file records the data file's SHA-256, so a result can be told from one on other data of that name.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ..atomic import write_text
from ..data.corpus import sha256
from ..formats import registry


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def sols_to_write(model_path: str | Path) -> bool:
    """A model folder Sol may put its results in (not a file, not another program's store, writable)."""
    p = Path(model_path)
    others = [registry.builtin_models_dir(), registry.hf_cache_dir(), registry.ollama_dir(),
              *registry.lmstudio_dirs()]
    return p.is_dir() and not any(_inside(p, root) for root in others) and os.access(p, os.W_OK)


def model_key(model_path: str | Path) -> str:
    """The folder name under DATA/evals for a model Sol may not write: its hub id for the HF cache
    (org--name), else the file's or folder's name; only letters, digits and . _ - kept."""
    p = Path(model_path)
    name = p.stem if p.is_file() else p.name
    for part in p.parts:
        if part.startswith("models--") and _inside(p, registry.hf_cache_dir()):
            name = part[len("models--"):]
    return re.sub(r"[^\w.-]+", "_", name) or "model"


def evals_dir(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p / "evals" if sols_to_write(p) else registry.data_dir() / "evals" / model_key(p)


def result_name(task: str, data: str | Path) -> str:
    return re.sub(r"[^\w.-]+", "_", f"{task}-{Path(data).stem}") + ".json"


def write(model_path: str | Path, task: str, data: str | Path, summary: dict, settings: dict | None = None) -> Path:
    """Keep one result (atomically, replacing an earlier one of the same task and data file); returns its path."""
    out = evals_dir(model_path) / result_name(task, data)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {**summary, "task": task, "model_path": str(Path(model_path).resolve()),
              "data": str(Path(data).resolve()), "data_sha256": sha256(Path(data)),
              "settings": settings or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text(out, json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    return out


def read(model_path: str | Path) -> list[dict]:
    """The results kept for a model, each with "file" (its path); a file that cannot be read is skipped."""
    found = []
    folder = evals_dir(model_path)
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(d, dict):
            found.append({**d, "file": str(f)})
    return found


def _meta(path: Path) -> dict:
    try:
        d = json.loads((path / "sol.json").read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def lineage(model_path: str | Path, depth: int = 8) -> list[dict]:
    """The models a bar chart compares, oldest first: the parents sol.json names (a stage's input), this
    model's checkpoints (`checkpoints/step_*`), then the model itself. Each {"name", "path", "stage", "step"}."""
    p = Path(model_path)
    chain = []
    meta = _meta(p) if p.is_dir() else {}
    parent = meta.get("parent") if isinstance(meta.get("parent"), dict) else None
    while parent and len(chain) < depth and Path(str(parent.get("path", ""))).exists():
        pp = Path(parent["path"])
        chain.insert(0, {"name": parent.get("name") or pp.name, "path": str(pp), "stage": parent.get("stage"),
                         "step": None})
        pm = _meta(pp)
        parent = pm.get("parent") if isinstance(pm.get("parent"), dict) else None
    folder = p / "checkpoints"
    for c in sorted(c for c in folder.glob("step_*") if c.is_dir()) if folder.is_dir() else []:
        step = c.name[len("step_"):]
        chain.append({"name": f"{meta.get('name') or p.name} @ {int(step) if step.isdigit() else step}",
                      "path": str(c), "stage": meta.get("stage"), "step": int(step) if step.isdigit() else None})
    chain.append({"name": meta.get("name") or p.name, "path": str(p), "stage": meta.get("stage"),
                  "step": meta.get("steps")})
    return chain


def across(model_path: str | Path) -> list[dict]:
    """lineage() with each entry's kept results under "results": what the Evaluate view's bar chart draws."""
    return [{**m, "results": read(m["path"])} for m in lineage(model_path)]
