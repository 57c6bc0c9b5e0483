"""Running work off the GUI thread.

`Task` runs one function in Qt's thread pool and delivers its result (or
exception) back on the GUI thread. `StreamWorker` runs a generator of events
(generation, the chat loop) in its own QThread, with a stop flag the
generator checks between events. `ProgressRelay` carries a worker's
progress(fraction, what) reports to the GUI thread, a few dozen a second.
The GUI thread never waits on any of them: it only receives signals.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Iterator

from PySide6.QtCore import QObject, QThread, QThreadPool, QTimer, Signal, Slot

_alive: set = set()   # keeps running tasks referenced until they report back


def settle() -> None:
    """Before a worker's own torch work: torch's thread count, read while no small model's generation holds
    it at one (sol.core.generation.threads). Nothing can hold it before torch is imported: then nothing to do."""
    if "torch" in sys.modules:
        from sol.core.generation.threads import settle as read_count
        read_count()


class Task(QObject):
    """fn(*args) in the thread pool; `done(result)` or `failed(exception)` on the GUI thread."""
    done = Signal(object)
    failed = Signal(object)
    _result = Signal(object)
    _error = Signal(object)

    def __init__(self, fn: Callable, *args, **kwargs):
        super().__init__()
        self._call = (fn, args, kwargs)
        # Emitted on the worker thread, received by this object's slots on the GUI thread (queued).
        self._result.connect(self._on_result)
        self._error.connect(self._on_error)

    def start(self) -> "Task":
        _alive.add(self)
        QThreadPool.globalInstance().start(self._run)
        return self

    def _run(self):
        fn, args, kwargs = self._call
        try:
            settle()
            r = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the GUI, never raised in a pool thread
            e.traceback_text = traceback.format_exc()
            self._error.emit(e)
        else:
            self._result.emit(r)

    @Slot(object)
    def _on_result(self, r):
        _alive.discard(self)
        self.done.emit(r)

    @Slot(object)
    def _on_error(self, e):
        _alive.discard(self)
        self.failed.emit(e)


def run_task(fn: Callable, *args, on_done: Callable | None = None, on_error: Callable | None = None,
             **kwargs) -> Task:
    t = Task(fn, *args, **kwargs)
    if on_done is not None:
        t.done.connect(on_done)
    if on_error is not None:
        t.failed.connect(on_error)
    return t.start()


class ProgressRelay(QObject):
    """A progress(fraction, what) callback for a worker thread whose reports reach `deliver` on the GUI
    thread at most PER_S times a second. The worker only keeps the latest report and signals when no
    signal is on its way (a 300-tensor file reports 300 times in a second: queuing each would crowd the
    GUI's event loop); the GUI thread takes whatever is latest then. Reports are coalesced, never lost:
    the last one before a long stage is shown during it. Create it on the GUI thread; `close()` there when
    the work is over hands on a report still held back, and drops any that arrive later."""
    PER_S = 30
    _ready = Signal()

    def __init__(self, deliver: Callable[[float, str], Any]):
        super().__init__()
        self.deliver = deliver
        self.lock = threading.Lock()
        self.latest: tuple[float, str] | None = None
        self.signalled = False   # a `_ready` or a timer is on its way and has not taken `latest` yet
        self.last = float("-inf")   # when the GUI thread last delivered
        self.closed = False
        self._ready.connect(self._take)   # emitted on the worker thread, run on this object's (the GUI's)

    def __call__(self, fraction: float, what: str) -> None:   # the worker thread
        with self.lock:
            self.latest = (fraction, what)
            if self.signalled:
                return
            self.signalled = True
        self._ready.emit()

    @Slot()
    def _take(self) -> None:
        if self.closed:
            return
        wait = self.last + 1 / self.PER_S - time.monotonic()
        if wait > 0:   # delivered too recently: take the latest once the interval is over
            QTimer.singleShot(max(1, round(wait * 1000)), self._take)
            return
        self._deliver()

    def _deliver(self) -> None:
        with self.lock:
            latest, self.latest, self.signalled = self.latest, None, False
        if latest is not None:
            self.last = time.monotonic()
            self.deliver(*latest)

    def close(self) -> None:
        if not self.closed:
            self._deliver()
            self.closed = True


BATCH_S = 0.016   # events that may wait are handed to the GUI thread at most this often (a frame)


class _StreamRunner(QObject):
    """Lives on the worker thread; iterates the generator and queues each event for the GUI thread.

    Each signal that crosses to the GUI thread makes it take the GIL from this (busy) thread, and
    every such handover costs the GUI up to a GIL switch interval plus a wake-up. So events go into
    a queue and one `ready` signal fetches all that have piled up: immediately for an event that may
    not wait, at most once per BATCH_S for those that may (tokens: another follows within a step)."""
    ready = Signal()
    failed = Signal(object)
    finished = Signal()

    def __init__(self, make_iter: Callable[[threading.Event], Iterator[Any]], cancel: threading.Event,
                 may_wait: Callable[[Any], bool] | None = None):
        super().__init__()
        self.make_iter = make_iter
        self.cancel = cancel
        self.may_wait = may_wait
        self.queue: deque = deque()
        self.lock = threading.Lock()
        self.signalled = False        # a `ready` is on its way and the GUI has not taken the queue yet
        self.last = 0.0

    def _put(self, ev) -> None:
        self.queue.append(ev)
        now = time.monotonic()
        with self.lock:
            if self.signalled or (self.may_wait is not None and self.may_wait(ev) and now - self.last < BATCH_S):
                return                # fetched with the pending `ready`, or with the next event
            self.signalled = True
            self.last = now
        self.ready.emit()

    def take(self) -> list:
        """GUI thread: every event queued so far, in order."""
        with self.lock:
            self.signalled = False
        out = []
        while self.queue:
            out.append(self.queue.popleft())
        return out

    @Slot()
    def run(self):
        try:
            settle()
            for ev in self.make_iter(self.cancel):
                self._put(ev)
        except BaseException as e:  # noqa: BLE001
            e.traceback_text = traceback.format_exc()
            self.failed.emit(e)
        self.finished.emit()


class StreamWorker(QObject):
    """make_iter(cancel_event) -> iterator, run in a QThread. Signals arrive on the GUI thread:
    `event` once per event, in order. Events for which may_wait(event) is true may reach the GUI
    thread up to BATCH_S late, together with others (see _StreamRunner)."""
    event = Signal(object)
    failed = Signal(object)
    finished = Signal()

    def __init__(self, make_iter: Callable[[threading.Event], Iterator[Any]], parent=None,
                 may_wait: Callable[[Any], bool] | None = None):
        super().__init__(parent)
        self.cancel = threading.Event()
        self.thread = QThread()
        self.runner = _StreamRunner(make_iter, self.cancel, may_wait)
        self.runner.moveToThread(self.thread)
        self.thread.started.connect(self.runner.run)
        self.runner.ready.connect(self._on_ready)
        self.runner.failed.connect(self._on_failed)
        self.runner.finished.connect(self._on_finished)
        self.running = False

    def start(self) -> "StreamWorker":
        self.running = True
        _alive.add(self)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Ask the generator to stop at its next check; `finished` follows."""
        self.cancel.set()

    @Slot()
    def _on_ready(self):
        for ev in self.runner.take():
            self.event.emit(ev)

    @Slot(object)
    def _on_failed(self, e):
        self._on_ready()          # events queued before the failure come first
        self.failed.emit(e)

    @Slot()
    def _on_finished(self):
        self._on_ready()          # and those still held back
        self.running = False
        self.thread.quit()
        self.thread.wait(100)   # already returned from run(); quit is immediate
        _alive.discard(self)
        self.finished.emit()
