"""`sol gui`: build the window, load the model, show the panel; optionally save a screenshot and exit."""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication

SCREENSHOT_TIMEOUT_S = 60


def settings() -> QSettings:
    # Beside Sol's data (SOL_HOME in tests), not in the user's global Qt settings.
    from sol.core.formats.registry import data_dir
    d = data_dir()
    d.mkdir(parents=True, exist_ok=True)
    return QSettings(str(d / "gui.ini"), QSettings.IniFormat)


def qt_binding_problem() -> str | None:
    """Why this PySide6 cannot run Sol, or None. PySide6 6.12.0's wheels hand back None without
    taking a reference to it; on Python < 3.12 (where None is not immortal) every call of a method
    returning nothing drops one, and Sol dies within seconds with "deallocating None"."""
    import PySide6
    from PySide6.QtCore import QObject
    before = sys.getrefcount(None)
    probe = QObject()
    for _ in range(100):
        probe.setObjectName("probe")
    lost = before - sys.getrefcount(None)
    if lost < 50:
        return None
    return (f"PySide6 {PySide6.__version__} loses a reference to None on every call under Python "
            f"{sys.version.split()[0]} and would crash Sol. Install a working release: "
            f"pip install 'PySide6-Essentials<6.12' (or run Sol on Python 3.12 or newer).")


def application() -> QApplication:
    problem = qt_binding_problem()
    if problem:
        raise SystemExit(f"error: {problem}")
    # Generation runs in a Python thread; a waiting GUI thread gets the GIL after at most this long
    # (default 5 ms), which bounds how late a repaint can be while tokens stream.
    sys.setswitchinterval(0.001)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Sol")
    app.setStyle("Fusion")
    from .resources import stylesheet
    from .theme import apply_theme
    apply_theme(app)
    app.setStyleSheet(stylesheet())
    return app


def starter_model() -> Path | None:
    from sol.core.formats.registry import builtin_models_dir
    d = builtin_models_dir() / "starter"
    return d if (d / "config.json").is_file() else None


def build_window(safe_mode: bool = False):
    """The window and its context, without showing it (tests use this)."""
    from sol.core.devices import pick_device

    from .context import PanelContext
    from .services import make_plugin_manager, make_store
    from .window import MainWindow
    application()
    plugins = make_plugin_manager(safe_mode or None)
    store, store_problem = make_store()
    ctx = PanelContext(store=store, plugins=plugins, device=pick_device("auto"))
    try:
        specs = plugins.panels()
    except Exception as e:  # the manager isolates plugins; this guards the manager itself
        print(f"warning: plugin panels unavailable: {e}", file=sys.stderr)
        specs = []
    win = MainWindow(ctx, settings(), specs)
    if store_problem:
        win.show_problem(store_problem)
    freeze_heap()
    return win, ctx


def freeze_heap() -> None:
    """Move what exists now (Qt, torch, numpy, the window: ~200k objects) out of the collector's reach.
    A full collection scans them all in ~0.1-0.2 s holding the GIL, and generation allocates enough
    per token to set one off every few answers: the window froze that long mid-answer. They live as long
    as the app anyway. Collect first so garbage (an earlier window, in tests) is not kept forever."""
    gc.collect()
    gc.freeze()


def choose_model(args, win) -> str | None:
    if getattr(args, "model", None):
        from sol.core.formats.registry import resolve
        return str(resolve(args.model))
    last = win.settings.value("model/last")
    if last and Path(last).is_dir():
        return last
    starter = starter_model()
    if starter is None:
        win.ctx.status_message.emit("The starter model is not installed (resources/models/starter); "
                                    "open Models to load or create one.")
        return None
    return str(starter)


def run(args) -> int:
    app = application()
    win, ctx = build_window(getattr(args, "safe_mode", False))
    panel = getattr(args, "panel", None) or win.settings.value("window/panel") or "chat"
    if getattr(args, "panel", None) and not any(s.name == panel or s.title.lower() == panel.lower()
                                                for s in win.specs):
        # Before anything starts in the background: a model loading on a worker thread would report
        # to a window that is gone (a stray Qt traceback after the error line).
        sys.stderr.write(f"error: --panel {panel}: no such panel; choose one of {', '.join(win.names())}\n")
        return 2
    model = choose_model(args, win)
    if model:
        ctx.load_model(model)
    if not win.show_panel(panel):
        win.show_panel("chat")
    win.show()
    if getattr(args, "screenshot", None):
        _screenshot_when_ready(app, win, ctx, Path(args.screenshot), expect_model=bool(model))
    return app.exec()


def _screenshot_when_ready(app, win, ctx, out: Path, expect_model: bool):
    """Poll (never block) until the model is loaded and the panel says it is ready, then save and quit."""
    t0 = time.monotonic()
    failed = []
    ctx.model_failed.connect(failed.append)

    def ready() -> bool:
        if expect_model and ctx.loaded is None and not failed:
            return False
        panel = win.current_panel()
        is_ready = getattr(panel, "is_ready", None)
        return is_ready() if callable(is_ready) else True

    def poll():
        if ready() or time.monotonic() - t0 > SCREENSHOT_TIMEOUT_S:
            QTimer.singleShot(400, shoot)   # let the last repaint land
        else:
            QTimer.singleShot(100, poll)

    def shoot():
        out.parent.mkdir(parents=True, exist_ok=True)
        ok = win.grab().save(str(out))
        print(f"{'saved' if ok else 'could not save'} {out}")
        win.close()
        app.exit(0 if ok else 1)

    QTimer.singleShot(200, poll)
    os.environ.setdefault("SOL_SCREENSHOT", "1")
