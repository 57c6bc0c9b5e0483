"""Why this token? The book's §2.8 (Figs. 55-56) for one generated token: the candidates with
their probabilities, the running (cumulative) sum, and the random draw that picked one.
A temperature slider reshapes the bars live: softmax(log p / T) over the stored top log-probs."""
from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QSlider, QVBoxLayout

SHOW = 10


def reshape(probs: list[float], temperature: float) -> np.ndarray:
    """softmax(log p / T) over the given candidates (renormalised among them)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    if temperature <= 0.01:
        out = np.zeros_like(p)
        out[int(p.argmax())] = 1.0
        return out
    z = np.log(p) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def pick(cumulative: np.ndarray, draw: float) -> int:
    """The first candidate whose running sum passes the draw (the book's rule)."""
    return int(min(np.searchsorted(cumulative, draw * cumulative[-1], side="right"), len(cumulative) - 1))


class ExplainView(QFrame):
    def __init__(self):
        super().__init__()
        self.setObjectName("card")
        self.current = None
        self.labels: list[str] = []
        self.ids: list[int] = []
        self.base: list[float] = []
        self.used_cum: list[float] | None = None   # the sampler's running sums, when it sampled
        self.t_used = 1.0
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 10, 12, 10)
        head = QLabel("Why this token?")
        head.setObjectName("h2")
        lay.addWidget(head)
        self.summary = QLabel("Click a token of an answer (▦ tokens view) to see how it was chosen.")
        self.summary.setWordWrap(True)
        self.summary.setObjectName("stat")
        lay.addWidget(self.summary)
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.setFixedHeight(210)
        self.plot.showGrid(y=True, alpha=0.15)
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush="#5aa9e6")
        self.plot.addItem(self.bars)
        self.cum = self.plot.plot([], [], pen=pg.mkPen("#e4e6eb", width=1.5), symbol="o", symbolSize=5,
                                  symbolBrush="#e4e6eb")
        self.draw_line = pg.InfiniteLine(angle=0, pen=pg.mkPen("#ef5b5b", width=1.5, style=Qt.DashLine))
        self.plot.addItem(self.draw_line)
        self.draw_line.hide()       # until a token is chosen
        self.plot.setYRange(0, 1.02)
        lay.addWidget(self.plot)
        row = QHBoxLayout()
        row.addWidget(QLabel("temperature"))
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(1, 300)     # T = value / 100
        self.slider.setValue(100)
        self.t_label = QLabel("1.00")
        self.t_label.setMinimumWidth(36)
        row.addWidget(self.slider, 1)
        row.addWidget(self.t_label)
        lay.addLayout(row)
        self.table = QLabel()
        self.table.setTextFormat(Qt.RichText)
        self.table.setWordWrap(True)
        lay.addWidget(self.table)
        self.slider.valueChanged.connect(self.redraw)

    def show_token(self, event: dict, text_of):
        """event: a chat `token` event (top alternatives and the sampling explanation).

        A sampled token shows the sampler's own candidates: probabilities after the repetition
        penalty, temperature and filters, the running sum and the draw that `choose` used, so the
        dashed line crosses the chosen bar's running sum. Other temperatures reshape those numbers
        (p ** (T_used / T), renormalised). A greedy token, or one without an explanation, shows the
        model's raw top alternatives."""
        self.current = event
        expl = event.get("explanation") or {}
        texts = {t["id"]: t["text"] for t in event.get("top") or []}
        if expl.get("draw") is not None and expl.get("ids"):
            n = max(SHOW, expl.get("index", 0) + 1)
            self.ids = list(expl["ids"][:n])
            self.base = list(expl["probs"][:n])
            self.used_cum = list(expl["cumulative"][:n])
            self.t_used = float(expl["params"]["temperature"])
        else:
            top = list(event.get("top") or [])
            if event.get("id") not in [t["id"] for t in top]:
                top.append({"id": event.get("id"), "text": text_of(event.get("id")),
                            "prob": math.exp(event.get("logprob", -30))})
            self.ids = [t["id"] for t in top]
            self.base = [t["prob"] for t in top]
            self.used_cum = None
            self.t_used = 1.0           # raw model probabilities: reshape as softmax(log p / T)
        self.labels = [texts[i] if i in texts else text_of(i) for i in self.ids]
        t_slider = (expl.get("params") or {}).get("temperature", 1.0) or 0.0
        self.slider.blockSignals(True)
        self.slider.setValue(max(1, int(round(t_slider * 100))))
        self.slider.blockSignals(False)
        self.redraw()

    def _as_sampled(self, T: float) -> bool:
        """At the temperature the sampler used, the view shows its exact numbers and choice."""
        return self.used_cum is not None and abs(T - self.t_used) < 0.005

    def _at(self, T: float) -> tuple[np.ndarray, np.ndarray]:
        """Bars and running sum at temperature T."""
        if self._as_sampled(T):
            return np.asarray(self.base), np.asarray(self.used_cum)
        p = reshape(self.base, T / self.t_used)
        return p, np.cumsum(p)

    def redraw(self, *_):
        if self.current is None:
            return
        T = self.slider.value() / 100
        self.t_label.setText(f"{T:.2f}")
        p, cum = self._at(T)
        expl = self.current.get("explanation") or {}
        draw = expl.get("draw")
        chosen = self.ids.index(self.current["id"]) if self.current["id"] in self.ids else -1
        x = np.arange(len(p))
        brushes = ["#f5a524" if i == chosen else "#5aa9e6" for i in x]
        self.bars.setOpts(x=x, height=p, brushes=brushes)
        self.cum.setData(x, cum)
        ax = self.plot.getAxis("bottom")
        ax.setTicks([[(i, repr(l)[1:-1][:6]) for i, l in enumerate(self.labels)]])
        if draw is not None:
            self.draw_line.setValue(draw)
            self.draw_line.show()
        else:
            self.draw_line.hide()
        tok = repr(self.current.get("text") or (self.labels[chosen] if chosen >= 0 else "?"))
        used = expl.get("params", {})
        model_p = f"p = {math.exp(self.current.get('logprob', 0)):.3f} under the model"
        if draw is None:
            how = "greedy: the most probable token is taken (temperature → 0)."
            source = "the model's top candidates"
        else:
            model_p += f", {self.base[chosen]:.3f} as sampled" if chosen >= 0 else ""
            now = expl.get("index", 0) if self._as_sampled(T) else pick(cum, draw)
            how = (f"random draw <b>{draw:.3f}</b>; the first running sum above it is candidate {expl.get('index', 0) + 1} "
                   f"of {expl.get('candidates', '?')} after the repetition penalty ({used.get('repetition_penalty', 1.0)}) "
                   f"and filters (T={used.get('temperature')}, top-k {used.get('top_k')}, top-p {used.get('top_p')}, "
                   f"min-p {used.get('min_p')}). At T={T:.2f} the same draw would pick {repr(self.labels[now])}.")
            source = (f"the sampler's candidates (T={self.t_used:g}, penalty and filters applied); "
                      "other temperatures reshape them")
        self.summary.setText(f"Chosen {tok}: {model_p}. {how}")
        rows = "".join(f"<tr><td>{'▶ ' if i == chosen else ''}{_esc(repr(l))}</td><td align=right>{p[i]:.3f}</td>"
                       f"<td align=right>{cum[i]:.3f}</td></tr>" for i, l in enumerate(self.labels))
        self.table.setText("<table width=100% cellspacing=0 cellpadding=2><tr><th align=left>token</th>"
                           f"<th align=right>p</th><th align=right>Σ p</th></tr>{rows}</table>"
                           f"<p style='color:#8b93a5'>bars: top-{len(p)} at T={T:.2f}, {source}; "
                           "line: cumulative sum; dashed: the draw.</p>")


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
