"""Asking the user before a tool runs: Allow / Allow always for this tool / Deny.

The chat loop runs on a worker thread and calls `consent(name, arguments)` there when a tool needs the
user's yes (an MCP tool trusted `ask`). `Consent` is that callable: it signals the GUI thread, which
shows the `ConsentBar` above the input, and waits for a click (or for Stop, which is a Deny).
"""
from __future__ import annotations

import json
import threading

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton

ANSWERS = ("allow", "always", "deny")


class Consent(QObject):
    """consent(name, arguments) for the chat's worker thread; `asked` reaches the GUI thread (queued)."""
    asked = Signal(str, object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._event = threading.Event()
        self._answer = "deny"
        self.cancel: threading.Event | None = None   # the running answer's stop flag: Stop answers Deny

    def __call__(self, name: str, arguments: dict) -> str:
        self._answer = "deny"
        self._event.clear()
        self.asked.emit(name, arguments)
        while not self._event.wait(0.1):
            if self.cancel is not None and self.cancel.is_set():
                return "deny"
        return self._answer

    def answer(self, choice: str) -> None:
        """On the GUI thread: the user's click."""
        self._answer = choice if choice in ANSWERS else "deny"
        self._event.set()


class ConsentBar(QFrame):
    """The question, inline above the chat's input, with its three answers."""

    def __init__(self, consent: Consent, parent=None):
        super().__init__(parent)
        self.setObjectName("consentBar")
        self.consent = consent
        lay = QHBoxLayout(self)
        lay.setContentsMargins(10, 6, 10, 6)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextFormat(Qt.PlainText)   # arguments are the model's text, never markup
        lay.addWidget(self.label, 1)
        self.allow_btn = QPushButton("Allow")
        self.allow_btn.setObjectName("primary")
        self.always_btn = QPushButton("Allow always for this tool")
        self.deny_btn = QPushButton("Deny")
        self.deny_btn.setObjectName("danger")
        for b, choice in ((self.allow_btn, "allow"), (self.always_btn, "always"), (self.deny_btn, "deny")):
            lay.addWidget(b)
            b.clicked.connect(lambda _=False, c=choice: self._answer(c))
        consent.asked.connect(self.ask)
        self.hide()

    def ask(self, name: str, arguments) -> None:
        args = json.dumps(arguments, ensure_ascii=False)
        self.label.setText(f"The model wants to call {name} with {args[:400]}{'…' if len(args) > 400 else ''}")
        self.setToolTip(f"{name} needs your consent (its trust is 'ask'). Allow always remembers it in mcp.json; "
                        "the Plugins panel's MCP servers tab changes it back.")
        self.show()
        self.allow_btn.setFocus()

    def _answer(self, choice: str) -> None:
        self.hide()
        self.consent.answer(choice)
