"""The Training panel: choose a stage, data and hyperparameters; run `sol train` as a child
process; plot its JSON events live; keep samples side by side; show the lineage of models."""
from __future__ import annotations

import time
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import QProcess, Qt, QTimer
from PySide6.QtGui import QColor, QFont, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QFrame, QHBoxLayout, QLabel,
                               QLineEdit, QPlainTextEdit, QProgressBar, QPushButton, QScrollArea, QSpinBox, QSplitter,
                               QTabWidget, QTextEdit, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget)

from sol.app.kit import child_process

from .runs import (STAGES, batch_preview, command, fmt_bytes, fmt_eta, lineage, lora_estimate, matmul_flops,
                   parse_line, preview_records)

PLOTS = [("loss", "loss", "#f5a524"), ("lr", "learning rate", "#5aa9e6"), ("grad_norm", "gradient norm", "#e66ab2"),
         ("tokens_per_s", "tokens / s", "#4cc38a")]


class Plot(pg.PlotWidget):
    def __init__(self, title: str):
        super().__init__()
        self.setTitle(title, color="#b8bdc8", size="10pt")
        self.showGrid(x=False, y=True, alpha=0.12)
        self.setMenuEnabled(False)
        self.setMinimumHeight(150)
        self.disableAutoRange()
        self.reset_range()

    def reset_range(self):
        self._x = self._y = None

    def fit(self, x_end: float, ys: list):
        """Set the ranges by hand, and only when the data leaves them: a range change repaints the axes,
        the costliest part of a plot, so letting autorange follow every point would repaint them each time."""
        if not ys:
            return
        if self._x != x_end:
            self._x = x_end
            self.setXRange(0, max(1, x_end), padding=0.02)
        lo, hi = min(ys), max(ys)
        if self._y is None or lo < self._y[0] or hi > self._y[1]:
            span = (hi - lo) or abs(hi) or 1.0
            self._y = (lo - 0.2 * span, hi + 0.1 * span)
            self.setYRange(*self._y, padding=0)


class TrainingPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.proc: QProcess | None = None
        self.state = "idle"            # idle | running | stopping | stopped | done | failed
        self.series: dict[str, tuple[list, list]] = {k: ([], []) for k in
                                                       ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s")}
        self.max_steps = 0
        self.last_step: dict | None = None
        self.started: dict | None = None   # the shown run's start event
        self.run_out: Path | None = None
        self.stopped = False
        self.last_error = ""
        self._buf = b""
        self._dirty = False
        self.argv: list[str] = []
        self._want_base: str | None = None   # a model asked for (Fine-tune) before the list of models came
        self._flops: float | None = None     # this machine's matrix-product speed, measured once for estimates
        self.estimate_result = None          # the last LoraEstimate shown
        self.lora_run = False                # the shown run trains an adapter

        lay = QHBoxLayout(self)
        lay.setContentsMargins(24, 20, 24, 20)
        split = QSplitter()
        lay.addWidget(split)
        split.addWidget(self._setup_column())
        split.addWidget(self._run_column())
        split.setSizes([400, 900])

        self._plot_timer = QTimer(self, interval=120)   # one plot per tick: each plot ~2 times a second
        self._plot_timer.timeout.connect(self._redraw)
        self._plot_timer.start()
        self.stage.currentIndexChanged.connect(self._stage_changed)
        self._stage_changed()
        self.refresh_models()
        ctx.model_changed.connect(lambda _: self.refresh_models())
        ctx.fine_tune_requested.connect(self.fine_tune)
        last = ctx.setting("training.last_out")
        if last:
            self.replay(last)

    # ---- layout ------------------------------------------------------------
    def _setup_column(self) -> QWidget:
        from sol.core.formats.registry import models_dir
        from sol.core.model.config import PRESETS
        w = QWidget()
        col = QVBoxLayout(w)
        col.setContentsMargins(0, 0, 12, 0)
        w.setMaximumWidth(380)
        title = QLabel("Training")
        title.setObjectName("h1")
        col.addWidget(title)
        form = QFormLayout()
        form.setVerticalSpacing(8)
        self.stage = QComboBox()
        for name in STAGES:
            self.stage.addItem(name, name)
        self.base = QComboBox()
        self.data = QLineEdit()
        self.data.setPlaceholderText("choose a file…")
        browse = QPushButton("…")
        browse.setFixedWidth(40)
        browse.setStyleSheet("padding: 4px 0;")
        browse.clicked.connect(self.browse_data)
        row = QHBoxLayout()
        row.addWidget(self.data, 1)
        row.addWidget(browse)
        self.data_hint = QLabel()
        self.data_hint.setObjectName("stat")
        self.tokenizer = QComboBox()
        self.tokenizer.setEditable(True)
        self.tokenizer.addItems(["char", "bpe:1024", "bpe:4096"])
        # RL needs a reward: a verifiable function (the calculator task) or a trained reward model.
        self.reward = QComboBox()
        from sol.core.train.rewards import REWARDS
        for name in REWARDS:
            self.reward.addItem(f"verifiable: {name}", ("reward", name))
        self.reward.setCurrentIndex(max(0, self.reward.findText("verifiable: calculator")))
        self.preset = QComboBox()
        for name in PRESETS:
            self.preset.addItem(name, name)
        self.preset.setCurrentText("tiny")
        self.steps = self._spin(1, 10_000_000, 200)
        self.batch = self._spin(1, 4096, 16)
        self.context = self._spin(8, 32768, 64)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-6, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-3)
        self.eval_every = self._spin(0, 1_000_000, 50)
        self.sample_every = self._spin(0, 1_000_000, 50)
        self.ckpt_every = self._spin(0, 1_000_000, 100)
        self.out = QLineEdit(str(models_dir() / f"run-{time.strftime('%Y%m%d-%H%M')}"))
        # LoRA: train a small adapter on the frozen model (sft, reward, rl); --out becomes an adapter folder.
        self.lora = QCheckBox("train an adapter")
        self.lora.setToolTip("LoRA: the model stays frozen and a small adapter learns; the run writes a PEFT "
                             "adapter folder, listed under its base in the Models panel")
        self.lora_r = self._spin(1, 4096, 16)
        self.lora_alpha = QDoubleSpinBox()
        self.lora_alpha.setRange(0.01, 100_000)
        self.lora_alpha.setValue(32.0)
        self.lora_dropout = QDoubleSpinBox()
        self.lora_dropout.setRange(0.0, 0.95)
        self.lora_dropout.setSingleStep(0.05)
        self.lora_dropout.setValue(0.05)
        self.lora_targets = QComboBox()
        self.lora_targets.setEditable(True)
        self.lora_targets.addItems(["attention,mlp", "attention", "mlp", "q,v", "all"])
        self.lora_targets.setToolTip("projections to adapt: attention, mlp, all, Sol's short names (q,k,v,o,gate,"
                                     "up,down) or PEFT's (q_proj, …)")
        self.lora_int8 = QCheckBox("int8 base")
        self.lora_int8.setToolTip("hold the frozen model in int8: about a quarter of float32's memory")
        self.estimate = QLabel()
        self.estimate.setObjectName("stat")
        self.estimate.setWordWrap(True)
        self.estimate.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow("Stage", self.stage)
        form.addRow("Base model", self.base)
        form.addRow("Data", row)
        form.addRow("", self.data_hint)
        form.addRow("LoRA", self.lora)
        form.addRow("Rank r", self.lora_r)
        form.addRow("Alpha", self.lora_alpha)
        form.addRow("Dropout", self.lora_dropout)
        form.addRow("Targets", self.lora_targets)
        form.addRow("", self.lora_int8)
        form.addRow("Reward", self.reward)
        form.addRow("Tokenizer", self.tokenizer)
        form.addRow("Preset", self.preset)
        form.addRow("Max steps", self.steps)
        form.addRow("Batch size", self.batch)
        form.addRow("Context", self.context)
        form.addRow("Learning rate", self.lr)
        form.addRow("Eval every", self.eval_every)
        form.addRow("Sample every", self.sample_every)
        form.addRow("Checkpoint every", self.ckpt_every)
        form.addRow("Output", self.out)
        self.form = form
        col.addLayout(form)
        buttons = QHBoxLayout()
        self.start_btn = QPushButton("Start")
        self.start_btn.setObjectName("primary")
        self.stop_btn = QPushButton("Stop")
        self.resume_btn = QPushButton("Resume")
        for b in (self.start_btn, self.stop_btn, self.resume_btn):
            buttons.addWidget(b)
        col.addLayout(buttons)
        col.addWidget(self.estimate)
        col.addStretch(1)
        self.start_btn.clicked.connect(lambda: self.start(resume=False))
        self.resume_btn.clicked.connect(lambda: self.start(resume=True))
        self.stop_btn.clicked.connect(self.stop)
        self.data.editingFinished.connect(self.preview)
        self._estimate_timer = QTimer(self, singleShot=True, interval=250)
        self._estimate_timer.timeout.connect(self.update_estimate)
        self.lora.toggled.connect(lambda _: self._stage_changed())
        for sig in (self.lora_r.valueChanged, self.lora_int8.toggled, self.lora_targets.currentTextChanged,
                    self.batch.valueChanged, self.steps.valueChanged, self.base.currentIndexChanged,
                    self.data.editingFinished):
            sig.connect(lambda *_: self._estimate_timer.start())
        self._buttons()
        # The form is taller than a small window: it scrolls rather than squeezing its rows.
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setWidget(w)
        scroll.setMinimumWidth(396)   # the form's 380 and a scroll bar
        scroll.setMaximumWidth(400)
        return scroll

    def _spin(self, lo, hi, v) -> QSpinBox:
        s = QSpinBox()
        s.setRange(lo, hi)
        s.setValue(v)
        s.setGroupSeparatorShown(True)
        return s

    def _run_column(self) -> QWidget:
        w = QWidget()
        col = QVBoxLayout(w)
        col.setContentsMargins(12, 0, 0, 0)
        head = QHBoxLayout()
        self.state_label = QLabel("idle")
        self.state_label.setObjectName("h2")
        self.eta = QLabel("")
        self.eta.setObjectName("stat")
        self.eta.setMinimumWidth(420)      # a fixed box: new text must not re-layout the plots
        self.eta.setAlignment(Qt.AlignRight | Qt.AlignVCenter)
        head.addWidget(self.state_label)
        head.addStretch(1)
        head.addWidget(self.eta)
        col.addLayout(head)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m steps")
        col.addWidget(self.progress)
        self.error_label = QLabel()
        self.error_label.setObjectName("error")
        self.error_label.setWordWrap(True)
        self.error_label.hide()
        col.addWidget(self.error_label)

        self.tabs = QTabWidget()
        plots = QWidget()
        grid = pg.QtWidgets.QGridLayout(plots)
        self.plots, self.curves = {}, {}
        for n, (key, title, color) in enumerate(PLOTS):
            p = Plot(title)
            self.plots[key] = p
            self.curves[key] = p.plot([], [], pen=pg.mkPen(color, width=2))
            grid.addWidget(p, n // 2, n % 2)
        self.plots["loss"].addLegend(offset=(-10, 10))
        self.curves["loss"].opts["name"] = "train"
        self.curves["val_loss"] = self.plots["loss"].plot([], [], pen=pg.mkPen("#5aa9e6", width=2),
                                                          symbol="o", symbolSize=6, symbolBrush="#5aa9e6",
                                                          name="validation")
        self.plots["loss"].plotItem.legend.addItem(self.curves["loss"], "train")
        self.tabs.addTab(plots, "Live")

        self.samples_box = QHBoxLayout()
        self.samples_box.addStretch(1)
        sw = QWidget()
        sw.setLayout(self.samples_box)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(sw)
        self.tabs.addTab(scroll, "Samples")

        self.preview_view = QTextEdit()
        self.preview_view.setReadOnly(True)
        self.tabs.addTab(self.preview_view, "Data preview")
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        f = QFont("monospace")
        f.setStyleHint(QFont.Monospace)
        self.log.setFont(f)
        self.tabs.addTab(self.log, "Log")
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["model", "stage", "evals", "path"])
        self.tabs.addTab(self.tree, "Lineage")
        col.addWidget(self.tabs, 1)
        return w

    # ---- setup -------------------------------------------------------------
    def is_ready(self) -> bool:
        return True

    def _stage_changed(self, *_):
        stage = self.stage.currentData()
        spec = STAGES.get(stage, {})
        pre = stage == "pretrain"
        # Only the fields this stage reads are shown (a greyed-out field still reads as a setting).
        lora = not pre and self.lora.isChecked()
        # (--context is pretraining's: the chat stages cut conversations to the model's own context)
        for widget, shown in ((self.base, not pre), (self.tokenizer, pre), (self.preset, pre), (self.context, pre),
                              (self.reward, stage == "rl"), (self.lora, not pre), (self.lora_r, lora),
                              (self.lora_alpha, lora), (self.lora_dropout, lora), (self.lora_targets, lora),
                              (self.lora_int8, lora)):
            widget.setEnabled(shown)
            self.form.setRowVisible(widget, shown)
        self.estimate.setVisible(lora)
        if lora:
            self._estimate_timer.start()
        self.data_hint.setText(spec.get("data", ""))
        if self.data.text():
            self.preview()

    def refresh_models(self):
        from sol.core.formats.registry import list_models
        self.ctx.run(list_models, on_done=self._fill_models, on_error=lambda e: None)

    def _fill_models(self, models):
        self.base.clear()
        for m in models:
            if m.get("format") != "lora":     # an adapter is not a model to start from: its base is
                self.base.addItem(m["name"], m["path"])
        for i in reversed(range(self.reward.count())):   # reward models change as runs finish
            if self.reward.itemData(i)[0] == "reward_model":
                self.reward.removeItem(i)
        for m in models:
            if m["format"] == "sol" and _stage(m["path"]) == "rm":
                self.reward.addItem(f"reward model: {m['name']}", ("reward_model", m["path"]))
        loaded = self.ctx.loaded
        if loaded is not None:
            i = self.base.findData(str(loaded.path))
            if i >= 0:
                self.base.setCurrentIndex(i)
        if self._want_base:
            self._select_base(self._want_base)
        self.ctx.run(lineage, models, on_done=self._fill_tree, on_error=lambda e: None)

    def _fill_tree(self, roots):
        self.tree.clear()

        def add(parent, node):
            item = QTreeWidgetItem([node.name, node.stage, node.evals, node.path])
            (parent.addChild if parent else self.tree.addTopLevelItem)(item)
            for c in node.children:
                add(item, c)
        for r in roots:
            add(None, r)
        self.tree.expandAll()
        self.tree.resizeColumnToContents(0)

    # ---- fine-tuning a model with LoRA ---------------------------------------------
    def fine_tune(self, model: dict):
        """Set the form up to train a LoRA adapter on `model` (a list_models entry, from the Models panel's
        Fine-tune) with a chat JSONL; the adapter goes into Sol's models folder, so it lists under its base."""
        from sol.core.formats.registry import models_dir
        if self.proc is not None:
            self.ctx.status_message.emit("a training run is going on; stop it or wait for it before fine-tuning")
            return
        self.stage.setCurrentIndex(self.stage.findData("sft"))
        self._want_base = model["path"]
        self._select_base(model["path"], model.get("name"))
        self.lora.setChecked(True)
        short = model["name"].replace("\\", "/").rstrip("/").split("/")[-1]
        if short.lower().endswith(".gguf"):
            short = short[:-5]
        self.out.setText(str(models_dir() / f"{short}-lora-{time.strftime('%Y%m%d-%H%M%S')}"))
        self.data.setPlaceholderText("choose a chat JSONL: {\"messages\": [...]} a line")
        self._stage_changed()
        if not self.data.text().strip():
            self.data_hint.setText("choose a chat JSONL (…), then Start")
        self.ctx.status_message.emit(f"fine-tune {model['name']}: choose a chat JSONL, check the estimate, Start")

    def _select_base(self, path: str, name: str | None = None):
        i = self.base.findData(path)
        if i < 0 and name:               # not (yet) in the list: loaded from elsewhere
            self.base.addItem(name, path)
            i = self.base.count() - 1
        if i >= 0:
            self.base.setCurrentIndex(i)

    def update_estimate(self):
        """Memory and time of the LoRA run the form describes, computed off the GUI thread."""
        if not self.lora.isChecked() or self.stage.currentData() == "pretrain":
            return
        base = self.base.currentData()
        if not base:
            self.estimate.setText("choose the base model")
            return
        args = (base, self.lora_r.value(), self.lora_targets.currentText(), self.lora_int8.isChecked(),
                self.batch.value(), self.steps.value(), self.data.text().strip() or None)
        device = str(self.ctx.device or "cpu")

        def work():
            if self._flops is None:
                self._flops = matmul_flops(device)
            return args, lora_estimate(*args, flops=self._flops)

        self._estimate_args = args
        # Bound methods, not lambdas: a panel closed meanwhile is disconnected, not painted after its deletion.
        self.ctx.run(work, on_done=self._show_estimate, on_error=self._estimate_failed)

    def _estimate_failed(self, e):
        self.estimate.setText(f"✗ {e}")

    def _show_estimate(self, result):
        args, e = result
        if args != getattr(self, "_estimate_args", None):   # the form changed meanwhile: a newer one is coming
            return
        self.estimate_result = e
        base_kind = "int8" if args[3] else "float32"
        when = f"about {fmt_eta(e.seconds)} for {e.steps:,} steps" if e.seconds is not None else "unknown"
        self.estimate.setText(
            f"Estimate, before it runs:<br><b>memory ≈ {fmt_bytes(e.total_bytes)}</b>: base "
            f"{fmt_bytes(e.base_bytes)} ({base_kind}) + adapter {e.adapter_params:,} parameters × 16 B = "
            f"{fmt_bytes(e.adapter_bytes)} + activations ≈ {fmt_bytes(e.activation_bytes)} (batch {e.batch} × "
            f"{e.seq_len} tokens, {e.seq_from}) + Python and torch ≈ {fmt_bytes(e.runtime_bytes)}<br>"
            f"<b>time ≥ {when}</b> at ≤ {e.tokens_per_s or 0:,.0f} tokens/s, from this machine's matrix-product "
            f"speed; small models run slower, and the first steps measure it")

    def browse_data(self):
        filt = "Text (*.txt *.md);;All (*)" if self.stage.currentData() == "pretrain" else "JSONL (*.jsonl);;All (*)"
        path, _ = QFileDialog.getOpenFileName(self, "Training data", "", filt)
        if path:
            self.data.setText(path)
            self.preview()
            self._estimate_timer.start()

    def preview(self):
        path, stage = self.data.text().strip(), self.stage.currentData()
        if not path:
            return
        if stage == "pretrain":
            self.ctx.run(batch_preview, path, self.tokenizer.currentText(), 4, min(self.context.value(), 96),
                         on_done=self._show_batch, on_error=self._preview_error)
        else:
            self.ctx.run(preview_records, path, stage, on_done=self._show_records, on_error=self._preview_error)

    def _preview_error(self, e):
        self.data_hint.setText(f"✗ {e}")
        self.preview_view.setPlainText(str(e))

    def _show_records(self, records):
        import json
        self.data_hint.setText(f"✓ valid — first {len(records)} records below")
        self.preview_view.setPlainText("\n\n".join(json.dumps(r, ensure_ascii=False, indent=2) for r in records))
        self.tabs.setCurrentWidget(self.preview_view)

    def _show_batch(self, b):
        """Fig. 75: B rows of T tokens; <|endoftext|> marks where one document ends and the next begins."""
        self.data_hint.setText(f"✓ {len(b.files)} file(s), {b.tokens:,} tokens previewed")
        self.preview_view.clear()
        cur = QTextCursor(self.preview_view.document())
        plain, mono = QTextCharFormat(), QTextCharFormat()
        mono.setFontFamilies(["monospace"])
        cur.insertText(f"One (B={b.batch}, T={b.context}) batch: each row is one training example cut from the "
                       f"stream of documents; the model learns to predict every next token.\n\n", plain)
        colors = ["#3a3322", "#1f3040"]
        for r, row in enumerate(b.rows):
            cur.insertText(f"row {r}  ", plain)
            for k, (text, eot) in enumerate(row):
                f = QTextCharFormat(mono)
                if eot:
                    f.setBackground(QColor("#ef5b5b"))
                    f.setForeground(QColor("#111111"))
                    text = "<|endoftext|>"
                else:
                    f.setBackground(QColor(colors[k % 2]))
                    text = text.replace("\n", "↵")
                cur.insertText(text, f)
            cur.insertText("\n\n", plain)
        self.tabs.setCurrentWidget(self.preview_view)

    # ---- the run -----------------------------------------------------------
    def options(self) -> dict:
        o = {"max_steps": self.steps.value(), "batch_size": self.batch.value(), "lr": self.lr.value(),
             "eval_every": self.eval_every.value(), "sample_every": self.sample_every.value(),
             "checkpoint_every": self.ckpt_every.value()}
        if self.stage.currentData() == "pretrain":
            o.update(tokenizer=self.tokenizer.currentText(), preset=self.preset.currentData(),
                     context=self.context.value())
        if self.stage.currentData() == "rl" and self.reward.currentData():
            key, value = self.reward.currentData()
            o[key] = value
        if self.stage.currentData() != "pretrain" and self.lora.isChecked():
            o.update(lora=True, lora_r=self.lora_r.value(), lora_alpha=self.lora_alpha.value(),
                     lora_dropout=self.lora_dropout.value(), lora_targets=self.lora_targets.currentText().strip(),
                     quantize="int8" if self.lora_int8.isChecked() else None)
        return o

    def start(self, resume: bool = False):
        if self.proc is not None:
            return
        stage = self.stage.currentData()
        base = self.base.currentData() if stage != "pretrain" else None
        self.argv = command(stage, self.out.text().strip(), self.data.text().strip() or None, base,
                            self.options(), resume)
        self.run_argv(self.argv, resume)

    def run_argv(self, argv: list[str], resume: bool = False):
        """Start a child process speaking JSON events on stdout (tests call this directly)."""
        if not resume:
            for xs, ys in self.series.values():
                xs.clear()
                ys.clear()
            for p in self.plots.values():
                p.reset_range()
            while self.samples_box.count() > 1:
                self.samples_box.takeAt(0).widget().deleteLater()
        self.log.appendPlainText("$ " + " ".join(argv[1:]))
        self.lora_run = "--lora" in argv
        self.run_out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        self.stopped = False
        if self.run_out is not None:
            self.ctx.set_setting("training.last_out", str(self.run_out))
            if not resume:
                (self.run_out / "events.jsonl").unlink(missing_ok=True)
        self.error_label.hide()
        self.last_error = ""
        self.proc = child_process(self, argv, self._read_stdout, self._read_stderr, self._finished, self._proc_error)
        self._set_state("running")
        self.proc.start()
        self.tabs.setCurrentIndex(0)

    def stop(self):
        """SIGTERM: the trainer writes a checkpoint and exits; Resume continues from it."""
        if self.proc is not None and self.state == "running":
            self._set_state("stopping")
            self.proc.terminate()
            QTimer.singleShot(30_000, self._kill_if_stuck)

    def _kill_if_stuck(self):
        if self.proc is not None and self.state == "stopping":
            self.proc.kill()

    def shutdown(self):
        """The window is closing: leave a running training alone only if it was started detached; ours stops."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.waitForFinished(3000)

    def _read_stdout(self):
        self._buf += bytes(self.proc.readAllStandardOutput())
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            ev = parse_line(line)
            if ev is None:
                if line.strip():
                    self.log.appendPlainText(line)
            else:
                self.handle(ev)
                self._record(line)

    def _record(self, line: str):
        """Keep the run's events in OUT/events.jsonl, so reopening Sol shows its curves again."""
        if self.run_out is None:
            return
        try:
            self.run_out.mkdir(parents=True, exist_ok=True)
            with open(self.run_out / "events.jsonl", "a", encoding="utf-8") as f:
                f.write(line.rstrip("\n") + "\n")
        except OSError:
            pass

    def replay(self, out: str) -> bool:
        """Show a finished (or stopped) run from its events.jsonl."""
        path = Path(out) / "events.jsonl"
        if not path.is_file():
            return False
        self.run_out = Path(out)
        with open(path, encoding="utf-8") as f:
            for line in f:
                ev = parse_line(line)
                if ev is not None:
                    self.handle(ev)
        self._redraw()
        self.flush_plots()
        self.out.setText(out)
        if self.started is not None:
            self.restore_form(self.started)
        self._set_state("failed" if self.last_error else "stopped" if self.stopped else "done")
        return True

    def restore_form(self, start: dict) -> None:
        """The form as the shown run was started, so Resume continues it with the same settings."""
        cfg = start.get("config") or {}
        i = self.stage.findData(start.get("stage"))
        if i >= 0:
            self.stage.setCurrentIndex(i)
        for spin, key in ((self.steps, "max_steps"), (self.batch, "batch_size"), (self.eval_every, "eval_every"),
                          (self.sample_every, "sample_every"), (self.ckpt_every, "checkpoint_every")):
            if isinstance(cfg.get(key), int):
                spin.setValue(cfg[key])
        if isinstance(cfg.get("lr"), (int, float)):
            self.lr.setValue(cfg["lr"])
        context = (cfg.get("model") or {}).get("context")
        if isinstance(context, int):
            self.context.setValue(context)
        lora = cfg.get("lora")
        self.lora_run = isinstance(lora, dict)
        self.lora.setChecked(self.lora_run)
        if self.lora_run:
            if isinstance(lora.get("r"), int):
                self.lora_r.setValue(lora["r"])
            for spin, key in ((self.lora_alpha, "alpha"), (self.lora_dropout, "dropout")):
                if isinstance(lora.get(key), (int, float)):
                    spin.setValue(lora[key])
            if isinstance(lora.get("targets"), list):
                self.lora_targets.setCurrentText(",".join(lora["targets"]))

    def _read_stderr(self):
        text = bytes(self.proc.readAllStandardError()).decode("utf-8", "replace").rstrip()
        if text:
            self.log.appendPlainText(text)
            if text.lstrip().startswith("error:") and not self.last_error:
                self.last_error = text.strip()

    def handle(self, ev: dict):
        t = ev.get("type")
        if t == "start":
            self.started = ev
            self.max_steps = int(ev.get("max_steps") or self.steps.value())
            self.progress.setFormat("%v / %m steps")
            self.progress.setMaximum(self.max_steps)
            dev = ev.get("device") or {}
            precision = f", {ev['precision']} matrix products" if ev.get("precision") else ""
            self.log.appendPlainText(f"start: {ev.get('stage', '')} on {dev.get('type', '?')} "
                                     f"({dev.get('name', '')}), {ev.get('parameters', 0):,} parameters{precision}")
        elif t == "progress":
            self.show_progress(ev)
        elif t == "step":
            s = ev.get("step", 0)
            for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if ev.get(k) is not None:
                    self.series[k][0].append(s)
                    self.series[k][1].append(float(ev[k]))
            self.last_step = ev
            self._dirty = True
        elif t == "eval":
            v = ev.get("val_loss", ev.get("accuracy", ev.get("reward_mean")))
            if v is not None:
                self.series["val_loss"][0].append(ev.get("step", len(self.series["val_loss"][0])))
                self.series["val_loss"][1].append(float(v))
                self._dirty = True
            self.log.appendPlainText("eval: " + ", ".join(f"{k}={v}" for k, v in ev.items() if k != "type"))
        elif t == "sample":
            self.add_sample(ev.get("step", 0), ev.get("text", ""))
        elif t == "checkpoint":
            self.log.appendPlainText(f"checkpoint: {ev.get('path')}")
        elif t == "done":
            self.stopped = bool(ev.get("stopped"))
            self.log.appendPlainText(f"done: {ev.get('out') or ev.get('path') or ''}")
            self._redraw()
            self.flush_plots()
            self.progress.setValue(self.progress.maximum())
        elif t == "error":
            self.last_error = ev.get("message", "unknown error")
            self.log.appendPlainText(f"error: {self.last_error}")

    def show_progress(self, ev: dict):
        """Work before the first step (tokenizing a corpus): {"what", "done", "total"} in the progress bar, and
        one log line when a piece of it is over."""
        what, done, total = str(ev.get("what") or "preparing"), ev.get("done") or 0, ev.get("total") or 0
        if not total:
            return
        # %p, %v and %m are the bar's placeholders: a word joiner after the text's own % keeps it as written
        self.progress.setFormat(what.replace("%", "%\u2060") + ": %p%")
        self.progress.setMaximum(1000)
        self.progress.setValue(int(1000 * min(done, total) / total))
        if done >= total:
            self.log.appendPlainText(f"{what}: {fmt_bytes(total)} done")

    def add_sample(self, step: int, text: str):
        card = QFrame()
        card.setObjectName("card")
        card.setFixedWidth(280)
        lay = QVBoxLayout(card)
        head = QLabel(f"step {step}")
        head.setObjectName("h2")
        body = QPlainTextEdit(text)
        body.setReadOnly(True)
        lay.addWidget(head)
        lay.addWidget(body, 1)
        self.samples_box.insertWidget(self.samples_box.count() - 1, card)

    def _redraw(self):
        """Paint what the events changed, a few times a second: a fast run sends hundreds of steps a
        second and repainting plots for each would starve the event loop."""
        if not self._dirty:
            return
        ev = self.last_step
        if ev is not None:
            s, loss = ev.get("step", 0), ev.get("loss")
            if self.progress.format() != "%v / %m steps":    # after a `progress` phase
                self.progress.setFormat("%v / %m steps")
            if self.lora_run and s >= 2 and ev.get("tokens_per_s"):
                self.estimate.setText(f"<b>measured</b> at step {s}: {ev['tokens_per_s']:,.0f} tokens/s, "
                                      f"{fmt_eta(ev.get('eta_s'))} to go")
            self.progress.setMaximum(max(self.max_steps, s))
            self.progress.setValue(s)
            self.eta.setText(f"step {s}  ·  loss {loss:.4f}  ·  {ev.get('tokens_per_s') or 0:,.0f} tok/s  ·  "
                             f"ETA {fmt_eta(ev.get('eta_s'))}" if loss is not None else f"step {s}")
        # One plot per tick, in turn: each repaint costs several ms, and four at once would be one long stall.
        self._turn = (getattr(self, "_turn", -1) + 1) % len(PLOTS)
        key = PLOTS[self._turn][0]
        for k in ([key, "val_loss"] if key == "loss" else [key]):
            self.curves[k].setData(*self.series[k])
        self._fit(key)
        if self._turn == len(PLOTS) - 1:
            self._dirty = False

    def flush_plots(self):
        for k, curve in self.curves.items():
            curve.setData(*self.series[k])
        for key, _, _ in PLOTS:
            self._fit(key)

    def _fit(self, key: str):
        xs, ys = self.series[key]
        if key == "loss":
            ys = ys + self.series["val_loss"][1]
        x_end = max(self.max_steps, xs[-1] if xs else 0)
        self.plots[key].fit(x_end, [y for y in ys if y is not None])

    def _proc_error(self, err):
        if err == QProcess.FailedToStart:
            self.last_error = f"could not start {self.argv[:1]}: {self.proc.errorString()}"
            self._finished(-1, QProcess.CrashExit)

    def _finished(self, code, status):
        if self.proc is None:
            return
        self._read_stdout()
        self._redraw()
        self.flush_plots()
        stopping = self.state == "stopping"
        self.proc.deleteLater()
        self.proc = None
        if stopping or (self.stopped and code == 0):
            self._set_state("stopped")
        elif code == 0 and not self.last_error:
            self._set_state("done")
            self.refresh_models()
            self.ctx.models_changed.emit()    # the Models panel lists the new model or adapter
        else:
            self._set_state("failed")
            self.error_label.setText(f"Training failed: {self.last_error or f'exit code {code}'} — see the Log tab.")
            self.error_label.show()

    def _set_state(self, state: str):
        self.state = state
        labels = {"idle": "idle", "running": "● running", "stopping": "stopping — writing a checkpoint …",
                  "stopped": "stopped (Resume continues from the last checkpoint)", "done": "✓ done",
                  "failed": "✗ failed"}
        self.state_label.setText(labels.get(state, state))
        self._buttons()

    def _buttons(self):
        running = self.proc is not None
        self.start_btn.setEnabled(not running)
        self.resume_btn.setEnabled(not running)
        self.stop_btn.setEnabled(running and self.state == "running")


def _stage(model_dir: str) -> str | None:
    """The `stage` in a model's sol.json, or None."""
    import json
    try:
        return json.loads((Path(model_dir) / "sol.json").read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError):
        return None
