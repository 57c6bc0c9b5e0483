"""Widgets every panel builds the same way. Public for plugin panels: `from sol.app.kit import page, table,
answer_markdown, sampling_controls`
(the rest of `sol.app` may change; this module keeps its names).

A page is the panel's column: its title, a one-line hint under it, then whatever the panel adds.
A table is read-only, one selected row at a time, columns sized to their contents."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QTableWidget, QVBoxLayout, QWidget


def page(panel: QWidget, title: str, hint: str = "", spacing: int = 10) -> QVBoxLayout:
    """Give `panel` Sol's panel margins, a title and a hint; returns the layout to add to."""
    lay = QVBoxLayout(panel)
    lay.setContentsMargins(24, 20, 24, 20)
    lay.setSpacing(spacing)
    head = QLabel(title)
    head.setObjectName("h1")
    lay.addWidget(head)
    if hint:
        note = QLabel(hint)
        note.setObjectName("muted")
        note.setWordWrap(True)
        lay.addWidget(note)
    return lay


def table(columns: list[str]) -> QTableWidget:
    """A read-only table that selects whole rows, one at a time."""
    t = QTableWidget(0, len(columns))
    t.setHorizontalHeaderLabels(columns)
    t.setSelectionBehavior(QAbstractItemView.SelectRows)
    t.setSelectionMode(QAbstractItemView.SingleSelection)
    t.setEditTriggers(QAbstractItemView.NoEditTriggers)
    t.verticalHeader().hide()
    t.setAlternatingRowColors(True)
    t.setShowGrid(False)
    t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
    t.horizontalHeader().setStretchLastSection(True)
    # Headers sit over their cells' text (left), not centred over a stretched last column.
    t.horizontalHeader().setDefaultAlignment(Qt.AlignLeft | Qt.AlignVCenter)
    return t


def answer_markdown(text: str) -> str:
    """A model's answer as Markdown for QTextBrowser.setMarkdown, shown as the model wrote it: raw HTML (`<div>`,
    `List<String>`, `<unused1>`) stays text, and its line breaks stay breaks."""
    from .chat.markdown import escape_html
    from .chat.messages import keep_newlines
    return keep_newlines(escape_html(text))


def child_process(parent, argv: list[str], on_stdout, on_stderr, on_finished, on_error):
    """A QProcess (not started) for a long `sol` command a panel runs, such as `sol train` or `sol eval`: a
    little nicer than the window, so on a busy CPU the GUI is served first (an idle CPU still gives the
    child all it wants). `nice` execs the command, so its pid and a SIGTERM on Stop or Cancel are the
    command's own."""
    import os
    import shutil

    from PySide6.QtCore import QProcess
    nice = shutil.which("nice") if os.name == "posix" else None
    argv = [nice, "-n", "5", *argv] if nice else argv
    proc = QProcess(parent)
    proc.setProgram(argv[0])
    proc.setArguments(argv[1:])
    proc.readyReadStandardOutput.connect(on_stdout)
    proc.readyReadStandardError.connect(on_stderr)
    proc.finished.connect(on_finished)
    proc.errorOccurred.connect(on_error)
    return proc


def sampling_controls(saved: dict | None = None):
    """The chat's sampling controls (temperature, top-k, top-p, min-p, repetition penalty, max tokens, seed):
    `.generation_params()` gives a GenerationParams, `.values()` a dict to keep with context.set_setting."""
    from .chat.params import ParamsView
    return ParamsView(saved)
