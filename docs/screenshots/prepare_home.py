"""Fill a fresh SOL_HOME for the screenshots: a short pretraining run started from the Training
panel (its curves reappear when Sol reopens), which also leaves a model beside the starter.

    SOL_HOME=$(mktemp -d) xvfb-run -a python docs/screenshots/prepare_home.py CORPUS.txt
"""
import os
import sys
import time
from pathlib import Path

from PySide6.QtWidgets import QApplication

from sol.app.main import build_window
from sol.plugins.training_runner.runs import command

win, ctx = build_window()
app = QApplication.instance()
panel = win.panel("training")
out = Path(os.environ["SOL_HOME"]) / "models" / "shakespeare-demo"
panel.run_argv(command("pretrain", str(out), sys.argv[1], options={
    "tokenizer": "char", "preset": "tiny", "context": 64, "batch_size": 16, "max_steps": 300,
    "eval_every": 50, "sample_every": 50, "checkpoint_every": 100, "device": "cpu"}))
while panel.state not in ("done", "failed"):
    app.processEvents()
    time.sleep(0.05)
print(f"training {panel.state}: {out}")
win.close()
