"""The download queue: models being fetched from the Hub, one at a time, off the GUI thread.

It belongs to the app (PanelContext.downloads), not to the Get models view, so downloads go on while other
panels are shown and the view finds them as it left them. Each download is core/hub/download.get with a
progress-bar class that reports to the GUI thread through a ProgressRelay and stops at Cancel.
"""
from __future__ import annotations

import threading
import time

from PySide6.QtCore import QObject, Signal

from .workers import ProgressRelay, run_task


class Download:
    """One queued model: `repo` and, for a GGUF repository, `file`. `state`: queued, running, cancelling,
    done, failed, gated (a token is needed: `error` says where to accept the licence), cancelled."""

    def __init__(self, repo: str, file: str | None = None, token: str | None = None):
        self.repo, self.file, self.token = repo, file, token
        self.state = "queued"
        self.fraction = 0.0
        self.text = "waiting"
        self.error = ""
        self.gate_url = ""
        self.result: dict | None = None
        self.cancel = threading.Event()

    @property
    def label(self) -> str:
        return f"{self.repo}/{self.file}" if self.file else self.repo

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running", "cancelling")


class DownloadQueue(QObject):
    added = Signal(object)      # a Download
    changed = Signal(object)    # a Download whose state or progress changed (on the GUI thread)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.ctx = ctx
        self.items: list[Download] = []
        self.current: Download | None = None

    def add(self, repo: str, file: str | None = None, token: str | None = None) -> Download:
        item = Download(repo, file, token)
        self.items.append(item)
        self.added.emit(item)
        self._next()
        return item

    def retry(self, item: Download, token: str | None = None) -> None:
        """A failed, gated or cancelled download queued again (with a token, for a gated repository)."""
        if item.active:
            return
        item.token = token or item.token
        item.state, item.fraction, item.text, item.error = "queued", 0.0, "waiting", ""
        item.cancel.clear()
        self.changed.emit(item)
        self._next()

    def cancel(self, item: Download) -> None:
        if item.state == "queued":
            item.state, item.text = "cancelled", "cancelled"
        elif item.state == "running":
            item.state, item.text = "cancelling", "cancelling…"
            item.cancel.set()     # the worker stops at its next piece of the file
        self.changed.emit(item)

    # ---- running them one at a time ------------------------------------------------------------
    def _next(self) -> None:
        if self.current is not None:
            return
        item = next((i for i in self.items if i.state == "queued"), None)
        if item is not None:
            self._start(item)

    def _start(self, item: Download) -> None:
        from sol.core.hub.download import get, reporting
        self.current = item
        item.state, item.text = "running", "starting…"
        self.changed.emit(item)
        relay = ProgressRelay(lambda fraction, what: self._progress(item, fraction, what))
        first: dict = {}    # file name -> (when, bytes) at its first report: a resumed file starts past 0

        def report(done: int, total: int | None, name: str) -> None:   # the worker thread
            from sol.core.hub.fit import size_text
            when, start = first.setdefault(name, (time.monotonic(), done))
            rate = (done - start) / max(time.monotonic() - when, 1e-3)
            of = f" of {size_text(total)}" if total else ""
            left = f" · {(total - done) / rate:.0f} s left" if total and rate > 0 and done < total else ""
            relay(done / total if total else 0.0, f"{name}: {size_text(done)}{of} · {size_text(int(rate))}/s{left}")

        def done(result):
            relay.close()
            item.result, item.state, item.fraction = result, "done", 1.0
            item.text = "cached already" if result.get("cached") else "done"
            self._over(item)
            self.ctx.models_changed.emit()      # the Models panel lists it

        def failed(e):
            from sol.core.hub.client import Cancelled, Gated
            relay.close()
            if isinstance(e, Cancelled):
                item.state, item.text = "cancelled", "cancelled"
            elif isinstance(e, Gated):
                item.state, item.error, item.gate_url = "gated", str(e), e.url
                item.text = "gated: needs a token"
            else:
                item.state, item.error, item.text = "failed", str(e), f"failed: {e}"
            self._over(item)

        run_task(get, item.repo, file=item.file, token=item.token, device=self.ctx.device.type if self.ctx.device else "auto",
                 bar=reporting(report, item.cancel), cancel=item.cancel, on_done=done, on_error=failed)

    def _progress(self, item: Download, fraction: float, what: str) -> None:
        if item.state == "running":
            item.fraction, item.text = fraction, what
            self.changed.emit(item)

    def _over(self, item: Download) -> None:
        self.current = None
        self.changed.emit(item)
        self._next()
