"""nanoGPT and Sol as child processes of one benchmark, timed from their launch.

nanoGPT's model.py, train.py, bench.py, configurator.py and config/ sit unchanged in
shared/reference/nanogpt (../shared beside the repository, or shared/ inside it on a GPU
machine, where ../shared does not travel). They are never imported: train.py reads
data/<dataset>/ and exec's configurator.py from its working directory, so each run copies them
into a fresh folder, writes the data there as nanoGPT's data/shakespeare_char/prepare.py would,
and starts them there. Sol runs as `python -m sol.core.cli train pretrain ... --events -`.

Both children's stdout is read line by line and every line is stamped with the seconds since the
launch, so "time to validation loss X" is the moment the line saying so was printed.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_FILES = ("model.py", "train.py", "bench.py", "configurator.py")

# What nanoGPT's train.py and bench.py print (their exact formats).
ITER_LINE = re.compile(r"^iter (\d+): loss (\S+), time ([\d.]+)ms, mfu (\S+)%$")
EVAL_LINE = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)$")
BENCH_LINE = re.compile(r"^time per iteration: ([\d.]+)ms, MFU: (\S+)%$")


def shared_dir() -> Path:
    """shared/ inside the repository (what travels to a GPU machine) if there, else ../shared."""
    inside = REPO / "shared"
    return inside if (inside / "reference" / "nanogpt").is_dir() else REPO.parent / "shared"


def reference_dir() -> Path:
    return shared_dir() / "reference" / "nanogpt"


def data_file(name: str) -> Path:
    return shared_dir() / "data" / name


def parse_line(line: str) -> dict | None:
    """One line of nanoGPT's output as a dict, or None for any other line."""
    line = line.strip()
    m = ITER_LINE.match(line)
    if m:
        return {"kind": "iter", "iter": int(m[1]), "loss": float(m[2]), "ms": float(m[3])}
    m = EVAL_LINE.match(line)
    if m:
        return {"kind": "eval", "step": int(m[1]), "train_loss": float(m[2]), "val_loss": float(m[3])}
    m = BENCH_LINE.match(line)
    if m:
        return {"kind": "bench", "ms": float(m[1])}
    return None


def nanogpt_workdir(prefix: str = "nanogpt-") -> Path:
    """A fresh folder holding copies of nanoGPT's scripts and config/ (the originals stay untouched)."""
    ref = reference_dir()
    missing = [f for f in NANOGPT_FILES if not (ref / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{ref}: nanoGPT's {', '.join(missing)} not found")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    for f in NANOGPT_FILES:
        shutil.copy(ref / f, work / f)
    shutil.copytree(ref / "config", work / "config")
    return work


def prepare_char(text_file: Path, work: Path, dataset: str = "shakespeare_char") -> int:
    """data/<dataset>/{train,val}.bin and meta.pkl under `work`, as nanoGPT's
    data/shakespeare_char/prepare.py writes them: the sorted set of characters is the vocabulary,
    the first 90 % of the characters train, the rest validate, ids as uint16. Returns the vocab size."""
    import numpy as np
    data = Path(text_file).read_text(encoding="utf-8")
    chars = sorted(set(data))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    out = work / "data" / dataset
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", data[:int(n * 0.9)]), ("val", data[int(n * 0.9):])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(out / f"{name}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return len(chars)


def launch(cmd: list[str], cwd: Path, timeout: float, on_line=None, env: dict | None = None) -> dict:
    """Run `cmd`, calling on_line(seconds_since_launch, line) for each line of its stdout+stderr;
    on_line returning True ends the child early (a target reached). Returns {"rc", "wall_s", "tail",
    "timed_out", "stopped"}; rc is None when the child was ended by us."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=full_env, bufsize=1, errors="replace")
    state = {"timed_out": False, "stopped": False}

    def kill(reason):
        state[reason] = True
        if p.poll() is None:
            p.kill()

    timer = threading.Timer(timeout, kill, args=("timed_out",))
    timer.start()
    tail: list[str] = []
    try:
        for line in p.stdout:
            now = time.perf_counter() - t0
            tail = (tail + [line.rstrip("\n")])[-40:]
            if on_line is not None and not state["stopped"] and on_line(now, line):
                kill("stopped")
        p.wait()
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()
    wall = time.perf_counter() - t0
    rc = None if (state["stopped"] or state["timed_out"]) else p.returncode
    return {"rc": rc, "wall_s": wall, "tail": "\n".join(tail), **state}


def error_of(run: dict, what: str) -> str | None:
    """One line saying why a child run gave no figures, or None when it ran through."""
    if run["timed_out"]:
        return f"{what}: timed out after {run['wall_s']:.0f} s; last output: {last_line(run['tail'])}"
    if run["rc"] not in (0, None):
        return f"{what}: exit status {run['rc']}; last output: {last_line(run['tail'])}"
    return None


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(none)"


def run_nanogpt_train(work: Path, argv: list[str], timeout: float, target: float | None,
                      stop_at_target: bool = False, prefix: list[str] | None = None,
                      env: dict | None = None, label: str | None = None) -> dict:
    """nanoGPT's train.py with `argv` (configurator arguments) in `work`. Returns the iteration and
    evaluation lines with their times and the time the first val loss <= target was printed.
    With `label`, each evaluation is shown on stderr as it comes."""
    iters, evals = [], []
    hit = {}

    def on_line(t, line):
        e = parse_line(line)
        if e is None:
            return False
        e["t"] = t
        (iters if e["kind"] == "iter" else evals).append(e)
        if e["kind"] == "eval" and label:
            progress(label, e["step"], e["val_loss"], t)
        if e["kind"] == "eval" and target is not None and "t" not in hit and e["val_loss"] <= target:
            hit.update(t=t, step=e["step"])
            return stop_at_target
        return False

    cmd = [sys.executable, *(prefix or ["train.py"]), *argv]
    run = launch(cmd, work, timeout, on_line, env)
    return {**run, "iters": iters, "evals": evals, "seconds_to_target": hit.get("t"), "step_at_target": hit.get("step")}


def nanogpt_tokens_per_s(iters: list[dict], eval_interval: int, tokens_per_iter: int) -> float | None:
    """Tokens/s over nanoGPT's training iterations. An iteration that evaluated (iter % eval_interval
    == 0: train.py evaluates at the top of the loop, inside that iteration's time) is left out, as Sol's
    evaluation is left out of its training time."""
    ms = [e["ms"] for e in iters if e["iter"] % eval_interval != 0]
    return tokens_per_iter * len(ms) / (sum(ms) / 1000) if ms and sum(ms) > 0 else None


def sol_event(t: float, line: str, events: list) -> dict | None:
    """A line of Sol's `--events -` output as its JSON event, stamped with "t" and added to `events`;
    None for anything else the child printed."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        e = json.loads(line)
    except ValueError:
        return None
    e["t"] = t
    events.append(e)
    return e


def run_sol_pretrain(argv: list[str], timeout: float, target: float | None, stop_at_target: bool = False,
                     env: dict | None = None, label: str | None = None) -> dict:
    """`sol train pretrain ARGV --events -` as a child process; its JSON events, each with "t", the
    seconds since launch. With `label`, each evaluation is shown on stderr as it comes."""
    events = []
    hit = {}

    def on_line(t, line):
        e = sol_event(t, line, events)
        if e is None:
            return False
        if e.get("type") == "eval" and label:
            progress(label, e.get("step"), e.get("val_loss"), t)
        if (e.get("type") == "eval" and target is not None and "t" not in hit
                and e.get("val_loss") is not None and e["val_loss"] <= target):
            hit.update(t=t, step=e["step"])
            return stop_at_target
        return False

    cmd = [sys.executable, "-m", "sol.core.cli", "train", "pretrain", *argv, "--events", "-"]
    run = launch(cmd, REPO, timeout, on_line, env)
    return {**run, "events": events, "seconds_to_target": hit.get("t"), "step_at_target": hit.get("step")}


def progress(label: str, step, val, t: float) -> None:
    shown = f"{val:.4f}" if isinstance(val, float) else str(val)
    sys.stderr.write(f"  [{label}] step {step:>5}  val {shown}  {t:.1f}s\n")
    sys.stderr.flush()


def sol_summary(run: dict) -> dict:
    """From Sol's events: the last val loss, training tokens/s (training time, evaluation left out, from
    the `done` event), the start-up seconds (launch to the `start` event) and the steps run."""
    ev = run["events"]
    evals = [e for e in ev if e.get("type") == "eval"]
    steps = [e for e in ev if e.get("type") == "step"]
    start = next((e for e in ev if e.get("type") == "start"), None)
    done = next((e for e in ev if e.get("type") == "done"), None)
    err = next((e["message"] for e in ev if e.get("type") == "error"), None)
    return {"final_val_loss": evals[-1]["val_loss"] if evals else None,
            "evals": [(e["step"], round(e["t"], 2), e["val_loss"]) for e in evals],
            "steps": steps[-1]["step"] if steps else 0, "start": start, "done": done,
            "startup_s": start["t"] if start else None, "error": err}


def sol_env() -> dict:
    """Environment for Sol's children where `sol` is not installed (a bare GPU machine): a folder holding
    a `sol` namespace whose parts link to the repository's folders (what setup.py maps), on PYTHONPATH."""
    try:
        import sol.core  # noqa: F401
        return {}
    except ImportError:
        pass
    root = Path(tempfile.mkdtemp(prefix="sol-path-"))
    (root / "sol").mkdir()
    for top in ("core", "app", "plugins", "resources"):
        if (REPO / top).is_dir():
            (root / "sol" / top).symlink_to(REPO / top, target_is_directory=True)
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = path   # this process's later children too
    sys.path.insert(0, str(root))
    return {"PYTHONPATH": path}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)
