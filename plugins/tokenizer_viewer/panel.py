"""The Tokens panel: colored spans, ids, hover linking, two tokenizers side by side."""
from __future__ import annotations

import bisect
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFrame, QHBoxLayout, QLabel, QLineEdit, QListWidget,
                               QPlainTextEdit, QPushButton, QSpinBox, QSplitter, QTextEdit, QVBoxLayout, QWidget)

from sol.app.kit import page

from .spans import counts, search_vocab, segments, show_whitespace

COLORS = ["#f5a524", "#5aa9e6", "#4cc38a", "#e66ab2", "#a98bf5", "#f07f4f", "#3cc9c4", "#d4cf4a"]
SPECIAL = "#ef5b5b"
UNKNOWN = "#8b93a5"
SAMPLE = ("O Sol disse a Plutão: tokens são pedaços de texto.\n"
          "The Sun told Pluto: tokens are pieces of text. Olá, café, naïve 🌍 — 12*7=84<|endoftext|>")


def background(i: int, special, strong: bool = False) -> QColor:
    c = QColor(UNKNOWN if special == "unknown" else SPECIAL if special else COLORS[i % len(COLORS)])
    c.setAlpha(230 if strong else 70)
    return c


class _Hover(QObject):
    """Reports the document position under the mouse of a QTextEdit (and -1 when it leaves)."""
    moved = Signal(int)

    def __init__(self, edit: QTextEdit):
        super().__init__(edit)
        self.edit = edit
        edit.viewport().setMouseTracking(True)
        edit.viewport().installEventFilter(self)

    def eventFilter(self, obj, ev):
        if ev.type() == QEvent.MouseMove:
            cur = self.edit.cursorForPosition(ev.position().toPoint())
            # cursorForPosition snaps to the nearest gap; the character is the one before or after it.
            rect = self.edit.cursorRect(cur)
            pos = cur.position() - (1 if ev.position().x() < rect.x() else 0)
            self.moved.emit(pos)
        elif ev.type() == QEvent.Leave:
            self.moved.emit(-1)
        return False


class SpanView(QTextEdit):
    """A read-only document of colored runs; each run belongs to one segment."""
    hovered = Signal(int)        # segment index, or -1

    def __init__(self, mono: bool = False):
        super().__init__()
        self.setReadOnly(True)
        self.setLineWrapMode(QTextEdit.WidgetWidth)
        if mono:
            f = QFont("monospace")
            f.setStyleHint(QFont.Monospace)
            self.setFont(f)
        self.starts: list[int] = []
        self.ranges: list[tuple[int, int, int]] = []   # (doc start, doc end, segment index)
        self.lit = -1
        _Hover(self).moved.connect(self._moved)

    def render(self, runs: list[tuple[str, int, bool]], sep: str = ""):
        """runs: (text, segment index, special); a segment index of -1 is uncolored text."""
        self.clear()
        self.ranges, self.lit = [], -1
        cur = QTextCursor(self.document())
        plain = QTextCharFormat()
        for n, (text, seg, special) in enumerate(runs):
            if n and sep:
                cur.insertText(sep, plain)
            start = cur.position()
            fmt = QTextCharFormat()
            if seg >= 0:
                fmt.setBackground(background(seg, special))
                if special == "unknown":
                    fmt.setFontStrikeOut(True)
                elif special:
                    fmt.setFontWeight(QFont.Bold)
            cur.insertText(text, fmt)
            if seg >= 0:
                self.ranges.append((start, cur.position(), seg))
        self.starts = [r[0] for r in self.ranges]

    def segment_at(self, pos: int) -> int:
        i = bisect.bisect_right(self.starts, pos) - 1
        if 0 <= i < len(self.ranges) and self.ranges[i][0] <= pos < self.ranges[i][1]:
            return self.ranges[i][2]
        return -1

    def _moved(self, pos: int):
        self.hovered.emit(self.segment_at(pos) if pos >= 0 else -1)

    def highlight(self, seg: int, special_of):
        """Strong color on the runs of `seg`, normal color back on the previous one."""
        if seg == self.lit:
            return
        for s, strong in ((self.lit, False), (seg, True)):
            if s < 0:
                continue
            for a, b, g in self.ranges:
                if g == s:
                    cur = QTextCursor(self.document())
                    cur.setPosition(a)
                    cur.setPosition(b, QTextCursor.KeepAnchor)
                    fmt = QTextCharFormat()
                    fmt.setBackground(background(s, special_of(s), strong))
                    fmt.setForeground(QColor("#111111" if strong else "#e4e6eb"))
                    cur.mergeCharFormat(fmt)
        self.lit = seg


class TokenizerColumn(QFrame):
    """One tokenizer: choose it, see the spans, the ids and the counts."""
    changed = Signal()

    def __init__(self, panel: "TokenizerPanel", label: str):
        super().__init__()
        self.setObjectName("card")
        self.panel = panel
        self.tokenizer = None
        self.segs = []
        lay = QVBoxLayout(self)
        lay.setContentsMargins(14, 12, 14, 12)
        top = QHBoxLayout()
        name = QLabel(label)
        name.setObjectName("h2")
        top.addWidget(name)
        self.source = QComboBox()
        self.source.setMinimumWidth(220)
        top.addWidget(self.source, 1)
        lay.addLayout(top)
        self.counts = QLabel()
        self.counts.setObjectName("stat")
        lay.addWidget(self.counts)
        self.text_view = SpanView()
        self.ids_view = SpanView(mono=True)
        lay.addWidget(self.text_view, 3)
        ids_label = QLabel("ids")
        ids_label.setObjectName("muted")
        lay.addWidget(ids_label)
        lay.addWidget(self.ids_view, 2)
        self.info = QLabel(" ")
        self.info.setObjectName("stat")
        self.info.setWordWrap(True)
        lay.addWidget(self.info)
        self.text_view.hovered.connect(self.hover)
        self.ids_view.hovered.connect(self.hover)
        self.source.currentIndexChanged.connect(self._source_changed)

    def _source_changed(self, _):
        self.panel.select(self, self.source.currentData())

    def set_tokenizer(self, tok):
        self.tokenizer = tok
        self.update_view()

    def update_view(self):
        text, ws = self.panel.text(), self.panel.whitespace.isChecked()
        if self.tokenizer is None:
            self.text_view.setPlainText("(no tokenizer: load a model, or train one below)")
            self.ids_view.clear()
            self.counts.setText("")
            return
        self.segs = segments(self.tokenizer, text)
        kind = lambda s: "unknown" if s.unknown else s.special  # noqa: E731
        shown = [(show_whitespace(s.text) if ws else s.text, i if not s.is_gap else -1, kind(s))
                 for i, s in enumerate(self.segs)]
        self.text_view.render(shown)
        ids = [(" ".join(map(str, s.ids)), i, kind(s)) for i, s in enumerate(self.segs) if not s.is_gap]
        self.ids_view.render(ids, sep=" ")
        c = counts(self.tokenizer, text, self.segs)
        self.counts.setText(f"{c['tokens']} tokens · {c['characters']} characters · {c['words']} words · "
                            f"{c['chars_per_token']} characters per token · vocabulary {self.tokenizer.vocab_size:,}"
                            + (f" · {c['unknown']} unknown (struck out)" if c["unknown"] else ""))

    def hover(self, seg: int):
        special = lambda s: 0 <= s < len(self.segs) and ("unknown" if self.segs[s].unknown  # noqa: E731
                                                           else self.segs[s].special)
        self.text_view.highlight(seg, special)
        self.ids_view.highlight(seg, special)
        if 0 <= seg < len(self.segs):
            s = self.segs[seg]
            parts = ", ".join(f"{i} {p!r}" for i, p in zip(s.ids, s.pieces))
            extra = f" — one character split over {len(s.ids)} tokens" if len(s.ids) > 1 else ""
            note = "  (special)" if s.special else "  (not in the vocabulary: encoded as the unknown token)" \
                if s.unknown else ""
            self.info.setText(f"{show_whitespace(s.text)!r}: {parts}{extra}{note}")


class TokenizerPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.sources: dict[str, object] = {}    # key -> Tokenizer, filled lazily
        self._ready = False
        lay = page(self, "Tokens", "How a text becomes the numbers a model reads. Hover a token to see it in "
                                   "both views.")

        self.input = QPlainTextEdit(SAMPLE)
        self.input.setFixedHeight(84)
        lay.addWidget(self.input)
        opts = QHBoxLayout()
        self.whitespace = QCheckBox("show whitespace")
        self.compare = QCheckBox("compare two tokenizers")
        opts.addWidget(self.whitespace)
        opts.addWidget(self.compare)
        opts.addStretch(1)
        lay.addLayout(opts)

        split = QSplitter(Qt.Horizontal)
        self.a = TokenizerColumn(self, "A")
        self.b = TokenizerColumn(self, "B")
        split.addWidget(self.a)
        split.addWidget(self.b)
        self.b.hide()
        lay.addWidget(split, 1)
        lay.addWidget(self._tools())

        self._debounce = QTimer(self, singleShot=True, interval=150)
        self._debounce.timeout.connect(self.update_views)
        self.input.textChanged.connect(self._debounce.start)
        self.whitespace.toggled.connect(self.update_views)
        self.compare.toggled.connect(self.b.setVisible)
        ctx.model_changed.connect(lambda _: self.refresh_sources())
        self.refresh_sources()

    def _tools(self) -> QWidget:
        box = QFrame()
        box.setObjectName("card")
        row = QHBoxLayout(box)
        row.setContentsMargins(14, 10, 14, 10)
        col = QVBoxLayout()
        col.addWidget(QLabel("Vocabulary search (tokenizer A)"))
        self.search = QLineEdit()
        self.search.setPlaceholderText("a piece of a token, e.g. ção or the")
        self.results = QListWidget()
        self.results.setMaximumHeight(120)
        col.addWidget(self.search)
        col.addWidget(self.results)
        row.addLayout(col, 2)
        col2 = QVBoxLayout()
        col2.addWidget(QLabel("Train a tokenizer from a text file"))
        line = QHBoxLayout()
        self.kind = QComboBox()
        self.kind.addItems(["byte-level BPE", "characters"])
        self.vocab = QSpinBox()
        self.vocab.setRange(260, 200_000)
        self.vocab.setValue(1000)
        self.vocab.setPrefix("vocab ")
        self.train_btn = QPushButton("Choose file and train…")
        line.addWidget(self.kind)
        line.addWidget(self.vocab)
        line.addWidget(self.train_btn)
        col2.addLayout(line)
        self.train_status = QLabel("The trained tokenizer appears in the A/B lists.")
        self.train_status.setObjectName("muted")
        self.train_status.setWordWrap(True)
        col2.addWidget(self.train_status)
        col2.addStretch(1)
        row.addLayout(col2, 2)
        self.search.textChanged.connect(self.search_vocab)
        self.train_btn.clicked.connect(self.train_clicked)
        self.kind.currentIndexChanged.connect(lambda i: self.vocab.setEnabled(i == 0))
        return box

    # ---- tokenizers --------------------------------------------------------
    def text(self) -> str:
        return self.input.toPlainText()

    def is_ready(self) -> bool:
        return self._ready

    def refresh_sources(self):
        from sol.core.formats.registry import list_models
        self.ctx.run(list_models, on_done=self._fill_sources, on_error=lambda e: self._fill_sources([]))

    def _fill_sources(self, models):
        entries = []
        if self.ctx.tokenizer is not None:
            self.sources["loaded"] = self.ctx.tokenizer
            entries.append((f"loaded model ({self.ctx.loaded.name})", "loaded"))
        for m in models:
            entries.append((m["name"], m["path"]))
        entries += [(k.split(":", 1)[1], k) for k in self.sources if k.startswith("trained:")]
        entries.append(("open tokenizer.json or GGUF…", "open"))
        for i, col in enumerate((self.a, self.b)):
            col.source.blockSignals(True)
            col.source.clear()
            for label, key in entries:
                col.source.addItem(label, key)
            pick = min(i, len(entries) - 2) if len(entries) > 1 else 0
            col.source.setCurrentIndex(pick)
            col.source.blockSignals(False)
            self.select(col, col.source.currentData())
        self._ready = True

    def select(self, col: TokenizerColumn, key):
        if key == "open":
            path, _ = QFileDialog.getOpenFileName(self, "A tokenizer", "", "tokenizer.json or GGUF model (*.json *.gguf)")
            key = path or None
        if not key:
            col.set_tokenizer(None)
            return
        if key not in self.sources:
            from sol.core.formats.checkpoint import load_tokenizer
            try:
                self.sources[key] = load_tokenizer(key)
            except Exception as e:
                col.set_tokenizer(None)
                col.info.setText(str(e))
                return
        col.set_tokenizer(self.sources[key])

    def update_views(self):
        self.a.update_view()
        if self.b.isVisible() or self.compare.isChecked():
            self.b.update_view()

    # ---- vocabulary and training -------------------------------------------
    def search_vocab(self, q: str):
        self.results.clear()
        if not q or self.a.tokenizer is None:
            return
        for i, tok, dec in search_vocab(self.a.tokenizer, q, 300):
            self.results.addItem(f"{i:>6}   {tok!r:<24} → {dec!r}")

    def train_clicked(self):
        path, _ = QFileDialog.getOpenFileName(self, "Text to train on", "", "Text (*.txt *.md);;All (*)")
        if path:
            self.train_from(path)

    def train_from(self, path: str):
        from sol.core.formats.tokenizer import train_bpe, train_char
        bpe = self.kind.currentIndex() == 0
        n = self.vocab.value()
        label = f"trained:{Path(path).name} ({'bpe ' + str(n) if bpe else 'chars'})"
        self.train_status.setText(f"training on {path} …")
        fn = (lambda: train_bpe([path], n)) if bpe else (lambda: train_char([path]))

        def done(tok):
            self.sources[label] = tok
            self.train_status.setText(f"trained {label.split(':', 1)[1]}: {tok.vocab_size:,} tokens")
            self.refresh_sources()

        self.ctx.run(fn, on_done=done, on_error=lambda e: self.train_status.setText(f"training failed: {e}"))
