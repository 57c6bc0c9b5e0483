"""The Score panel: two sentences, each token colored by its probability given the ones before it."""
from __future__ import annotations

import html
import math

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QPushButton, QTableWidgetItem, QVBoxLayout, QWidget

from sol.app.kit import page, table
from sol.core.introspect.score import score

SAMPLES = ("The king is dead, long live the king.", "The king is bread, long live the sing.")


def prob_color(p: float | None) -> QColor:
    """Red (unlikely) through amber to green (likely), on a log scale: 1e-4 and below is fully red."""
    if p is None:
        return QColor("#3a3f4b")
    t = min(1.0, max(0.0, 1 + math.log10(max(p, 1e-12)) / 4))
    return QColor.fromHsvF(0.33 * t, 0.75, 0.85)


def shown(s: str) -> str:
    return s.replace("\n", "↵")


class Column(QWidget):
    """One sentence: its input, the colored tokens, totals, and a row per token."""

    def __init__(self, name: str, text: str):
        super().__init__()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.input = QLineEdit(text)
        self.input.setPlaceholderText(f"sentence {name}")
        self.tokens = QLabel()
        self.tokens.setTextFormat(Qt.RichText)
        self.tokens.setWordWrap(True)
        self.tokens.setMinimumHeight(48)
        self.totals = QLabel()
        self.totals.setObjectName("stat")
        self.table = table(["token", "p", "log p", "running log p", "rank", "top 5 instead"])
        for w in (self.input, self.tokens, self.totals):
            lay.addWidget(w)
        lay.addWidget(self.table, 1)
        self.result: dict | None = None

    def display(self, out: dict) -> None:
        self.result = out
        spans = []
        for t in out["tokens"]:
            c = prob_color(t["prob"])
            tip = "not scored" if t["prob"] is None else f"p = {t['prob']:.4g}"
            spans.append(f'<span style="background:{c.name()};color:#111" title="{tip}">'
                         f'{html.escape(shown(t["text"])).replace(" ", "&nbsp;")}</span>')
        self.tokens.setText('<span style="font-size:15px">' + "".join(spans) + "</span>")
        cond = (f"after {out['conditioned_on']!r}" if out["conditioned_on"] is not None
                else "the first token has nothing before it and is not scored")
        if out["n_scored"]:
            self.totals.setText(f"P = e^{out['total_logprob']:.2f} = {math.exp(out['total_logprob']):.3g} · "
                                f"Σ log p = {out['total_logprob']:.3f} over {out['n_scored']} tokens · "
                                f"perplexity {out['perplexity']:.2f} · {cond}")
        else:
            self.totals.setText(f"nothing scored · {cond}")
        self.table.setRowCount(len(out["tokens"]))
        for r, t in enumerate(out["tokens"]):
            scored = t["logprob"] is not None
            cells = [repr(t["text"]), f"{t['prob']:.4f}" if scored else "—",
                     f"{t['logprob']:.3f}" if scored else "—", f"{t['cum_logprob']:.3f}" if scored else "—",
                     str(t["rank"]) if scored else "—",
                     "  ".join(f"{a['text']!r} {math.exp(a['logprob']):.2f}" for a in t["top"])]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col == 1:
                    item.setBackground(prob_color(t["prob"]))
                    item.setForeground(QColor("#111"))
                self.table.setItem(r, col, item)


class ScorePanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self._busy = 0
        self._asked = 0
        lay = page(self, "Score a sentence",
                   "The chain rule (§2.9): a sentence's probability is the product of each token's probability "
                   "given the ones before it. Green is likely, red unlikely. Which sentence does the model prefer?")
        row = QHBoxLayout()
        self.a, self.b = Column("A", SAMPLES[0]), Column("B", SAMPLES[1])
        row.addWidget(self.a, 1)
        row.addWidget(self.b, 1)
        ctl = QHBoxLayout()
        self.run_btn = QPushButton("Score both")
        self.run_btn.setObjectName("primary")
        self.verdict = QLabel()
        self.verdict.setObjectName("stat")
        ctl.addWidget(self.run_btn)
        ctl.addWidget(self.verdict, 1)
        lay.addLayout(ctl)
        lay.addLayout(row, 1)
        self.run_btn.clicked.connect(self.run)
        for c in (self.a, self.b):
            c.input.returnPressed.connect(self.run)
        ctx.model_changed.connect(self._on_model)
        self._on_model(ctx.loaded)

    def is_ready(self) -> bool:
        return self._busy == 0

    def _on_model(self, loaded):
        self.run_btn.setEnabled(loaded is not None)
        if loaded is None:
            self.verdict.setText("Load a model (Models panel) to score sentences.")
            return
        self.run()

    def run(self):
        loaded = self.ctx.loaded
        if loaded is None:
            return
        self._asked += 1
        asked = self._asked
        for col in (self.a, self.b):
            text = col.input.text()
            if not text:
                col.result = None
                continue
            self._busy += 1
            self.ctx.run(score, loaded, text, on_done=lambda out, col=col: self._done(col, out, asked),
                         on_error=self._failed)

    def _done(self, col: Column, out: dict, asked: int):
        self._busy -= 1
        if asked != self._asked:   # an older request (another text, another model) finished late
            return
        col.display(out)
        self._compare()

    def _failed(self, e):
        self._busy -= 1
        self.verdict.setText(f"error: {e}")

    def _compare(self):
        a, b = self.a.result, self.b.result
        if not (a and b and a["n_scored"] and b["n_scored"]):
            return
        d = a["total_logprob"] - b["total_logprob"]
        more, less = ("A", "B") if d >= 0 else ("B", "A")
        self.verdict.setText(f"{more} is more likely than {less}: Δ Σ log p = {abs(d):.3f}, "
                             f"about {math.exp(min(abs(d), 700)):.3g} times")
