"""Get models: search the Hugging Face Hub for models Sol can run, download them, load them.

The search and the fit marks run off the GUI thread (core/hub); downloads go to the app's queue
(ctx.downloads, app/downloads.py), which outlives this view.
"""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QComboBox, QHBoxLayout, QInputDialog, QLabel, QLineEdit, QProgressBar, QPushButton,
                               QTableWidgetItem, QWidget)

from .kit import page, table

RESULT_COLUMNS = ["Repository", "Family", "Parameters", "Format", "Quantizations", "Size", "This machine",
                  "Downloads", "Likes"]
QUEUE_COLUMNS = ["Model", "Progress", "", ""]
GOOD, BAD = QColor("#7fc97f"), QColor("#e08a7a")


def search_and_fit(query: str, fmt: str | None, device) -> list[dict]:
    """core/hub's search, each entry with "fit": {file choice: why it will not fit, or None}."""
    from sol.core.hub.catalog import search
    from sol.core.hub.fit import rough
    found = search(query, fmt)
    for e in found:
        e["fit"] = {label: rough(files, device) for label, files in choices(e)}
    return found


def choices(entry: dict) -> list[tuple[str, list[dict]]]:
    """What can be downloaded from a repository: each GGUF file Sol reads, or a folder's files together."""
    if not entry["loadable"]:
        return []
    if entry["format"] == "gguf":
        return [(f["name"], [f]) for f in entry["files"] if f["why_not"] is None]
    return [("", entry["files"])]


def params_text(n) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


class GetModelsPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.queue = ctx.downloads
        self.results: list[dict] = []
        self.rows: dict[int, int] = {}        # id(Download) -> its row in the queue table
        self.searching = False
        lay = page(self, "Get models", "Models on the Hugging Face Hub that Sol can run. They download into the "
                   "Hugging Face cache, which transformers, llama.cpp and Sol share, and appear under Models.",
                   spacing=10)

        bar = QHBoxLayout()
        self.query = QLineEdit()
        self.query.setPlaceholderText("search the Hub: qwen2.5 0.5b instruct, llama 3.2 1b gguf, …")
        self.kind = QComboBox()
        for label, value in (("GGUF and safetensors", None), ("GGUF", "gguf"), ("safetensors", "safetensors")):
            self.kind.addItem(label, value)
        self.search_btn = QPushButton("Search")
        self.search_btn.setObjectName("primary")
        bar.addWidget(self.query, 1)
        bar.addWidget(self.kind)
        bar.addWidget(self.search_btn)
        lay.addLayout(bar)
        self.note = QLabel("")
        self.note.setObjectName("muted")
        self.note.setWordWrap(True)
        lay.addWidget(self.note)

        self.table = table(RESULT_COLUMNS)
        lay.addWidget(self.table, 3)

        pick = QHBoxLayout()
        self.file = QComboBox()
        self.file.setMinimumWidth(320)
        self.download_btn = QPushButton("Download")
        self.download_btn.setObjectName("primary")
        self.download_btn.setEnabled(False)
        self.why = QLabel("")
        self.why.setObjectName("muted")
        pick.addWidget(QLabel("File:"))
        pick.addWidget(self.file)
        pick.addWidget(self.download_btn)
        pick.addWidget(self.why, 1)
        lay.addLayout(pick)

        title = QLabel("Downloads")
        title.setObjectName("h2")
        lay.addWidget(title)
        self.downloads = table(QUEUE_COLUMNS)
        self.downloads.setSelectionMode(self.downloads.SelectionMode.NoSelection)
        head = self.downloads.horizontalHeader()   # the status text takes the room; bar and buttons keep theirs
        head.setStretchLastSection(False)
        head.setSectionResizeMode(1, head.ResizeMode.Fixed)
        head.setSectionResizeMode(2, head.ResizeMode.Stretch)
        self.downloads.setColumnWidth(1, 180)
        lay.addWidget(self.downloads, 2)

        self.query.returnPressed.connect(self.search)
        self.search_btn.clicked.connect(self.search)
        self.table.itemSelectionChanged.connect(self._picked)
        self.download_btn.clicked.connect(self.download_selected)
        self.queue.added.connect(self._add_row)
        self.queue.changed.connect(self._show)
        for item in self.queue.items:        # downloads started before this view was built
            self._add_row(item)

    def is_ready(self) -> bool:
        return not self.searching

    # ---- search ------------------------------------------------------------------------------
    def search(self) -> None:
        if self.searching:
            return
        self.searching = True
        self.search_btn.setEnabled(False)
        self.note.setText(f"searching {self.query.text().strip() or 'everything'} …")
        self.ctx.run(search_and_fit, self.query.text().strip(), self.kind.currentData(), self.ctx.device,
                     on_done=self._fill, on_error=self._search_failed)

    def _search_failed(self, e) -> None:
        self.searching = False
        self.search_btn.setEnabled(True)
        self.note.setText(str(e))

    def _fill(self, found: list[dict]) -> None:
        from sol.core.hub.fit import size_text
        self.searching = False
        self.search_btn.setEnabled(True)
        self.results = found
        usable = sum(e["loadable"] for e in found)
        self.note.setText(f"{len(found)} repositories, {usable} that Sol can run" if found else "nothing found")
        self.table.setRowCount(len(found))
        for r, e in enumerate(found):
            quants = ", ".join(f["quant"] or "?" for f in e["files"] if f["why_not"] is None) \
                if e["format"] == "gguf" else "—"
            sizes = [f["size"] or 0 for f in e["files"] if f["why_not"] is None]
            if e["format"] == "gguf":
                size = f"{size_text(min(sizes))} – {size_text(max(sizes))}" if len(sizes) > 1 else \
                    size_text(sizes[0]) if sizes else "?"
            else:
                size = size_text(sum(sizes))
            fit, color, tip = self._fit_mark(e)
            cells = [e["repo"] + ("  (gated)" if e["gated"] else ""), e["family"] or "?", params_text(e["parameters"]),
                     e["format"] or "?", quants, size, fit, f"{e['downloads'] or 0:,}", f"{e['likes'] or 0:,}"]
            for c, v in enumerate(cells):
                item = QTableWidgetItem(v)
                if c == 6:
                    item.setForeground(color)
                    item.setToolTip(tip)
                if c in (2, 5, 7, 8):
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                if e["gated"] and c == 0:
                    item.setToolTip("Gated: accept its licence on the Hub and give a token to download it")
                self.table.setItem(r, c, item)
        if found:
            self.table.selectRow(0)

    @staticmethod
    def _fit_mark(e: dict) -> tuple[str, QColor, str]:
        if not e["loadable"]:
            return "✗ Sol cannot run it", BAD, e["why_not"] or ""
        fits = [label for label, why in e["fit"].items() if why is None]
        if fits:
            return "✓ fits", GOOD, "Its files fit the disk and its weights the memory (get checks the KV cache too)"
        why = next(iter(e["fit"].values()), "")
        return f"✗ too big: {why}", BAD, why

    def selected(self) -> dict | None:
        rows = self.table.selectionModel().selectedRows()
        return self.results[rows[0].row()] if rows else None

    def _picked(self) -> None:
        from sol.core.hub.fit import size_text
        e = self.selected()
        self.file.clear()
        if e is None:
            return
        for label, files in choices(e):
            size = size_text(sum(f["size"] or 0 for f in files))
            why = e["fit"].get(label)
            text = f"{label}  ·  {size}" if label else f"all {len(files)} files it needs  ·  {size}"
            self.file.addItem(text + (f"  ·  ✗ {why}" if why else ""), label)
        if e["format"] == "gguf":   # the usual choice first: Q4_K_M where there is one, else the smallest
            from sol.core.hub.catalog import DEFAULT_QUANT
            at = next((i for i, (label, files) in enumerate(choices(e)) if files[0]["quant"] == DEFAULT_QUANT), 0)
            self.file.setCurrentIndex(at)
        self.download_btn.setEnabled(bool(e["loadable"]))
        self.why.setText("" if e["loadable"] else f"Sol cannot run it: {e['why_not']}")

    def download_selected(self) -> None:
        e = self.selected()
        if e is None or not e["loadable"]:
            return
        self.queue.add(e["repo"], self.file.currentData() or None)

    # ---- the queue -----------------------------------------------------------------------------
    def _add_row(self, item) -> None:
        r = self.downloads.rowCount()
        self.downloads.insertRow(r)
        self.rows[id(item)] = r
        self.downloads.setItem(r, 0, QTableWidgetItem(item.label))
        bar = QProgressBar()
        bar.setRange(0, 1000)
        self.downloads.setCellWidget(r, 1, bar)
        self.downloads.setItem(r, 2, QTableWidgetItem(""))
        buttons = QWidget()
        bl = QHBoxLayout(buttons)
        bl.setContentsMargins(0, 0, 0, 0)
        cancel, load, token = QPushButton("Cancel"), QPushButton("Load"), QPushButton("Token…")
        load.setObjectName("primary")
        cancel.clicked.connect(lambda: self.queue.cancel(item))
        load.clicked.connect(lambda: self.ctx.load_model(item.result["path"]))
        token.clicked.connect(lambda: self.ask_token(item))
        for b in (cancel, load, token):
            bl.addWidget(b)
        buttons.cancel, buttons.load, buttons.token = cancel, load, token
        self.downloads.setCellWidget(r, 3, buttons)
        self._show(item)

    def row_widgets(self, item) -> tuple[QProgressBar, QWidget]:
        r = self.rows[id(item)]
        return self.downloads.cellWidget(r, 1), self.downloads.cellWidget(r, 3)

    def _show(self, item) -> None:
        if id(item) not in self.rows:
            return
        bar, buttons = self.row_widgets(item)
        bar.setValue(round(item.fraction * bar.maximum()))
        text = item.error if item.state in ("failed", "gated") else item.text
        bar.setFormat(f"{int(item.fraction * 100)}%")
        status = self.downloads.item(self.rows[id(item)], 2)
        status.setText(text)
        status.setToolTip(text)
        buttons.cancel.setVisible(item.state in ("queued", "running"))
        buttons.load.setVisible(item.state == "done")
        buttons.token.setVisible(item.state == "gated")
        if item.state == "gated" and self.isVisible():
            self.ask_token(item)

    def ask_token(self, item) -> None:
        """A gated repository: where to accept its licence, and a token to download it with."""
        from sol.core.hub.client import endpoint
        text, ok = QInputDialog.getText(
            self, "Gated model",
            f"{item.repo} is gated. Accept its licence at\n{item.gate_url}\n(signed in to the Hub), then paste an "
            f"access token from {endpoint()}/settings/tokens:", QLineEdit.Password)
        if ok and text.strip():
            self.queue.retry(item, text.strip())
