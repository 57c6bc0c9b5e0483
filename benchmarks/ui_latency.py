"""How responsive the window stays while the model generates and while a training runs.

A 5 ms QTimer probe measures how late each tick fires: the lateness is the time the event
loop was busy elsewhere (painting, handling token signals, reading training events). We
report p99 and max for three phases: the chat streaming an answer from a model (the starter
model if installed, else a random one), the training panel running a pretraining child
process, and the Compare panel streaming two models' answers at once (the starter and the
words model if installed, else two random ones). Goal: p99 <= 16 ms (one frame at 60 Hz),
max <= 50 ms.

    python benchmarks/ui_latency.py [--json] [--seconds 6]

The last line with --json: {"generation": {"p99_ms", "max_ms"}, "training": {...}, "compare": {...}}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROBE_MS = 5
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "O Sol disse a Plutão: tokens são pedaços de texto.\n") * 40


def random_model(out: Path, seed: int = 0) -> Path:
    import torch

    from sol.core.formats.checkpoint import save_model
    from sol.core.formats.tokenizer import train_bpe
    from sol.core.model.config import ModelConfig
    from sol.core.model.transformer import Transformer
    corpus = out.parent / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    tok = train_bpe([corpus], 512)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, d_model=128, context=1024))
    return save_model(out, model, tok, {"name": "bench", "stage": "base"})


class Probe:
    def __init__(self):
        from PySide6.QtCore import QTimer
        self.delays: list[float] = []
        self.last = None
        self.on = False
        from PySide6.QtCore import Qt
        self.timer = QTimer()
        self.timer.setTimerType(Qt.PreciseTimer)   # a coarse timer may fire late on purpose
        self.timer.setInterval(PROBE_MS)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    def tick(self):
        now = time.perf_counter()
        if self.on and self.last is not None:
            self.delays.append(max(0.0, (now - self.last) * 1000 - PROBE_MS))
        self.last = now

    def take(self) -> dict:
        d = np.asarray(self.delays or [0.0])
        self.delays = []
        return {"p99_ms": round(float(np.percentile(d, 99)), 2), "max_ms": round(float(d.max()), 2),
                "mean_ms": round(float(d.mean()), 2), "samples": int(d.size)}


def wait(app, cond, timeout_s: float):
    """Run Qt's own event loop (as the app's exec() does) until cond() holds or time runs out.
    Spinning processEvents() + sleep() by hand would add the sleeps to the delays we measure."""
    from PySide6.QtCore import QEventLoop, QTimer
    t0 = time.monotonic()
    if cond():
        return
    loop = QEventLoop()
    check = QTimer()
    check.timeout.connect(lambda: (cond() or time.monotonic() - t0 >= timeout_s) and loop.quit())
    check.start(10)
    loop.exec()
    check.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    args = ap.parse_args()
    os.environ.setdefault("SOL_HOME", tempfile.mkdtemp(prefix="sol-bench-"))
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from sol.app.main import build_window, starter_model
    from sol.core.formats.checkpoint import load_model
    from sol.plugins.training_runner.runs import command
    win, ctx = build_window()
    win.show()
    app = __import__("PySide6.QtWidgets", fromlist=["QApplication"]).QApplication.instance()
    tmp = Path(tempfile.mkdtemp(prefix="sol-bench-"))
    model_dir = starter_model() or random_model(tmp / "model")
    ctx.set_model(load_model(model_dir))
    probe = Probe()

    # Phase 1: the chat streams answers (one after another) for `seconds`.
    win.show_panel("chat")
    chat = win.panel("chat")
    chat.params.max_tokens.setValue(400)
    wait(app, lambda: False, 0.5)
    probe.on = True
    t0 = time.monotonic()
    tokens = 0
    while time.monotonic() - t0 < args.seconds:
        chat.send("Tell me a long story about the Sun and Pluto.")
        wait(app, lambda: not chat.busy, args.seconds + 30)
        tokens += sum(len(getattr(b, "tokens", [])) for b in chat.bubbles)
        chat.new_chat()
    probe.on = False
    gen = probe.take()
    gen["tokens"] = tokens

    # Phase 2: the training panel runs a pretraining child process and plots its events.
    win.show_panel("training")
    train = win.panel("training")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT * 5, encoding="utf-8")
    argv = command("pretrain", str(tmp / "run"), str(corpus),
                   options={"preset": "tiny", "context": 64, "batch_size": 8, "max_steps": 100_000,
                            "eval_every": 50, "sample_every": 100, "checkpoint_every": 0, "device": "cpu"})
    train.run_argv(argv)
    wait(app, lambda: train.series["loss"][0] or train.state != "running", 120)   # past start-up
    probe.on = True
    wait(app, lambda: train.state != "running", args.seconds)
    probe.on = False
    tr = probe.take()
    tr["steps"] = len(train.series["loss"][0])
    train.stop()
    wait(app, lambda: train.proc is None, 40)

    # Phase 3: the Compare panel streams two models' answers at once, again and again.
    from sol.core.formats.registry import builtin_models_dir
    words = builtin_models_dir() / "words"
    second = words if starter_model() and (words / "config.json").is_file() else random_model(tmp / "model2", seed=1)
    win.show_panel("compare")
    compare = win.panel("compare")
    for picker, path in zip(compare.pickers, (model_dir, second)):
        picker.setEditText(str(path))
    compare.blind.setChecked(False)
    compare.chat.setChecked(False)
    compare.prompt.setPlainText("The Sun said to Pluto:")
    compare.params.max_tokens.setValue(8)
    compare.start()                                  # loads the second model: not measured
    wait(app, lambda: not compare.busy, 120)
    compare.params.max_tokens.setValue(400)
    probe.on = True
    t0 = time.monotonic()
    tokens = 0
    while time.monotonic() - t0 < args.seconds:
        compare.start()
        wait(app, lambda: not compare.busy, args.seconds + 60)
        tokens += sum(c.tokens for c in compare.columns[:2])
    probe.on = False
    cmp = probe.take()
    cmp["tokens"] = tokens
    cmp["models"] = [str(model_dir), str(second)]
    if compare.error.text():
        print(f"compare: {compare.error.text()}", file=sys.stderr)

    result = {"generation": gen, "training": tr, "compare": cmp}
    if not args.json:
        for k, v in result.items():
            print(f"{k:<11} p99 {v['p99_ms']:6.2f} ms   max {v['max_ms']:6.2f} ms   mean {v['mean_ms']:5.2f} ms   "
                  f"({v['samples']} probes)")
    else:
        print(f"model: {model_dir}", file=sys.stderr)
        print(json.dumps(result))
    win.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
