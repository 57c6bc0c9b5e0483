"""The Embeddings panel: neighbours, analogy, a map of words, one word in two contexts, positions."""
from __future__ import annotations

import importlib.util

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                               QSpinBox, QSplitter, QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget)

from sol.app.kit import page, table
from sol.core.introspect import embeddings as E

MAP_WORDS = "king, queen, prince, man, woman, lord, lady, love, hate, sword, war, peace, day, night, sun, moon"
BANCO = ("Fui ao banco levantar dinheiro.", "Sentei-me num banco do jardim.")
ACCENT = "#f5a524"


def fill(t, rows: list[dict]) -> None:
    t.setRowCount(len(rows))
    for r, x in enumerate(rows):
        t.setItem(r, 0, QTableWidgetItem(repr(x["text"])))
        t.setItem(r, 1, QTableWidgetItem(f"{x['cosine']:.4f}"))
        t.setItem(r, 2, QTableWidgetItem(str(x["id"])))


def row(*widgets) -> QHBoxLayout:
    h = QHBoxLayout()
    for w in widgets:
        h.addWidget(w)
    return h


class EmbeddingsPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self._busy = 0
        self._asked: dict[str, int] = {}
        self.results: dict[str, dict] = {}
        lay = page(self, "Embeddings",
                   "Each token is a vector (§2.6). Near vectors, similar tokens; directions can carry meaning "
                   "(rei − homem + mulher ≈ rainha); context moves a word's vector layer by layer; "
                   "positions have vectors too (Box 7). Words that follow a space are their own tokens "
                   "in byte-level BPE: tick “after a space” to ask for those.")
        top = QHBoxLayout()
        self.space = QCheckBox("after a space (“ king”, not “king”)")
        self.space.setChecked(True)
        self.status = QLabel()
        self.status.setObjectName("stat")
        top.addWidget(self.space)
        top.addWidget(self.status, 1)
        lay.addLayout(top)
        self.tabs = QTabWidget()
        self.tabs.addTab(self._map_tab(), "Map")
        self.tabs.addTab(self._neighbours_tab(), "Neighbours")
        self.tabs.addTab(self._analogy_tab(), "Analogy")
        self.tabs.addTab(self._context_tab(), "In context")
        self.tabs.addTab(self._positions_tab(), "Positions")
        lay.addWidget(self.tabs, 1)
        ctx.model_changed.connect(self._on_model)
        self._on_model(ctx.loaded)

    # ---- the tabs ------------------------------------------------------------
    def _neighbours_tab(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        self.word = QLineEdit("king")
        self.k = QSpinBox()
        self.k.setRange(1, 100)
        self.k.setValue(10)
        self.k.setPrefix("k = ")
        btn = QPushButton("Neighbours")
        btn.setObjectName("primary")
        v.addLayout(row(self.word, self.k, btn))
        self.neighbours_info = QLabel()
        self.neighbours_info.setObjectName("muted")
        v.addWidget(self.neighbours_info)
        self.neighbours_table = table(["token", "cosine", "id"])
        v.addWidget(self.neighbours_table, 1)
        btn.clicked.connect(self.run_neighbours)
        self.word.returnPressed.connect(self.run_neighbours)
        return w

    def _analogy_tab(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        self.a, self.b, self.c = QLineEdit("king"), QLineEdit("man"), QLineEdit("woman")
        btn = QPushButton("a − b + c")
        btn.setObjectName("primary")
        v.addLayout(row(QLabel("a"), self.a, QLabel("− b"), self.b, QLabel("+ c"), self.c, btn))
        self.analogy_table = table(["token", "cosine", "id"])
        v.addWidget(self.analogy_table, 1)
        btn.clicked.connect(self.run_analogy)
        return w

    def _map_tab(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        self.words = QLineEdit(MAP_WORDS)
        self.method = QComboBox()
        self.method.addItem("PCA", "pca")
        if importlib.util.find_spec("umap") is not None:   # optional: umap-learn
            self.method.addItem("UMAP", "umap")
        btn = QPushButton("Draw map")
        btn.setObjectName("primary")
        v.addLayout(row(self.words, self.method, btn))
        self.map_info = QLabel()
        self.map_info.setObjectName("stat")
        v.addWidget(self.map_info)
        split = QSplitter()
        self.map_plot = pg.PlotWidget()
        self.map_plot.setMenuEnabled(False)
        self.points = pg.ScatterPlotItem(size=11, brush=pg.mkBrush(ACCENT), pen=pg.mkPen("#1b1e24"),
                                         hoverable=True, hoverSize=15, hoverBrush=pg.mkBrush("#ffffff"),
                                         tip=lambda x, y, data: f"{data!r}\nclick: its neighbours")
        self.map_plot.addItem(self.points)
        self.labels: list[pg.TextItem] = []
        self.points.sigClicked.connect(self._map_clicked)
        split.addWidget(self.map_plot)
        side = QWidget()
        sv = QVBoxLayout(side)
        self.map_pick = QLabel("click a point for its neighbours")
        sv.addWidget(self.map_pick)
        self.map_table = table(["token", "cosine", "id"])
        sv.addWidget(self.map_table, 1)
        split.addWidget(side)
        split.setSizes([720, 280])
        v.addWidget(split, 1)
        btn.clicked.connect(self.run_map)
        self.words.returnPressed.connect(self.run_map)
        return w

    def _context_tab(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        form = QFormLayout()
        self.ctx_word = QLineEdit("banco")
        self.s1, self.s2 = QLineEdit(BANCO[0]), QLineEdit(BANCO[1])
        form.addRow("word", self.ctx_word)
        form.addRow("sentence 1", self.s1)
        form.addRow("sentence 2", self.s2)
        v.addLayout(form)
        btn = QPushButton("Compare across layers")
        btn.setObjectName("primary")
        self.context_info = QLabel()
        self.context_info.setObjectName("stat")
        v.addLayout(row(btn, self.context_info))
        self.context_plot = pg.PlotWidget()
        self.context_plot.setLabel("bottom", "layer (0 = the embedding)")
        self.context_plot.setLabel("left", "cosine of the word's two vectors")
        self.context_curve = self.context_plot.plot([], [], pen=pg.mkPen(ACCENT, width=2), symbol="o",
                                                    symbolBrush=ACCENT)
        v.addWidget(self.context_plot, 1)
        btn.clicked.connect(self.run_context)
        return w

    def _positions_tab(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        self.positions_info = QLabel()
        self.positions_info.setWordWrap(True)
        v.addWidget(self.positions_info)
        self.positions_view = pg.GraphicsLayoutWidget()
        self.positions_plot = self.positions_view.addPlot()
        self.positions_plot.setMenuEnabled(False)
        self.positions_image = pg.ImageItem(axisOrder="row-major")
        self.positions_plot.addItem(self.positions_image)
        self.positions_bar = pg.ColorBarItem(values=(-1, 1), colorMap=pg.colormap.get("CET-D1"), width=14,
                                             interactive=False)
        self.positions_bar.setImageItem(self.positions_image, insert_in=self.positions_plot)
        self.positions_curve = pg.PlotDataItem([], [], pen=pg.mkPen(ACCENT, width=2), symbol="o", symbolSize=5,
                                               symbolBrush=ACCENT)
        self.positions_plot.addItem(self.positions_curve)
        v.addWidget(self.positions_view, 1)
        return w

    # ---- running -------------------------------------------------------------
    def is_ready(self) -> bool:
        return self._busy == 0

    def _on_model(self, loaded):
        self.results.clear()
        if loaded is None:
            self.status.setText("Load a model (Models panel) to explore its embeddings.")
            return
        self.status.setText(f"{loaded.name}: {loaded.config.vocab_size} tokens × {loaded.config.d_model} dimensions")
        self.run_neighbours()
        self.run_analogy()
        self.run_map()
        self.run_context()
        self.run_positions()

    def _w(self, text: str) -> str:
        text = text.strip()
        return " " + text if self.space.isChecked() else text

    def _run(self, key: str, fn, *args, then):
        loaded = self.ctx.loaded
        if loaded is None:
            return
        self._busy += 1
        self._asked[key] = asked = self._asked.get(key, 0) + 1

        def done(out):
            self._busy -= 1
            if asked != self._asked[key]:   # an older request finished after a newer one
                return
            self.results[key] = out
            then(out)

        def failed(e):
            self._busy -= 1
            self.status.setText(f"error: {e}")

        self.ctx.run(fn, loaded, *args, on_done=done, on_error=failed)

    def run_neighbours(self):
        self._run("neighbours", E.neighbours, self._w(self.word.text()), self.k.value(), then=self._show_neighbours)

    def _show_neighbours(self, out):
        ids = out["ids"]
        self.neighbours_info.setText(f"{out['query']!r} is {len(ids)} token{'s' * (len(ids) > 1)} {ids}"
                                     + (" (their mean)" if len(ids) > 1 else ""))
        fill(self.neighbours_table, out["neighbours"])

    def run_analogy(self):
        self._run("analogy", E.analogy, self._w(self.a.text()), self._w(self.b.text()), self._w(self.c.text()), 10,
                  then=lambda out: fill(self.analogy_table, out["neighbours"]))

    def run_map(self):
        words = [self._w(x) for x in self.words.text().split(",") if x.strip()]
        self._run("map", E.word_map, words, self.method.currentData(), then=self._show_map)

    def _show_map(self, out):
        xy = np.array(out["xy"], dtype=float)
        self.points.setData(pos=xy, data=out["words"])
        for t in self.labels:
            self.map_plot.removeItem(t)
        self.labels = []
        for (x, y), word in zip(xy, out["words"]):
            t = pg.TextItem(word.strip(), color="#e4e6eb", anchor=(-0.15, 0.5))
            t.setPos(x, y)
            self.map_plot.addItem(t)
            self.labels.append(t)
        self.map_plot.getViewBox().autoRange(padding=0.12)   # room for the labels right of the points
        if not self.results.get("map_pick") and out["words"]:
            self.pick_word(out["words"][0])
        if out["explained_variance"]:
            a, b = out["explained_variance"]
            self.map_info.setText(f"PCA of {len(xy)} words: the two axes keep {100 * (a + b):.1f}% of the variance "
                                  f"({100 * a:.1f}% + {100 * b:.1f}%); the rest is lost, so near on the map is not "
                                  "always near in the model")
        else:
            self.map_info.setText(f"{out['method'].upper()} of {len(xy)} words")

    def _map_clicked(self, _item, points, *_):
        if len(points):
            self.pick_word(points[0].data())

    def pick_word(self, word: str):
        """A point of the map was clicked: its neighbours in the side table."""
        self.map_pick.setText(f"neighbours of {word!r}")
        self._run("map_pick", E.neighbours, word, 10, then=lambda out: fill(self.map_table, out["neighbours"]))

    def run_context(self):
        self._run("context", E.in_context, self.ctx_word.text(), [self.s1.text(), self.s2.text()],
                  then=self._show_context)

    def _show_context(self, out):
        self.context_curve.setData(out["layers"], out["cosine"])
        self.context_info.setText(f"layer 0: {out['cosine'][0]:.3f} (the same vector) → last layer: "
                                  f"{out['cosine'][-1]:.3f}")

    def run_positions(self):
        self._run("positions", E.positions, 64, then=self._show_positions)

    def _show_positions(self, out):
        p = self.positions_plot
        if out["kind"] == "learned":
            m = np.array(out["cosine"])
            self.positions_curve.setData([], [])
            self.positions_image.setImage(m, autoLevels=False, levels=(-1, 1))
            self.positions_bar.show()
            p.setLabel("bottom", "position")
            p.setLabel("left", "position")
            p.invertY(True)
            p.setLogMode(y=False)
            p.setRange(xRange=(0, len(m)), yRange=(0, len(m)), padding=0)
            self.positions_info.setText(f"Learned position embeddings: cosine between the vectors of the first "
                                        f"{len(m)} positions. Near positions have similar vectors: a diagonal band.")
        else:
            f = np.array(out["frequencies"])
            self.positions_image.clear()
            self.positions_bar.hide()
            p.invertY(False)
            p.setLogMode(y=True)
            self.positions_curve.setData(np.arange(len(f)), f)
            p.setLabel("bottom", "dimension pair")
            p.setLabel("left", "radians per position (log)")
            p.autoRange()
            self.positions_info.setText(f"RoPE: no position vectors; each of the {len(f)} dimension pairs of a head "
                                        "is rotated by position × its frequency. Fast pairs tell near positions apart, "
                                        f"slow ones far ones (wavelengths {out['wavelengths'][0]:.1f} to "
                                        f"{out['wavelengths'][-1]:.0f} positions).")
