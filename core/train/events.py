"""What a training run tells the world: JSON lines, or a progress bar for people.

With `--events -` (or a file) every event is one JSON object on its own line,
flushed at once, so the GUI (which starts `sol train ... --events -` as a
child process) can plot it live. Without it a one-line progress bar on stderr.
Under DDP only rank 0 speaks.
"""
from __future__ import annotations

import json
import math
import sys
import time


def _clean(v):
    # JSON has no NaN or infinity; a diverged loss is reported as null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class JsonEvents:
    def __init__(self, target: str):
        self.fh = sys.stdout if target == "-" else open(target, "a", encoding="utf-8")

    def __call__(self, event: dict) -> None:
        self.fh.write(json.dumps(_clean(event), ensure_ascii=False) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()


STEP_FIELDS = (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s"), ("eta_s", "eta {:.0f}s"))


def step_line(e: dict, total: int) -> str:
    """The bar and whichever of loss, lr, tokens/s and eta the step event has (a plugin's stage may send
    only some; anything else numeric it sends is shown too)."""
    step = e.get("step", 0) if isinstance(e.get("step"), int) else 0
    n = max(0, min(30, 30 * step // max(1, total)))
    parts = [f"[{'#' * n}{'.' * (30 - n)}] {step}/{total}"]
    known = {k for k, _ in STEP_FIELDS} | {"type", "step"}
    for key, fmt in STEP_FIELDS:
        if isinstance(e.get(key), (int, float)):
            parts.append(fmt.format(e[key]))
    parts += [f"{k} {v:.4g}" for k, v in e.items() if k not in known and isinstance(v, (int, float))
              and not isinstance(v, bool)]
    return " ".join(parts)


class ProgressBar:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.total = 0
        self.last = 0.0

    def __call__(self, e: dict) -> None:
        t = e["type"]
        w = self.stream.write
        if t == "start":
            self.total = e.get("max_steps", 0)
            dev = e.get("device", {})
            w(f"{e.get('stage')}: {e.get('parameters', 0):,} parameters on {dev.get('type')} ({dev.get('name')})\n")
            if dev.get("warning"):
                w(f"note: {dev['warning']}\n")
        elif t == "step":
            now = time.monotonic()
            if now - self.last < 0.2 and e.get("step", 0) < self.total:
                return
            self.last = now
            w("\r" + step_line(e, self.total) + " ")
        elif t == "eval":
            w("\n" + "eval " + " ".join(f"{k} {v:.4f}" for k, v in e.items()
                                        if isinstance(v, float)) + f" (step {e['step']})\n")
        elif t == "sample":
            w(f"\n--- sample at step {e['step']} ---\n{e['text']}\n---\n")
        elif t == "progress":   # work before the first step: {"what", "done", "total"} in bytes
            done, total = e.get("done", 0), e.get("total", 0)
            w(f"\r{e.get('what', 'preparing')}: {100 * done / max(1, total):.0f} % "
              f"({done / 1e6:,.1f} of {total / 1e6:,.1f} MB)" + ("\n" if done >= total else ""))
        elif t == "checkpoint":
            pass
        elif t == "done":
            w(f"\ndone: {e.get('out')}" + (" (stopped, resume with --resume)" if e.get("stopped") else "") + "\n")
        elif t == "error":
            w("\n")   # end the bar's line; the CLI prints the one `error:` line itself
        self.stream.flush()

    def close(self) -> None:
        pass


def make_emitter(target: str | None, rank: int = 0):
    if rank != 0:
        return lambda event: None
    return JsonEvents(target) if target else ProgressBar()
