"""One evaluation from start to end, for the CLI and the GUI alike.

`evaluate()` reads and checks the data before anything runs, then scores item by item: after each item it
calls `progress(done, total)` and `item(result)`, and between items it looks at `cancel` (a
threading.Event), so a window's Cancel or a SIGTERM stops it within one item. A cancelled run raises
Cancelled and keeps nothing; a finished one is kept with results.write unless save is False.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from ..errors import SolError
from . import choice, exact, perplexity, results, tasks


class Cancelled(Exception):
    def __init__(self, done: int, total: int):
        super().__init__(f"cancelled after {done} of {total}; nothing was kept")
        self.done, self.total = done, total


def plan(task: str, lm, data: str | Path, window: int | None = None, stride: int | None = None,
         plugins=None, max_tokens: int = 256, cancel: threading.Event | None = None):
    """(total items, the items' generator, summary function, settings kept with the result)."""
    content = tasks.read(task, data)
    if task == "choice":
        return len(content), choice.items(lm, content, cancel), choice.summary, {}
    if task == "exact":
        if max_tokens < 1:
            raise SolError(f"--max-tokens {max_tokens}: must be at least 1")
        return (len(content), exact.items(lm, content, plugins, max_tokens, cancel), exact.summary,
                {"max_tokens": max_tokens})
    ids = perplexity.encode(lm, content, str(data))
    window, stride = perplexity.check_window(lm, window, stride)
    total = len(perplexity.windows(len(ids), window, stride))
    return (total, perplexity.items(lm, ids, window, stride, cancel), perplexity.summary,
            {"window": window, "stride": stride})


def evaluate(task: str, lm, data: str | Path, *, model_name: str | None = None, result_path: str | Path | None = None,
             window: int | None = None, stride: int | None = None, plugins=None, max_tokens: int = 256,
             progress: Callable[[int, int], None] | None = None, item: Callable[[dict], None] | None = None,
             cancel: threading.Event | None = None, save: bool = True) -> dict:
    """Run `task` ("perplexity" | "choice" | "exact") of `lm` (a LoadedModel) on the file `data`.

    Returns the summary: {"task", "model", "n", "accuracy", "accuracy_norm"} (choice), {"task", "model",
    "tokens", "perplexity", "nll"} (perplexity) or {"task", "model", "n", "exact"} (exact), plus "results":
    the file it was kept in (None when save is False). `result_path`: the model or adapter folder whose
    results these are (default lm.path). `item(r)` gets each question's or window's result."""
    total, items, summarize, settings = plan(task, lm, data, window, stride, plugins, max_tokens, cancel)
    done: list[dict] = []
    if progress is not None:
        progress(0, total)
    for r in items:
        done.append(r)
        if item is not None:
            item(r)
        if progress is not None:
            progress(len(done), total)
    if len(done) < total:
        raise Cancelled(len(done), total)
    summary = {"task": task, "model": model_name or lm.name, **summarize(done)}
    kept = results.write(result_path or lm.path, task, data, summary, settings) if save else None
    return {**summary, "results": str(kept) if kept else None}
