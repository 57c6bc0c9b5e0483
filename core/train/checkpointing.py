"""Checkpoints: a model directory plus what it takes to continue training.

    out/checkpoints/step_000200/
        config.json, model.safetensors, tokenizer.json, sol.json   (a loadable model)
        trainer.pt   optimizer state, RNG states, step, data position

Each is written under a temporary name and renamed into place, so a crash or
a SIGKILL mid-write leaves the previous checkpoint whole; `--resume` takes
the newest complete one. trainer.pt holds only tensors and plain values and
is read back with `weights_only=True`.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from ..errors import SolError

STATE = "trainer.pt"


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    d = checkpoints_dir(out)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: Path, step: int, write_model, trainer_state: dict, keep: int = 2) -> Path:
    """write_model(dir) writes the model directory; trainer_state goes to trainer.pt beside it."""
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(tmp)
    torch.save(trainer_state, tmp / STATE)
    if final.exists():   # the same step saved twice (a stop right after a periodic save)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    # Older checkpoints are this run's own scratch files: keep the newest few.
    for p in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SolError(f"{ckpt / STATE}: cannot read the checkpoint ({str(e).splitlines()[0][:120]}); "
                       "delete this checkpoint folder to resume from the one before") from None
