"""The Evaluate panel: run `sol eval perplexity|choice|exact` as a child process (as the Training panel runs
`sol train`), its JSON events driving a progress bar; Cancel sends SIGTERM (the child stops between two items,
keeps nothing, exits 130). The summary shows when it is done, and a bar chart the kept results of the model's
lineage (its parents, checkpoints and itself: sol.core.evaluate.results.across) for the chosen task."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import QProcess, Qt, QTimer
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QProgressBar,
                               QPushButton, QWidget)

from sol.app.kit import child_process, page
from sol.core.evaluate.results import across
from sol.core.formats.registry import list_models, resolve

TASKS = {"perplexity": "perplexity of a text file (lower is better)",
         "choice": "multiple choice, JSONL {question, choices, answer} (accuracy)",
         "exact": "exact answers through the chat, JSONL {prompt, answer} (share right)"}
METRIC = {"perplexity": "perplexity", "choice": "accuracy", "exact": "exact"}
CANCELLED = 130


def command(task: str, model: str, data: str, adapter: str | None = None, extra: list[str] | None = None) -> list[str]:
    """argv for `sol eval TASK ... --events -`, run with this Python."""
    argv = [sys.executable, "-m", "sol.core.cli", "eval", task, "--model", model, "--data", data]
    if adapter:
        argv += ["--adapter", adapter]
    return argv + list(extra or []) + ["--events", "-"]


def summary_text(s: dict) -> str:
    if s.get("task") == "choice":
        return f"accuracy {s['accuracy']:.4f} · normalised {s['accuracy_norm']:.4f} · {s['n']} questions"
    if s.get("task") == "exact":
        return f"exact {s['exact']:.4f} · {s['n']} prompts"
    return f"perplexity {s['perplexity']:.4f} · {s['nll']:.4f} nats/token · {s['tokens']:,} tokens"


def chart_rows(lineage: list[dict], task: str, data: str | None) -> list[tuple[str, float]]:
    """(model, value) per stage that has a result of `task`: the one on `data` when there is one, else the
    newest; stages without one are left out."""
    rows = []
    want = str(Path(data).expanduser().resolve()) if data else None
    for m in lineage:
        found = [r for r in m["results"] if r.get("task") == task and r.get(METRIC[task]) is not None]
        if not found:
            continue
        same = [r for r in found if r.get("data") == want]
        r = max(same or found, key=lambda r: r.get("created") or "")
        rows.append((m["name"], float(r[METRIC[task]])))
    return rows


def chart_of(model: str, adapter: str | None, task: str, data: str | None) -> tuple[str, list[tuple[str, float]]]:
    """(task, bars) for the model (or adapter) folder a name or path stands for: a worker thread's work."""
    return task, chart_rows(across(Path(adapter).expanduser() if adapter else resolve(model)), task, data)


class EvaluatePanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.proc: QProcess | None = None
        self.state = "idle"            # idle | running | cancelling | done | cancelled | failed
        self.summary: dict | None = None
        self.last_error = ""
        self.rows: list[tuple[str, float]] = []    # the bar chart's (model, value)
        self._buf = b""
        self.argv: list[str] = []
        lay = page(self, "Evaluate", "Score a model on a data file with `sol eval`: perplexity of a text, multiple "
                   "choice as lm-evaluation-harness scores it, or exact answers through the chat. Results are kept "
                   "with the model; the chart compares its checkpoints and parents.")
        form = QFormLayout()
        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.setMinimumContentsLength(28)
        self.task = QComboBox()
        for name, text in TASKS.items():
            self.task.addItem(f"{name}: {text}", name)
        self.data = QLineEdit()
        self.data.setPlaceholderText("a text file (perplexity) or a JSONL file (choice, exact)")
        browse = QPushButton("…")
        browse.setFixedWidth(40)
        browse.clicked.connect(self.browse)
        data_row = QHBoxLayout()
        data_row.addWidget(self.data, 1)
        data_row.addWidget(browse)
        self.adapter = QComboBox()
        self.adapter.addItem("no adapter", None)
        form.addRow("Model", self.model)
        form.addRow("Task", self.task)
        form.addRow("Data", data_row)
        form.addRow("Adapter", self.adapter)
        lay.addLayout(form)
        buttons = QHBoxLayout()
        self.state_label = QLabel("idle")
        self.state_label.setObjectName("h2")
        self.cancel_btn = QPushButton("Cancel")
        self.run_btn = QPushButton("Evaluate")
        self.run_btn.setObjectName("primary")
        buttons.addWidget(self.state_label, 1)
        buttons.addWidget(self.cancel_btn)
        buttons.addWidget(self.run_btn)
        lay.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m")
        self.progress.setValue(0)
        lay.addWidget(self.progress)
        self.result = QLabel()
        self.result.setObjectName("stat")
        self.result.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.result.setWordWrap(True)
        lay.addWidget(self.result)
        self.error = QLabel()
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.error.hide()
        lay.addWidget(self.error)
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.showGrid(x=False, y=True, alpha=0.12)
        self.plot.setMinimumHeight(220)
        self.bars: pg.BarGraphItem | None = None
        self.labels: list[pg.TextItem] = []
        lay.addWidget(self.plot, 1)

        self.run_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.cancel)
        self.task.currentIndexChanged.connect(lambda _: self.refresh_chart())
        self.data.editingFinished.connect(self.refresh_chart)
        self.adapter.activated.connect(lambda _: self.refresh_chart())
        self.model.currentIndexChanged.connect(lambda _: self._model_changed())
        ctx.model_changed.connect(lambda _lm: self.refresh_models())
        ctx.models_changed.connect(self.refresh_models)
        self.refresh_models()
        self._buttons()

    # ---- the form --------------------------------------------------------------
    def refresh_models(self) -> None:
        self.ctx.run(list_models, on_done=self._fill_models, on_error=self._models_failed)

    def _models_failed(self, e) -> None:
        self.show_error(f"the models list: {e}")

    def _fill_models(self, models: list[dict]) -> None:
        self.models = [m for m in models if "broken" not in m]
        keep = self.model.currentText()
        self.model.blockSignals(True)
        self.model.clear()
        for m in self.models:
            if m.get("format") != "lora":       # adapters are picked under their base
                self.model.addItem(m["name"], m["path"])
                self.model.setItemData(self.model.count() - 1, m["path"], Qt.ToolTipRole)
        lm = self.ctx.loaded
        i = self.model.findData(str(lm.path)) if lm is not None and not keep else self.model.findText(keep)
        if i < 0 and keep:
            self.model.setEditText(keep)
        else:
            self.model.setCurrentIndex(max(i, 0) if self.model.count() else -1)
        self.model.blockSignals(False)
        self._model_changed()

    def _model_changed(self) -> None:
        """The chosen model's adapters (those the models list puts under it), then its chart."""
        path = self.model_value()
        self.adapter.clear()
        self.adapter.addItem("no adapter", None)
        name = self.model.currentText().strip()
        for a in getattr(self, "models", []):
            if a.get("format") == "lora" and path and (a.get("base") == name or a.get("base") == path):
                self.adapter.addItem(a["name"], a["path"])
        self.refresh_chart()

    def model_value(self) -> str:
        """What --model gets: a listed model's folder, or what was typed (a name or a folder)."""
        text = self.model.currentText().strip()
        i = self.model.findText(text)
        return (self.model.itemData(i) if i >= 0 else None) or text

    def browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Data to evaluate on", "",
                                              "Text or JSONL (*.txt *.md *.jsonl);;All (*)")
        if path:
            self.data.setText(path)

    # ---- a run -------------------------------------------------------------------
    def show_error(self, message: str) -> None:
        self.error.setText(message if message.startswith("error:") else f"error: {message}")
        self.error.show()

    def start(self) -> bool:
        if self.proc is not None:
            return False
        self.error.hide()
        model, data = self.model_value(), self.data.text().strip()
        if not model:
            self.show_error("no model: load one in the Models panel or choose one here")
            return False
        if not data:
            self.show_error(f"no data file: choose the {'text' if self.task.currentData() == 'perplexity' else 'JSONL'}"
                            " file to evaluate on")
            return False
        return self.run_argv(command(self.task.currentData(), model, data, self.adapter.currentData()))

    def run_argv(self, argv: list[str]) -> bool:
        """Start `sol eval ... --events -` (tests call this directly with their own flags)."""
        if self.proc is not None:
            return False
        self.argv = argv
        self.summary, self.last_error, self._buf = None, "", b""
        self.error.hide()
        self.result.setText("")
        self.progress.setMaximum(0)      # busy until the first progress event says how many
        self.proc = child_process(self, argv, self._read_stdout, self._read_stderr, self._finished, self._proc_error)
        self._set_state("running")
        self.proc.start()
        return True

    def cancel(self) -> None:
        """SIGTERM: the child stops between two items, keeps nothing and exits 130."""
        if self.proc is not None and self.state == "running":
            self._set_state("cancelling")
            self.proc.terminate()
            QTimer.singleShot(20_000, self._kill_if_stuck)

    def _kill_if_stuck(self) -> None:
        if self.proc is not None and self.state == "cancelling":
            self.proc.kill()

    def _read_stdout(self) -> None:
        self._buf += bytes(self.proc.readAllStandardOutput())
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict):
                    self.handle(ev)

    def _read_stderr(self) -> None:
        text = bytes(self.proc.readAllStandardError()).decode("utf-8", "replace")
        for line in text.splitlines():
            if line.startswith("error:") and not self.last_error:
                self.last_error = line.strip()

    def handle(self, ev: dict) -> None:
        t = ev.get("type")
        if t == "start":
            self.result.setText(f"{ev.get('task')} of {ev.get('model')} on {Path(str(ev.get('data'))).name} …")
        elif t == "progress":
            self.progress.setMaximum(max(1, int(ev.get("total") or 0)))
            self.progress.setValue(int(ev.get("done") or 0))
        elif t == "done" and not ev.get("cancelled"):
            self.summary = ev
            self.progress.setMaximum(max(1, self.progress.maximum()))
            self.progress.setValue(self.progress.maximum())
            kept = f" — kept in {ev['results']}" if ev.get("results") else ""
            self.result.setText(f"{ev.get('model')}: {summary_text(ev)}{kept}")
        elif t == "error":
            self.last_error = f"error: {ev.get('message')}"

    def _proc_error(self, err) -> None:
        if err == QProcess.FailedToStart:
            self.last_error = f"error: could not start {self.argv[:1]}: {self.proc.errorString()}"
            self._finished(-1, QProcess.CrashExit)

    def _finished(self, code, _status=None) -> None:
        if self.proc is None:
            return
        self._read_stdout()
        cancelling = self.state == "cancelling"
        self.proc.deleteLater()
        self.proc = None
        if code == 0 and self.summary is not None:
            self._set_state("done")
            self.refresh_chart()
        elif code == CANCELLED or cancelling:
            self._set_state("cancelled")
            self.progress.setMaximum(max(1, self.progress.maximum()))
            self.result.setText("cancelled: nothing was kept")
        else:
            self._set_state("failed")
            self.progress.setMaximum(1)
            self.result.setText("")
            self.show_error(self.last_error or f"error: sol eval exited with code {code}")

    def _set_state(self, state: str) -> None:
        self.state = state
        self.state_label.setText({"idle": "idle", "running": "● running", "cancelling": "cancelling …",
                                  "done": "✓ done", "cancelled": "cancelled", "failed": "✗ failed"}[state])
        self._buttons()

    def _buttons(self) -> None:
        self.run_btn.setEnabled(self.proc is None)
        self.cancel_btn.setEnabled(self.proc is not None and self.state == "running")

    # ---- the chart across checkpoints ------------------------------------------------
    def refresh_chart(self) -> None:
        model = self.model_value()
        if not model:
            return
        task, data, adapter = self.task.currentData(), self.data.text().strip() or None, self.adapter.currentData()
        self._chart_task = task
        # Bound methods, not lambdas: a panel closed meanwhile is disconnected, not painted after its deletion.
        self.ctx.run(chart_of, model, adapter, task, data, on_done=self._draw, on_error=self._chart_failed)

    def _chart_failed(self, _e) -> None:
        self._draw((self._chart_task, []))    # a model not found: no bars (running it says why)

    def _draw(self, result: tuple[str, list[tuple[str, float]]]) -> None:
        task, rows = result
        self.rows = rows
        if self.bars is not None:
            self.plot.removeItem(self.bars)
            self.bars = None
        for label in self.labels:
            self.plot.removeItem(label)
        self.labels = []
        self.plot.setTitle(f"{METRIC[task]} across the lineage ({task})" if rows else
                           f"no {task} results kept for this model's lineage yet", color="#b8bdc8", size="10pt")
        ticks = [(i, name) for i, (name, _) in enumerate(rows)]
        self.plot.getAxis("bottom").setTicks([ticks])
        if rows:
            self.bars = pg.BarGraphItem(x=list(range(len(rows))), height=[v for _, v in rows], width=0.6,
                                        brush="#f5a524")
            self.plot.addItem(self.bars)
            for i, (_, v) in enumerate(rows):     # each bar's value above it
                label = pg.TextItem(f"{v:.4g}", color="#e8eaed", anchor=(0.5, 1.0))
                label.setPos(i, v)
                self.plot.addItem(label)
                self.labels.append(label)
            self.plot.setXRange(-0.6, max(len(rows), 4) - 0.4, padding=0)   # one bar is not a wall
            self.plot.setYRange(0, max(v for _, v in rows) * 1.15 or 1.0, padding=0)

    def shutdown(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.waitForFinished(3000)
