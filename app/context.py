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
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QMetaMethod, QObject, Signal

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
    models_changed = Signal()           # models or adapters on disk changed (a training run finished)
    adapter_changed = Signal(object)    # the loaded model now runs with this LoRA adapter's name, or None
    adapter_loading = Signal(str)       # an adapter folder is being put on the loaded model
    adapter_failed = Signal(str)        # a message naming the adapter folder and what is wrong
    fine_tune_requested = Signal(dict)  # a models-list entry to fine-tune (the Training panel takes it)

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
        # LoRA adapters on the loaded model: {folder: name} of those put on it, the active one, and a
        # switch waiting for the generations in flight to end (an answer never changes adapter halfway).
        self._adapters: dict[str, str] = {}
        self._active_adapter: str | None = None
        self._adapter_switch: tuple | None = None
        self._adapter_idle = threading.Event()   # set while no adapter is being put on the model
        self._adapter_idle.set()
        self._streams: set = set()
        self._downloads = None

    # ---- models from the Hub -------------------------------------------------
    @property
    def downloads(self):
        """The app's one download queue (app/downloads.py): the Get models view adds to it and shows it; the
        downloads go on while other panels are shown."""
        if self._downloads is None:
            from .downloads import DownloadQueue
            self._downloads = DownloadQueue(self)
        return self._downloads

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
        self._adapters = {}
        self._active_adapter = None
        self._adapter_switch = None
        if loaded is not None:   # a model loaded from an adapter folder (sol gui --model ADAPTER) runs with it
            from sol.core.model import lora
            names = lora.adapter_names(loaded.model)
            if names:
                layers = list(lora.lora_layers(loaded.model).values())
                active = layers[0].active if isinstance(layers[0].active, str) else None
                self._adapters = {n: n for n in names}
                self._active_adapter = active
        self.model_changed.emit(loaded)

    def load_model(self, path: str, on_done: Callable | None = None) -> Task:
        """Load a model directory off the GUI thread; `model_load_progress` fires as it reads (on the GUI
        thread), then `model_changed` when it is ready."""
        from sol.core.formats.checkpoint import load_model
        from sol.core.generation.engine import warm_up

        def load(path, device, progress):
            loaded = load_model(path, device, progress=progress)
            warm_up(loaded.model)   # here, off the GUI thread: the first answer is then as quick as the next
            return loaded
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

        return run_task(load, path, self.device or "cpu", progress=progress, on_done=done, on_error=failed)

    def unload_model(self) -> None:
        self.set_model(None)

    # ---- LoRA adapters on the loaded model -------------------------------------
    @property
    def active_adapter(self) -> str | None:
        """The name of the adapter the loaded model runs with, or None (the base alone)."""
        return self._active_adapter

    def adapter_name(self, folder: str) -> str | None:
        """The name an adapter folder was put on the loaded model under, or None if it is not on it."""
        return self._adapters.get(str(Path(folder).expanduser().resolve()))

    @property
    def adapter_busy(self) -> bool:
        return self._adapter_switch is not None or not self._adapter_idle.is_set()

    def use_adapter(self, folder: str | None, on_done: Callable | None = None) -> None:
        """Run the loaded model with the LoRA adapter folder `folder` (None: the base alone), without reloading
        the base: the adapter is put on the model once, under its folder's name, beside the others (they share
        the base's weights), off the GUI thread. A switch waits until no generation is running (ctx.stream), and
        a generation started while an adapter is being put on waits for it: an answer never changes adapter
        halfway. `adapter_changed` (and on_done(name)) follow; `adapter_failed` says what went wrong."""
        self._adapter_switch = (folder, on_done)
        if not self._streams and self._adapter_idle.is_set():
            self._switch_adapter()

    def _switch_adapter(self) -> None:
        folder, on_done = self._adapter_switch
        self._adapter_switch = None
        lm = self._loaded
        if lm is None:
            self.adapter_failed.emit("no model is loaded: load the adapter's base model first")
            return
        from sol.core.model import lora

        def activate(name):
            self._adapter_idle.set()
            if lm is not self._loaded:      # another model was loaded meanwhile
                return
            if folder is not None:
                self._adapters[key] = name
            lora.use(lm.model, name)
            self._active_adapter = name
            self.adapter_changed.emit(name)
            if on_done:
                on_done(name)
            if self._adapter_switch is not None and not self._streams:
                self._switch_adapter()

        if folder is None:
            activate(None)
            return
        key = str(Path(folder).expanduser().resolve())
        if key in self._adapters:
            activate(self._adapters[key])
            return
        taken = set(lora.adapter_names(lm.model))
        name, n = Path(key).name, 2
        while name in taken:
            name, n = f"{Path(key).name}-{n}", n + 1

        def failed(e):
            self._adapter_idle.set()
            self.adapter_failed.emit(f"{folder}: {e}")
            if self._adapter_switch is not None and not self._streams:
                self._switch_adapter()

        from sol.core.formats.adapter import load_adapter
        self._adapter_idle.clear()
        self.adapter_loading.emit(key)
        run_task(load_adapter, lm, key, name, on_done=lambda _info: activate(name), on_error=failed)

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
        idle = self._adapter_idle

        def after_adapter(cancel):
            idle.wait()     # an adapter being put on the model (use_adapter) first: on the worker thread
            return make_iter(cancel)

        w = StreamWorker(after_adapter, self, may_wait)
        w.event.connect(on_event)
        if on_finished:
            w.finished.connect(on_finished)
        if on_error:
            w.failed.connect(on_error)
        self._streams.add(w)
        w.finished.connect(lambda: self._stream_over(w))
        return w.start()

    def _stream_over(self, w) -> None:
        self._streams.discard(w)
        if not self._streams and self._adapter_switch is not None and self._adapter_idle.is_set():
            self._switch_adapter()

    # ---- fine-tuning -----------------------------------------------------------
    def fine_tune(self, model: dict) -> bool:
        """Open the Training panel set up to fine-tune `model` (a `list_models` entry) with a LoRA adapter.
        False (and a status message) where no panel takes it: the training plugin is disabled."""
        self.open_panel.emit("training")
        if not self.isSignalConnected(QMetaMethod.fromSignal(self.fine_tune_requested)):
            self.status_message.emit("Fine-tuning needs the Training panel: enable the training-runner plugin "
                                     "(Plugins panel)")
            return False
        self.fine_tune_requested.emit(model)
        return True

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
