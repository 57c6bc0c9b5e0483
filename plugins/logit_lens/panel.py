"""The Layers panel (logit lens): rows are layers, columns positions; each cell the token that layer's
residual stream would predict next, shaded by its probability. The bottom row is the model's answer."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QPlainTextEdit, QPushButton,
                               QTableWidget, QTableWidgetItem, QWidget)

from sol.app.kit import page
from sol.core.introspect.lens import lens

SAMPLE = "To be, or not to be, that is the question"
MAX_POSITIONS = 64


def shade(p: float) -> QColor:
    c = QColor("#f5a524")
    c.setAlphaF(0.1 + 0.85 * p)
    return c


def shown(s: str) -> str:
    return s.replace("\n", "↵").replace(" ", "·")


class LensPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self._busy = 0
        self._asked = 0
        self.result: dict | None = None
        lay = page(self, "What each layer predicts",
                   "The logit lens: each layer's residual stream read through the final norm and the unembedding. "
                   "Each column is a position; down the column, the next-token guess forms layer by layer. "
                   "The last row is the model's own prediction.")
        top = QHBoxLayout()
        self.input = QPlainTextEdit(SAMPLE)
        self.input.setFixedHeight(56)
        self.run_btn = QPushButton("Show layers")
        self.run_btn.setObjectName("primary")
        top.addWidget(self.input, 1)
        top.addWidget(self.run_btn)
        lay.addLayout(top)
        self.status = QLabel()
        self.status.setObjectName("stat")
        lay.addWidget(self.status)
        self.grid = QTableWidget(0, 0)
        self.grid.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.grid.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        lay.addWidget(self.grid, 1)
        self.run_btn.clicked.connect(self.run)
        ctx.model_changed.connect(self._on_model)
        self._on_model(ctx.loaded)

    def is_ready(self) -> bool:
        return self._busy == 0

    def _on_model(self, loaded):
        self.run_btn.setEnabled(loaded is not None)
        if loaded is None:
            self.status.setText("Load a model (Models panel) to see what its layers predict.")
            return
        self.run()

    def run(self):
        loaded = self.ctx.loaded
        if loaded is None:
            return
        text = self.input.toPlainText()
        ids = loaded.tokenizer.encode_ids(text)
        if len(ids) > MAX_POSITIONS:   # the grid stays readable; the lens of a long text is the lens of its end
            text = loaded.tokenizer.decode(ids[-MAX_POSITIONS:])
        self._busy += 1
        self._asked += 1
        asked = self._asked
        self.status.setText("computing every layer …")
        # Only the newest request is shown: an older one (another text, another model) may finish later.
        self.ctx.run(lens, loaded, text, 3, on_done=lambda out: self._show(out, asked), on_error=self._failed)

    def _failed(self, e):
        self._busy -= 1
        self.status.setText(f"error: {e}")

    def _show(self, out: dict, asked: int):
        self._busy -= 1
        if asked != self._asked:
            return
        self.result = out
        layers, positions = out["layers"], out["positions"]
        g = self.grid
        g.setRowCount(len(layers))
        g.setColumnCount(len(positions))
        g.setHorizontalHeaderLabels([shown(p["token"]) for p in positions])
        g.setVerticalHeaderLabels(["embedding" if l == 0 else f"layer {l}" for l in layers])
        for c, pos in enumerate(positions):
            for r, e in enumerate(pos["per_layer"]):
                item = QTableWidgetItem(f"{shown(e['text'])}\n{e['prob']:.2f}")
                item.setTextAlignment(Qt.AlignCenter)
                item.setBackground(shade(e["prob"]))
                item.setForeground(QColor("#111" if e["prob"] > 0.45 else "#e4e6eb"))   # readable on both
                item.setToolTip("\n".join(f"{a['text']!r}  {a['prob']:.3f}" for a in e.get("top", [e])))
                g.setItem(r, c, item)
        g.resizeRowsToContents()
        self.status.setText(f"{len(positions)} positions × {len(layers)} rows (embedding and {len(layers) - 1} layers); "
                            "hover a cell for its top 3")
