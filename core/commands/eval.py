"""`sol eval perplexity|choice|exact`: score a model on a data file; the result is kept with the model.

With --json each question's line comes first, then the summary as the last line. With --events - (or a
file) progress comes as JSON lines too ({"type": "start" | "progress" | "done" | "error", ...}), flushed
at once, for the GUI that runs this as a child process, as `sol train --events -`. Ctrl-C or SIGTERM
stops it between two items: nothing is kept, and it exits with 130.
"""
from __future__ import annotations

import sys

from .common import add_model_args, load, print_json

HELP = {"perplexity": "perplexity of a text file (strided windows)",
        "choice": "multiple choice from JSONL {question, choices, answer}, as lm-evaluation-harness scores it",
        "exact": "greedy chat answers (tools included) from JSONL {prompt, answer}"}


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, multiple choice, exact answers")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, text in HELP.items():
        t = tasks.add_parser(task, help=text)
        add_model_args(t, adapter=True)
        t.add_argument("--data", required=True, help="the text file (perplexity) or JSONL file (choice, exact)")
        if task == "perplexity":
            t.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
            t.add_argument("--stride", type=int, default=None, help="tokens between windows (default: half the window)")
        if task == "exact":
            t.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
        t.add_argument("--no-save", action="store_true", help="do not keep the result with the model")
        t.add_argument("--json", action="store_true", help="one JSON line per question, then the summary")
        t.add_argument("--events", default=None, metavar="FILE|-",
                       help="progress as JSON lines to a file or stdout (-)")
        t.set_defaults(func=run)


def run(args) -> int:
    import signal
    import threading
    from pathlib import Path

    from ..errors import SolError
    from ..evaluate import run as evaluation
    from ..evaluate import tasks
    from ..train.events import JsonEvents
    tasks.read(args.task, args.data)          # a bad line fails before the model loads
    events = JsonEvents(args.events) if args.events else None
    emit = events or (lambda e: None)
    cancel = threading.Event()
    old = {s: signal.signal(s, lambda *_: cancel.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        lm = load(args)
        name = model_name(args, lm)
        emit({"type": "start", "task": args.task, "model": name, "data": str(Path(args.data).resolve())})
        bar = Bar(args.task) if events is None and sys.stderr.isatty() else None

        def progress(done, total):
            emit({"type": "progress", "done": done, "total": total})
            if bar:
                bar(done, total)
        item = question_line if args.json and args.task == "choice" else None
        summary = evaluation.evaluate(
            args.task, lm, args.data, model_name=name, result_path=results_folder(args, lm),
            window=getattr(args, "window", None), stride=getattr(args, "stride", None),
            plugins=plugins_for(args.task), max_tokens=getattr(args, "max_tokens", 256),
            progress=progress, item=item, cancel=cancel, save=not args.no_save)
    except evaluation.Cancelled as e:
        emit({"type": "done", "cancelled": True, "done": e.done, "total": e.total})
        sys.stderr.write(f"error: {args.task}: {e}\n")
        return 130
    except SolError as e:
        emit({"type": "error", "message": str(e)})
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if events is not None:
            events.close()
    kept = summary.pop("results")
    emit({"type": "done", "cancelled": False, **summary, "results": kept})
    if args.json:
        print_json(summary)
    else:
        print(human(summary))
        if kept:
            sys.stderr.write(f"kept in {kept}\n")
    return 0


def question_line(r: dict) -> None:
    print_json({k: r[k] for k in ("i", "loglikelihoods", "acc", "acc_norm")})


def model_name(args, lm) -> str:
    """The name the user gave (`sol models list`'s), or the folder's for a path; with the adapter's after it."""
    from pathlib import Path
    name = lm.name if Path(args.model).expanduser().exists() else args.model
    return f"{name}+{Path(args.adapter).name}" if args.adapter else name


def results_folder(args, lm):
    """Whose results these are: the adapter's (--adapter, or --model naming an adapter folder, which loads
    on its base: lm.path is then the base's), else the model's."""
    from pathlib import Path

    from ..errors import SolError
    from ..formats.adapter import is_adapter
    from ..formats.registry import resolve
    if args.adapter:
        return Path(args.adapter).expanduser()
    try:
        given = resolve(args.model)
    except SolError:
        return lm.path
    return given if is_adapter(given) else lm.path


def plugins_for(task: str):
    """exact runs the chat with the tools `sol chat` has."""
    if task != "exact":
        return None
    from ..plugins.manager import PluginManager
    plugins = PluginManager()
    plugins.load()
    return plugins


def human(s: dict) -> str:
    if s["task"] == "choice":
        return f"{s['model']}: accuracy {s['accuracy']:.4f}, normalised {s['accuracy_norm']:.4f} ({s['n']} questions)"
    if s["task"] == "exact":
        return f"{s['model']}: exact {s['exact']:.4f} ({s['n']} prompts)"
    return f"{s['model']}: perplexity {s['perplexity']:.4f}, nll {s['nll']:.4f} nats/token ({s['tokens']} tokens)"


class Bar:
    """A one-line progress bar on a terminal's stderr."""

    def __init__(self, task: str):
        self.task = task

    def __call__(self, done: int, total: int) -> None:
        n = 30 * done // max(1, total)
        sys.stderr.write(f"\r{self.task} [{'#' * n}{'.' * (30 - n)}] {done}/{total}" + ("\n" if done >= total else ""))
        sys.stderr.flush()
