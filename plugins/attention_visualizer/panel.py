"""The Attention panel: heatmap, head view, all heads, and the step-by-step for one query token."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QPainter, QPen
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLabel,
                               QPlainTextEdit, QPushButton, QScrollArea, QSpinBox, QSplitter, QTableWidget,
                               QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget)

from sol.app.kit import page

from .compute import all_layers, encode, layer_attention, step_by_step

SAMPLE = "O Sol contou a Plutão que a atenção deixa cada token olhar para os tokens que vieram antes dele."
MAX_TICKS = 48
ACCENT = QColor("#f5a524")


def short(label: str, n: int = 10) -> str:
    s = label.replace("\n", "↵").replace(" ", "·")
    return s if len(s) <= n else s[: n - 1] + "…"


def colormap():
    return pg.colormap.get("inferno")


def scale_text(s: dict) -> str:
    root = np.sqrt(s["d_head"])
    if abs(s["scale"] * root - 1) < 1e-6:
        return f"divide by √d_k = √{s['d_head']} = {root:.2f}"
    return f"multiply by this model's scale {s['scale']:.4f} (not 1/√d_k = {1 / root:.4f})"


def window_text(s: dict) -> str:
    return f" and the {s['first']} too far back for this layer's sliding window" if s["first"] else ""


class HeadView(QWidget):
    """bertviz-style: tokens on the left attend to tokens on the right; line opacity is the weight."""
    ROW = 20

    def __init__(self):
        super().__init__()
        self.labels: list[str] = []
        self.w: np.ndarray | None = None
        self.selected = -1
        self.setMouseTracking(True)
        self.setMinimumWidth(420)

    def set_data(self, labels, weights):
        self.labels, self.w = labels, weights
        self.setMinimumHeight(self.ROW * len(labels) + 20)
        self.update()

    def mouseMoveEvent(self, ev):
        i = int((ev.position().y() - 10) // self.ROW)
        x = ev.position().x()
        i = i if 0 <= i < len(self.labels) and x < self.width() * 0.4 else self.selected
        if i != self.selected:
            self.selected = i
            self.update()

    def paintEvent(self, _):
        if self.w is None:
            return
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        p.setFont(QFont(self.font().family(), 9))
        W = self.width()
        xl, xr = int(W * 0.32), int(W * 0.68)
        T = len(self.labels)
        y = lambda i: 10 + i * self.ROW + self.ROW / 2  # noqa: E731
        # Only the rows on screen, and for many tokens only the hovered one: lines must stay cheap to draw.
        vis = self.visibleRegion().boundingRect()
        lo, hi = max(0, int((vis.top() - 10) // self.ROW) - 1), min(T, int((vis.bottom() - 10) // self.ROW) + 2)
        rows = [self.selected] if self.selected >= 0 else (range(lo, hi) if T <= 200 else [])
        for i in rows:
            for j in range(i + 1):
                a = float(self.w[i, j])
                if a < 0.01:
                    continue
                c = QColor(ACCENT)
                c.setAlphaF(min(1.0, 0.15 + a * 0.85) if self.selected >= 0 else min(1.0, a * 0.8))
                p.setPen(QPen(c, 1 + 3 * a))
                p.drawLine(QPointF(xl + 6, y(i)), QPointF(xr - 6, y(j)))
        for i in range(lo, hi):
            sel = i == self.selected
            p.setPen(QColor("#f5a524") if sel else QColor("#e4e6eb"))
            p.drawText(QRectF(0, y(i) - 9, xl - 4, 18), Qt.AlignRight | Qt.AlignVCenter, short(self.labels[i], 16))
            strength = float(self.w[self.selected, i]) if self.selected >= 0 and i <= self.selected else 0
            p.setPen(QColor("#f5a524") if strength > 0.05 else QColor("#b8bdc8"))
            p.drawText(QRectF(xr + 4, y(i) - 9, W - xr - 4, 18), Qt.AlignLeft | Qt.AlignVCenter,
                       short(self.labels[i], 16))
        p.end()


class Heatmap(pg.GraphicsLayoutWidget):
    """Query tokens down, key tokens across; ImageItem + color bar."""

    def __init__(self, on_click=None):
        super().__init__()
        self.plot = self.addPlot()
        self.plot.invertY(True)
        self.plot.setAspectLocked(False)
        self.plot.setMenuEnabled(False)
        self.plot.getViewBox().setMouseEnabled(x=True, y=True)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.bar = pg.ColorBarItem(values=(0, 1), colorMap=colormap(), width=14, interactive=False)
        self.bar.setImageItem(self.image, insert_in=self.plot)
        self.plot.setLabel("left", "query token")
        self.plot.setLabel("bottom", "key token (attended to)")
        self.on_click = on_click
        self.image.mouseClickEvent = self._clicked

    def set_data(self, w: np.ndarray, labels: list[str]):
        self.data = w
        # The first rows are trivially 1 (a token with one key); scale to the rest so structure shows.
        top = float(max((w[2:] if len(w) > 4 else w).max(), 1e-6))
        self.image.setImage(w, autoLevels=False, levels=(0, top))
        self.bar.setLevels((0, top))
        T = w.shape[0]
        if T <= MAX_TICKS:
            ticks = [[(i + 0.5, short(l, 8)) for i, l in enumerate(labels)]]
        else:
            step = max(1, T // 20)
            ticks = [[(i + 0.5, str(i)) for i in range(0, T, step)]]
        self.plot.getAxis("bottom").setTicks(ticks)
        self.plot.getAxis("left").setTicks(ticks)
        self.plot.setRange(xRange=(0, T), yRange=(0, T), padding=0)

    def _clicked(self, ev):
        if self.on_click is not None:
            self.on_click(int(ev.pos().y()))


class AttentionPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.ids: list[int] = []
        self.labels: list[str] = []
        self.layers: dict[int, object] = {}      # layer -> LayerAttention, computed on demand
        self.grid_data = None
        self.pending: set[int] = set()
        self._busy = 0
        self._ran = False
        lay = page(self, "Attention", "Each row is a token; its colors say how much it looks at each earlier "
                                      "token (every row sums to 1). Click a row for the step-by-step.")

        top = QHBoxLayout()
        self.input = QPlainTextEdit(SAMPLE)
        self.input.setFixedHeight(64)
        top.addWidget(self.input, 1)
        col = QVBoxLayout()
        self.run_btn = QPushButton("Show attention")
        self.run_btn.setObjectName("primary")
        self.last_btn = QPushButton("Use last chat answer")
        col.addWidget(self.run_btn)
        col.addWidget(self.last_btn)
        top.addLayout(col)
        lay.addLayout(top)

        ctl = QHBoxLayout()
        self.layer = QSpinBox()
        self.layer.setPrefix("layer ")
        self.head = QComboBox()
        self.query = QSpinBox()
        self.query.setPrefix("query token ")
        self.status = QLabel("")
        self.status.setObjectName("stat")
        for w in (self.layer, self.head, self.query):
            ctl.addWidget(w)
        ctl.addWidget(self.status, 1)
        lay.addLayout(ctl)

        self.tabs = QTabWidget()
        self.heatmap = Heatmap(on_click=self.query.setValue)
        self.headview = HeadView()
        hv = QScrollArea()
        hv.setWidgetResizable(True)
        hv.setWidget(self.headview)
        self.grid = pg.GraphicsLayoutWidget()
        self.tabs.addTab(self.heatmap, "Heatmap")
        self.tabs.addTab(hv, "Head view")
        self.tabs.addTab(self.grid, "All layers × heads")
        self.tabs.addTab(self._steps_widget(), "Step by step")
        lay.addWidget(self.tabs, 1)

        self.run_btn.clicked.connect(self.run)
        self.last_btn.clicked.connect(self.use_last_answer)
        self.layer.valueChanged.connect(self.refresh)
        self.head.currentIndexChanged.connect(self.refresh)
        self.query.valueChanged.connect(self.refresh_steps)
        self.tabs.currentChanged.connect(self.refresh)
        ctx.model_changed.connect(self._on_model)
        self._on_model(ctx.loaded)

    def _steps_widget(self) -> QWidget:
        w = QWidget()
        lay = QVBoxLayout(w)
        self.steps_text = QLabel()
        self.steps_text.setWordWrap(True)
        self.steps_text.setTextFormat(Qt.RichText)
        lay.addWidget(self.steps_text)
        split = QSplitter(Qt.Horizontal)
        self.steps = QTableWidget(0, 5)
        self.steps.setHorizontalHeaderLabels(["key", "q·k", "÷ √d_k", "masked", "weight"])
        self.steps.verticalHeader().hide()
        self.steps.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.steps.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        split.addWidget(self.steps)
        self.weights_plot = pg.PlotWidget()
        self.weights_plot.setLabel("bottom", "key token")
        self.weights_plot.setLabel("left", "weight")
        self.weights_bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush="#f5a524")
        self.weights_plot.addItem(self.weights_bars)
        split.addWidget(self.weights_plot)
        split.setSizes([560, 480])
        lay.addWidget(split, 1)
        self.output_text = QLabel()
        self.output_text.setObjectName("stat")
        self.output_text.setWordWrap(True)
        lay.addWidget(self.output_text)
        return w

    # ---- state -------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.ctx.model is None or (self._ran and self._busy == 0)

    def _on_model(self, loaded):
        self.layers.clear()
        self.grid_data = None
        enabled = loaded is not None
        self.run_btn.setEnabled(enabled)
        if not enabled:
            self.status.setText("Load a model (Models panel) to see its attention.")
            return
        cfg = loaded.config
        self.layer.setRange(0, cfg.n_layer - 1)
        self.head.blockSignals(True)
        self.head.clear()
        self.head.addItem("mean over heads", None)
        for h in range(cfg.n_head):
            self.head.addItem(f"head {h}", h)
        self.head.setCurrentIndex(1)
        self.head.blockSignals(False)
        self.run()

    def use_last_answer(self):
        text = self.ctx.last_answer or ""
        if not text:
            self.status.setText("No chat answer yet: chat first, or type a text.")
            return
        self.input.setPlainText(text)
        self.run()

    def run(self):
        if self.ctx.model is None:
            return
        cfg = self.ctx.loaded.config
        self.ids, self.labels = encode(self.ctx.tokenizer, self.input.toPlainText(), cfg.context)
        self.layers.clear()
        self.grid_data = None
        self.query.setRange(0, max(0, len(self.ids) - 1))
        self.query.setValue(max(0, len(self.ids) - 1))
        self._ran = True
        self.refresh()

    # ---- computing on demand -----------------------------------------------
    def _need(self, layer: int) -> bool:
        """True when `layer` is ready; otherwise starts computing it off the GUI thread."""
        if layer in self.layers:
            return True
        if layer not in self.pending and self.ids:
            self.pending.add(layer)
            self._busy += 1
            self.status.setText(f"computing layer {layer} for {len(self.ids)} tokens …")
            model, ids = self.ctx.model, list(self.ids)

            def done(att, ids=ids):
                self._busy -= 1
                self.pending.discard(layer)
                if ids == self.ids:      # the text may have changed meanwhile
                    self.layers[layer] = att
                    self.refresh()

            def failed(e):
                self._busy -= 1
                self.pending.discard(layer)
                self.status.setText(f"error: {e}")

            self.ctx.run(layer_attention, model, ids, layer, on_done=done, on_error=failed)
        return False

    def refresh(self, *_):
        if not self.ids:
            return
        layer = self.layer.value()
        tab = self.tabs.currentIndex()
        if tab == 2:
            return self._refresh_grid()
        if not self._need(layer):
            return
        att = self.layers[layer]
        w = att.head(self.head.currentData())
        self.status.setText(f"{len(self.ids)} tokens · layer {layer} · "
                            f"{self.head.currentText()} · d_head {att.d_head}")
        if tab == 0:
            self.heatmap.set_data(w, self.labels)
        elif tab == 1:
            self.headview.set_data(self.labels, w)
        self.refresh_steps()

    def _refresh_grid(self):
        if self.grid_data is None:
            if "grid" in self.pending:
                return
            self.pending.add("grid")
            self._busy += 1
            self.status.setText("computing every layer …")
            ids = list(self.ids)

            def done(data):
                self._busy -= 1
                self.pending.discard("grid")
                if ids == self.ids:
                    self.grid_data = data
                    self._refresh_grid()

            def failed(e):
                self._busy -= 1
                self.pending.discard("grid")
                self.status.setText(f"error: {e}")

            self.ctx.run(all_layers, self.ctx.model, ids, on_done=done, on_error=failed)
            return
        self.grid.clear()
        cmap = colormap()
        for L, w in enumerate(self.grid_data):
            for h in range(w.shape[0]):
                vb = self.grid.addViewBox(row=L, col=h, lockAspect=True, enableMouse=False, invertY=True)
                img = pg.ImageItem(w[h], axisOrder="row-major")
                img.setLookupTable(cmap.getLookupTable(nPts=256))
                img.setLevels((0, max(float(w[h].max()), 1e-6)))
                vb.addItem(img)
            lbl = self.grid.addLabel(f"L{L}", row=L, col=w.shape[0])
            lbl.setMaximumWidth(30)
        self.status.setText(f"{len(self.grid_data)} layers × {self.grid_data[0].shape[0]} heads")

    def refresh_steps(self, *_):
        layer = self.layer.value()
        if layer not in self.layers:
            return
        h = self.head.currentData()
        h = 0 if h is None else h
        qi = min(self.query.value(), len(self.ids) - 1)
        s = step_by_step(self.layers[layer], h, qi)
        n = qi + 1
        show = range(max(0, n - 200), n)   # the table shows at most the 200 nearest keys
        self.steps.setRowCount(len(show))
        for r, j in enumerate(show):
            vals = [f"{j}: {short(self.labels[j], 14)}", f"{s['scores'][j]:.3f}", f"{s['scaled'][j]:.3f}",
                    f"{s['masked'][j]:.3f}", f"{s['weights'][j]:.4f}"]
            for c, v in enumerate(vals):
                item = QTableWidgetItem(v)
                if c == 4:
                    item.setForeground(QColor("#f5a524"))
                self.steps.setItem(r, c, item)
        self.weights_bars.setOpts(x=np.arange(n), height=s["weights"][:n])
        self.steps_text.setText(
            f"<b>Query token {qi}</b> “{short(self.labels[qi], 24)}”, layer {layer}, head {h}. "
            f"1) score = q·k for every key token; 2) {scale_text(s)}; "
            f"3) mask the {len(self.ids) - n} future tokens{window_text(s)} to −∞; "
            f"4) softmax turns scores into weights that sum to 1 "
            f"(here {s['weights'].sum():.4f}); 5) the output is Σ weight · v.")
        out = ", ".join(f"{x:.3f}" for x in s["output"][:8])
        diff = float(np.abs(s["output"] - s["model_output"]).max())
        self.output_text.setText(f"output (first 8 of {s['d_head']} dimensions): [{out}{', …' if s['d_head'] > 8 else ''}]"
                                 f" — matches the model's own computation to {diff:.1e}")
