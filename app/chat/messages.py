"""One message on screen: a user bubble, an assistant answer (Markdown, or its clickable tokens),
a tool call card. Widgets only draw and emit signals; the chat panel decides what happens."""
from __future__ import annotations

import json

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QColor, QGuiApplication, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QSizePolicy, QTextBrowser,
                               QToolButton, QVBoxLayout, QWidget)

from sol.core.chat.markup import without_calls

from .markdown import escape_html


class AutoText(QTextBrowser):
    """A QTextBrowser as tall as its content, so messages stack in one scrolling column."""

    def __init__(self):
        super().__init__()
        self.setOpenExternalLinks(True)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setMinimumWidth(120)
        self.document().setDocumentMargin(2)
        self.document().contentsChanged.connect(self._fit)

    def _fit(self):
        self.document().setTextWidth(self.viewport().width())
        overhead = self.height() - self.viewport().height()    # frame and stylesheet padding
        self.setFixedHeight(int(self.document().size().height()) + max(0, overhead) + 2)

    def resizeEvent(self, e):
        super().resizeEvent(e)
        self._fit()


def keep_newlines(text: str) -> str:
    """Markdown joins single newlines into one paragraph; a model's line breaks matter (verse, lists,
    code), so make them hard breaks everywhere except inside fenced code blocks."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append(line)
        else:
            out.append(line if fenced or not line.strip() else line + "  ")
    return "\n".join(out)


def _button(text: str, tip: str) -> QToolButton:
    b = QToolButton()
    b.setText(text)
    b.setToolTip(tip)
    b.setObjectName("link")
    return b


class Bubble(QFrame):
    copy_requested = Signal(str)

    def __init__(self, role: str, text: str = "", message_id: int | None = None):
        super().__init__()
        self.role = role
        self.message_id = message_id
        self.text = text
        self.setObjectName({"user": "bubbleUser", "assistant": "bubbleAssistant"}.get(role, "bubbleSystem"))
        self.lay = QVBoxLayout(self)
        self.lay.setContentsMargins(14, 10, 14, 8)
        self.lay.setSpacing(4)
        head = QHBoxLayout()
        self.role_label = QLabel({"user": "You", "assistant": "Sol"}.get(role, role.capitalize()))
        self.role_label.setObjectName("role")
        head.addWidget(self.role_label)
        head.addStretch(1)
        self.branch_prev = _button("‹", "previous version")
        self.branch_label = QLabel()
        self.branch_label.setObjectName("stat")
        self.branch_next = _button("›", "next version")
        for w in (self.branch_prev, self.branch_label, self.branch_next):
            w.hide()
            head.addWidget(w)
        self.lay.addLayout(head)
        self.body = AutoText()
        self.lay.addWidget(self.body)
        self.footer = QHBoxLayout()
        self.stats = QLabel()
        self.stats.setObjectName("stat")
        self.footer.addWidget(self.stats)
        self.footer.addStretch(1)
        self.copy_btn = _button("Copy", "copy this message")
        self.copy_btn.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.copy_text()))
        self.footer.addWidget(self.copy_btn)
        self.lay.addLayout(self.footer)
        self.set_text(text)

    def copy_text(self) -> str:
        return self.text

    def set_text(self, text: str):
        self.text = text
        if self.role == "assistant":
            self.body.setMarkdown(keep_newlines(escape_html(text)))
        else:
            self.body.setPlainText(text)

    def reset(self, text: str = "", message_id: int | None = None):
        """Show another message in this widget (the chat panel reuses bubbles; building one costs
        milliseconds of GUI time per answer)."""
        self.message_id = message_id
        self.stats.clear()
        self.set_branches(0, 1)
        self.set_text(text)

    def set_branches(self, index: int, total: int):
        show = total > 1
        for w in (self.branch_prev, self.branch_label, self.branch_next):
            w.setVisible(show)
        self.branch_label.setText(f"{index + 1}/{total}")
        self.branch_prev.setEnabled(index > 0)
        self.branch_next.setEnabled(index < total - 1)


class UserBubble(Bubble):
    edit_submitted = Signal(int, str)       # message id, new text

    def __init__(self, text: str, message_id: int | None = None):
        super().__init__("user", text, message_id)
        self.edit_btn = _button("Edit", "edit and resend (the old version stays as a branch)")
        self.footer.insertWidget(2, self.edit_btn)
        self.editor = QPlainTextEdit()
        self.editor.hide()
        self.lay.insertWidget(2, self.editor)
        row = QHBoxLayout()
        self.send_edit = QPushButton("Send")
        self.send_edit.setObjectName("primary")
        self.cancel_edit = QPushButton("Cancel")
        row.addStretch(1)
        row.addWidget(self.cancel_edit)
        row.addWidget(self.send_edit)
        self.edit_row = QWidget()
        self.edit_row.setLayout(row)
        self.edit_row.hide()
        self.lay.insertWidget(3, self.edit_row)
        self.edit_btn.clicked.connect(self.start_edit)
        self.cancel_edit.clicked.connect(lambda: self._editing(False))
        self.send_edit.clicked.connect(self._submit)

    def reset(self, text: str = "", message_id: int | None = None):
        self._editing(False)
        super().reset(text, message_id)

    def start_edit(self):
        self.editor.setPlainText(self.text)
        self._editing(True)

    def _editing(self, on: bool):
        self.editor.setVisible(on)
        self.edit_row.setVisible(on)
        self.body.setVisible(not on)

    def _submit(self):
        text = self.editor.toPlainText().strip()
        if text and self.message_id is not None:
            self._editing(False)
            self.edit_submitted.emit(self.message_id, text)


class AnswerBubble(Bubble):
    """An assistant answer. Streams text in; keeps every token event for the explanation view. Its tool calls
    are shown as cards, not as the model's markup (the tokens view still shows every token of them)."""
    token_clicked = Signal(dict)
    streaming = token_mode = False   # until __init__ sets them: Bubble.__init__ renders the text first
    shown = None

    def __init__(self, text: str = "", message_id: int | None = None):
        super().__init__("assistant", text, message_id)
        self.tokens: list[dict] = []
        self.ranges: list[tuple[int, int, int]] = []
        self.streaming = False
        self.shown = None               # while streaming: how much of the answer the body shows as plain text
        self.token_mode = False
        self.tokens_btn = _button("▦ tokens", "show the tokens; click one to see why it was chosen")
        self.tokens_btn.setCheckable(True)
        self.tokens_btn.toggled.connect(self.set_token_mode)
        self.tokens_btn.setVisible(False)
        self.footer.insertWidget(2, self.tokens_btn)

    def reset(self, text: str = "", message_id: int | None = None):
        self.tokens = []
        self.ranges = []
        self.streaming = False
        self.shown = None
        if self.token_mode:
            self.body.viewport().removeEventFilter(self)
        self.token_mode = False
        self.tokens_btn.blockSignals(True)     # token_mode is already off; no render of the old tokens
        self.tokens_btn.setChecked(False)
        self.tokens_btn.blockSignals(False)
        self.tokens_btn.setVisible(False)
        super().reset(text, message_id)

    def add_token(self, ev: dict):
        if ev.get("forced"):
            return                          # a tool result: shown in its card
        self.tokens.append(ev)
        self.text += ev.get("text", "")
        if len(self.tokens) == 1:
            self.tokens_btn.setVisible(True)

    def set_tokens(self, tokens: list[dict]):
        """A stored answer's tokens (from the store's trace), so they can be clicked after a restart."""
        self.tokens = [t for t in tokens if not t.get("forced")]
        self.tokens_btn.setVisible(bool(self.tokens))

    def set_text(self, text: str):
        self.text = text
        self.render()

    def shown_text(self) -> str:
        """The answer without its tool calls' markup (a stored answer, or one that has finished)."""
        return without_calls(self.text).strip()

    def copy_text(self) -> str:
        return self.shown_text() or self.text   # what is shown; an answer that is only a call, as written

    def render(self):
        # An answer that is only a tool call shows no text: its card follows it.
        self.body.setVisible(self.token_mode or self.streaming or not self.text or bool(self.shown_text()))
        if self.token_mode:
            self._render_tokens()
        elif self.streaming and self.text:
            self._append_plain()
        else:
            self.shown = None
            text = self.shown_text()
            self.body.setMarkdown(keep_newlines(escape_html(text)) if text else "…")

    def _append_plain(self):
        """While streaming, add only the new text, as plain text: re-rendering the whole answer as
        Markdown every frame costs more the longer it gets, and re-lays out and repaints all of it.
        finish() renders the Markdown once. A tool call's markup is held back as it streams in."""
        text = without_calls(self.text, streaming=True)
        if not text:   # so far only (the start of) a tool call
            self.body.setPlainText("…")
            self.shown = None
            return
        if self.shown is None or len(text) < self.shown:
            self.body.setPlainText(text)
        elif len(text) > self.shown:
            cur = QTextCursor(self.body.document())
            cur.movePosition(QTextCursor.End)
            cur.insertText(text[self.shown:])
        self.shown = len(text)

    def finish(self, ev: dict):
        self.message_id = ev.get("id")
        self.text = ev.get("content", self.text)
        self.streaming = False
        n = ev.get("completion_tokens") or len(self.tokens)
        parts = [f"{n} tokens", f"prompt {ev.get('prompt_tokens', 0)}"]
        if ev.get("tokens_per_s"):
            parts.append(f"{ev['tokens_per_s']:.1f} tok/s")
        if ev.get("time_to_first_token_s"):
            parts.append(f"first token {ev['time_to_first_token_s'] * 1000:.0f} ms")
        self.stats.setText(" · ".join(parts))
        self.render()

    def set_token_mode(self, on: bool):
        # Clicks are read from the viewport only in token mode: a Python event filter there would
        # run for every event the answer gets (each repaint while streaming).
        if on and not self.token_mode:
            self.body.viewport().installEventFilter(self)
        elif not on and self.token_mode:
            self.body.viewport().removeEventFilter(self)
        self.token_mode = on
        self.render()

    def _render_tokens(self):
        self.body.clear()
        self.shown = None
        self.ranges = []
        cur = QTextCursor(self.body.document())
        for i, ev in enumerate(self.tokens):
            f = QTextCharFormat()
            c = QColor("#5aa9e6" if i % 2 else "#f5a524")
            c.setAlpha(50)
            f.setBackground(c)
            a = cur.position()
            cur.insertText(ev.get("text") or "·", f)
            self.ranges.append((a, cur.position(), i))

    def eventFilter(self, obj, ev):
        if self.token_mode and ev.type() == QEvent.MouseButtonRelease:
            pos = self.body.cursorForPosition(ev.position().toPoint()).position()
            for a, b, i in self.ranges:
                if a <= pos < b or (pos == b and i == len(self.ranges) - 1):
                    self.token_clicked.emit(self.tokens[i])
                    break
        return False


class ToolCard(QFrame):
    """A tool call: header with the call, a collapsible body with arguments and result."""

    def __init__(self, name: str, arguments):
        super().__init__()
        self.setObjectName("toolCard")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 12, 8)
        self.toggle = QToolButton()
        self.toggle.setObjectName("link")
        self.toggle.setCheckable(True)
        self.toggle.setChecked(True)
        self.name = name
        self.toggle.setToolButtonStyle(Qt.ToolButtonTextOnly)
        lay.addWidget(self.toggle)
        self.body = QLabel()
        self.body.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.body.setWordWrap(True)
        lay.addWidget(self.body)
        self.arguments = arguments
        self.result = None
        self.toggle.toggled.connect(self.body.setVisible)
        self.toggle.toggled.connect(self._update)
        self._update()

    def reset(self, name: str, arguments):
        self.toggle.setChecked(True)
        self.name = name
        self.arguments = arguments
        self.result = None
        self._update()

    def set_result(self, ev: dict):
        self.result = ev.get("result") if "result" in ev else f"error: {ev.get('error')}"
        self._update()

    def _update(self, *_):
        # A triangle rather than an emoji: it says open/closed, and every UI font has it.
        self.toggle.setText(f"{'▾' if self.toggle.isChecked() else '▸'} tool call: {self.name}")
        args = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)
        res = "…" if self.result is None else (self.result if isinstance(self.result, str)
                                              else json.dumps(self.result, ensure_ascii=False))
        self.body.setText(f"arguments: {args}\nresult: {res}")


class Notice(QLabel):
    def __init__(self, text: str, error: bool = False):
        super().__init__(text)
        self.setWordWrap(True)
        self.setObjectName("error" if error else "stat")
        self.setAlignment(Qt.AlignCenter)
