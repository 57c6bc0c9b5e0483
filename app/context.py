"""PanelContext: everything a panel may use, and nothing else.

Panels (the app's own and every plugin's) receive one PanelContext. They may
read the loaded model and tokenizer and subscribe to `model_changed`, read the
chat session and subscribe to `chat_event`, use the store and the plugin
manager, and run slow work off the GUI thread with `run()`. They never import
other `sol.app` modules, so a third-party panel has the same footing as ours.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from PySide6.QtCore import QObject, Signal

from .workers import ProgressRelay, StreamWorker, Task, run_task


class PanelContext(QObject):
    model_changed = Signal(object)      # the LoadedModel, or None after unload
    model_loading = Signal(str)         # path being loaded
    model_load_progress = Signal(float, str)   # how far the load is (0..1) and what it reads; ~30 a second
    model_failed = Signal(str)          # a message naming what is wrong
    chat_event = Signal(dict)           # every event of the chat (token, tool_call, message, ...)
    chat_session_changed = Signal(object)
    status_message = Signal(str)        # a short line for the status bar
    open_panel = Signal(str)            # ask the window to show a panel by name

    def __init__(self, store=None, plugins=None, device=None, parent=None):
        super().__init__(parent)
        self.store = store
        self.plugins = plugins
        self.device = device            # torch.device the app runs models on
        self._loaded = None
        self.chat_session = None
        self.last_answer = ""           # text of the last assistant answer (attention "last answer")
        # Settings are committed by one thread, in order: a commit waits for the disk (fsync; tens of ms
        # when it is busy) and the GUI must not. Python waits for that thread's queue at exit.
        self._writer: ThreadPoolExecutor | None = None
        self._pending: dict[str, Any] = {}  # written but maybe not committed yet: setting() reads these
        self._pending_lock = threading.Lock()

    # ---- the model ---------------------------------------------------------
    @property
    def loaded(self):
        """The LoadedModel (model, tokenizer, config, path, meta), or None."""
        return self._loaded

    @property
    def model(self):
        return self._loaded.model if self._loaded else None

    @property
    def tokenizer(self):
        return self._loaded.tokenizer if self._loaded else None

    def set_model(self, loaded) -> None:
        self._loaded = loaded
        self.model_changed.emit(loaded)

    def load_model(self, path: str, on_done: Callable | None = None) -> Task:
        """Load a model directory off the GUI thread; `model_load_progress` fires as it reads (on the GUI
        thread), then `model_changed` when it is ready."""
        from sol.core.formats.checkpoint import load_model
        self.model_loading.emit(str(path))
        progress = ProgressRelay(self.model_load_progress.emit)

        def done(loaded):
            progress.close()
            self.set_model(loaded)
            if on_done:
                on_done(loaded)

        def failed(e):
            progress.close()
            self.model_failed.emit(f"{path}: {e}")

        return run_task(load_model, path, self.device or "cpu", progress=progress, on_done=done, on_error=failed)

    def unload_model(self) -> None:
        self.set_model(None)

    # ---- the chat ----------------------------------------------------------
    def set_chat_session(self, session) -> None:
        self.chat_session = session
        self.chat_session_changed.emit(session)

    # ---- work off the GUI thread -------------------------------------------
    def run(self, fn: Callable, *args, on_done: Callable | None = None,
            on_error: Callable | None = None, **kwargs) -> Task:
        """fn(*args, **kwargs) in a worker thread; on_done(result) / on_error(exc) on the GUI thread."""
        return run_task(fn, *args, on_done=on_done, on_error=on_error, **kwargs)

    def stream(self, make_iter: Callable[[Any], Any], on_event: Callable, on_finished: Callable | None = None,
               on_error: Callable | None = None, may_wait: Callable[[Any], bool] | None = None) -> StreamWorker:
        """make_iter(cancel_event) -> iterator of events, run in a QThread; `.stop()` sets the flag.
        Events for which may_wait(event) holds may be delivered up to a frame late, in a batch."""
        w = StreamWorker(make_iter, self, may_wait)
        w.event.connect(on_event)
        if on_finished:
            w.finished.connect(on_finished)
        if on_error:
            w.failed.connect(on_error)
        return w.start()

    # ---- settings ------------------------------------------------------------
    def setting(self, key: str, default=None):
        with self._pending_lock:
            if key in self._pending:
                v = self._pending[key]
                return default if v is None else v
        if self.store is not None and hasattr(self.store, "get_setting"):
            try:
                v = self.store.get_setting(key)
                return default if v is None else v
            except Exception:  # a store problem must not break a panel
                return default
        return default

    def set_setting(self, key: str, value) -> None:
        """Saved in the background; setting(key) returns the new value at once."""
        if self.store is None or not hasattr(self.store, "set_setting"):
            return
        with self._pending_lock:
            self._pending[key] = value
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sol-settings")
        try:
            self._writer.submit(self._write_setting, key, value)
        except RuntimeError:      # the interpreter is exiting: no new threads, write it here
            self._write_setting(key, value)

    def _write_setting(self, key: str, value) -> None:
        try:
            self.store.set_setting(key, value)
        except Exception:   # a store problem must not break a panel
            pass
        with self._pending_lock:
            if key in self._pending and self._pending[key] is value:   # no newer value queued meanwhile
                del self._pending[key]

    def flush_settings(self) -> None:
        """Wait until every setting written so far is committed (the window calls this as it closes)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None   # a later write starts a new thread
