"""The main window: navigation on the left, one panel at a time on the right,
device and model in the status bar.

Chat, Models, Get models and Server are the app's own panels; every other panel comes from a
plugin's `sol_panels()` hook. Panels are built the first time they are shown,
and one that raises is replaced by its error, never taking the window down.
"""
from __future__ import annotations

import traceback

from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import (QLabel, QListWidget, QListWidgetItem, QMainWindow, QPlainTextEdit, QProgressBar,
                               QSplitter, QStackedWidget, QVBoxLayout, QWidget)

from sol.core.plugins.hooks import PanelSpec

from .context import PanelContext
from .resources import icon_path


def app_panels() -> list[PanelSpec]:
    def chat(ctx):
        from .chat.panel import ChatPanel
        return ChatPanel(ctx)

    def models(ctx):
        from .models_panel import ModelsPanel
        return ModelsPanel(ctx)

    def get_models(ctx):
        from .get_models import GetModelsPanel
        return GetModelsPanel(ctx)

    def server(ctx):
        from .server_panel import ServerPanel
        return ServerPanel(ctx)

    return [PanelSpec("chat", "Chat", chat, "chat.svg", 0, "sol"),
            PanelSpec("models", "Models", models, "models.svg", 10, "sol"),
            PanelSpec("get", "Get models", get_models, "download.svg", 11, "sol"),
            PanelSpec("server", "Server", server, "server.svg", 15, "sol")]


class PanelError(QWidget):
    """Shown in place of a panel whose factory raised."""

    def __init__(self, spec: PanelSpec, tb: str):
        super().__init__()
        self.setObjectName("panelError")
        lay = QVBoxLayout(self)
        title = QLabel(f"The panel “{spec.title}” (plugin {spec.plugin or '?'}) failed to open.")
        title.setObjectName("h2")
        lay.addWidget(title)
        lay.addWidget(QLabel("The rest of Sol keeps working. The error was:"))
        text = QPlainTextEdit(tb)
        text.setReadOnly(True)
        lay.addWidget(text, 1)


class MainWindow(QMainWindow):
    def __init__(self, ctx: PanelContext, settings: QSettings, plugin_specs: list[PanelSpec] | None = None):
        super().__init__()
        self.ctx = ctx
        self.settings = settings
        self.setWindowTitle("Sol — a lab for small language models")
        self.setWindowIcon(QIcon(icon_path("sol.svg")))
        self.specs = sorted(app_panels() + list(plugin_specs or []), key=lambda s: (s.order, s.title))
        self.widgets: dict[str, QWidget] = {}

        self.nav = QListWidget()
        self.nav.setObjectName("nav")
        self.nav.setFixedWidth(176)
        self.stack = QStackedWidget()
        for spec in self.specs:
            item = QListWidgetItem(QIcon(icon_path(spec.icon)) if spec.icon else QIcon(), spec.title)
            item.setData(Qt.UserRole, spec.name)
            self.nav.addItem(item)
            self.stack.addWidget(QWidget())     # placeholder until first shown
        self.nav.currentRowChanged.connect(self._show_row)

        side = QWidget()
        side.setObjectName("sidebar")
        sl = QVBoxLayout(side)
        sl.setContentsMargins(0, 0, 0, 0)
        brand = QLabel("☀  Sol")
        brand.setObjectName("brand")
        sl.addWidget(brand)
        sl.addWidget(self.nav, 1)

        split = QSplitter()
        split.addWidget(side)
        split.addWidget(self.stack)
        split.setStretchFactor(1, 1)
        split.setHandleWidth(1)
        split.setChildrenCollapsible(False)
        # A problem the user must see (a damaged conversation database): above the panels, not in the
        # status bar, where it would vanish after a few seconds.
        self.problem = QLabel()
        self.problem.setObjectName("problem")
        self.problem.setWordWrap(True)
        self.problem.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.problem.setStyleSheet("padding: 8px; background: #7a2e1f; color: white;")
        self.problem.hide()
        central = QWidget()
        cl = QVBoxLayout(central)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.setSpacing(0)
        cl.addWidget(self.problem)
        cl.addWidget(split, 1)
        self.setCentralWidget(central)

        self._build_status_bar()
        ctx.model_changed.connect(self._on_model)
        ctx.adapter_changed.connect(self._on_adapter)
        ctx.model_loading.connect(self._on_model_loading)
        ctx.model_load_progress.connect(self._on_load_progress)
        ctx.model_failed.connect(self._on_model_failed)
        ctx.status_message.connect(lambda m: self.statusBar().showMessage(m, 8000))
        ctx.open_panel.connect(self.show_panel)

        geo = settings.value("window/geometry")
        if geo is not None:
            self.restoreGeometry(geo)
        else:
            self.resize(1280, 800)

    def show_problem(self, text: str) -> None:
        self.problem.setText("⚠ " + text)
        self.problem.show()

    # ---- panels ------------------------------------------------------------
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def show_panel(self, name: str) -> bool:
        for row, spec in enumerate(self.specs):
            if spec.name == name or spec.title.lower() == name.lower():
                self.nav.setCurrentRow(row)
                return True
        return False

    def panel(self, name: str) -> QWidget | None:
        """The panel widget by name, building it if needed (tests and --screenshot use this)."""
        for row, spec in enumerate(self.specs):
            if spec.name == name:
                return self._build(row)
        return None

    def current_panel(self) -> QWidget | None:
        row = self.nav.currentRow()
        return self.widgets.get(self.specs[row].name) if row >= 0 else None

    def _build(self, row: int) -> QWidget:
        spec = self.specs[row]
        if spec.name in self.widgets:
            return self.widgets[spec.name]
        w = self._create(spec)
        if not isinstance(w, QWidget):
            w = PanelError(spec, w)
        old = self.stack.widget(row)
        self.stack.insertWidget(row, w)
        self.stack.removeWidget(old)
        old.deleteLater()
        self.widgets[spec.name] = w
        return w

    def _create(self, spec: PanelSpec):
        """The panel widget, or the text of what went wrong. Plugin panels go through the plugin
        manager so a failing factory marks its plugin broken (the Plugins panel then shows it)."""
        pm = self.ctx.plugins
        if spec.plugin != "sol" and hasattr(pm, "create_panel"):
            w = pm.create_panel(spec, self.ctx)
            if w is None:
                info = next((p for p in pm.plugins() if p.name == spec.plugin), None)
                return (info.traceback or info.error) if info else "the panel factory failed"
        else:
            try:
                w = spec.factory(self.ctx)
            except Exception:
                return traceback.format_exc()
        return w if isinstance(w, QWidget) else f"the factory returned {type(w).__name__}, not a QWidget"

    def _show_row(self, row: int):
        if row < 0:
            return
        w = self._build(row)
        self.stack.setCurrentWidget(w)
        self.settings.setValue("window/panel", self.specs[row].name)

    # ---- status bar --------------------------------------------------------
    def _build_status_bar(self):
        sb = self.statusBar()
        self.device_label = QLabel()
        self.device_label.setObjectName("deviceLabel")
        self.model_label = QLabel("no model loaded")
        self.model_label.setObjectName("modelLabel")
        # How far a model load is, and what it reads: shown only while one loads.
        self.load_bar = QProgressBar()
        self.load_bar.setObjectName("loadBar")
        self.load_bar.setRange(0, 1000)
        self.load_bar.setFixedWidth(300)
        self.load_bar.hide()
        sb.addPermanentWidget(self.model_label)
        sb.addPermanentWidget(self.load_bar)
        sb.addPermanentWidget(self.device_label)
        self._describe_device()

    def _describe_device(self):
        from sol.core.devices import describe
        if self.ctx.device is None:
            self.device_label.setText("device: ?")
            return
        d = describe(self.ctx.device)
        kind = {"cuda": "GPU", "mps": "GPU", "cpu": "CPU"}.get(d["type"], d["type"])
        text = f"{kind}: {d['name']}"
        if d.get("memory_gb"):
            text += f" ({d['memory_gb']} GB)"
        if d.get("warning"):
            text = f"⚠ {text} — {d['warning']}"
            self.device_label.setProperty("warn", True)
        self.device_label.setText(text)
        self.device_label.setToolTip(f"threads: {d.get('threads')}")

    def _on_model_loading(self, path: str):
        self.model_label.setText(f"loading {path} …")
        self._on_load_progress(0.0, "starting")

    def _on_load_progress(self, fraction: float, what: str):
        bar = self.load_bar
        bar.setValue(round(fraction * bar.maximum()))
        percent = f"{int(fraction * 100)}% · "
        room = bar.width() - bar.fontMetrics().horizontalAdvance(percent) - 24
        shown = bar.fontMetrics().elidedText(what, Qt.ElideMiddle, max(room, 40))
        # The format's %p, %v and %m are placeholders: a word joiner after the text's own % keeps it as written.
        bar.setFormat(percent + shown.replace("%", "%\u2060"))
        bar.setToolTip(what)
        bar.show()

    def _on_adapter(self, _name):
        self._on_model(self.ctx.loaded)

    def _on_model(self, loaded):
        self.load_bar.hide()
        if loaded is None:
            self.model_label.setText("no model loaded")
            self.settings.remove("model/last")
            return
        from sol.core.model.blockquant import block_types
        from sol.core.model.quant import is_quantized, memory_bytes
        n = loaded.model.num_parameters()
        held = block_types(loaded.model)   # a GGUF file run in its own blocks: its types (Q4_K + Q6_K ...)
        kind = "+".join(held) if held else "int8" if is_quantized(loaded.model) else \
            str(loaded.model.dtype).replace("torch.", "")
        adapter = f" + adapter {self.ctx.active_adapter}" if self.ctx.active_adapter else ""
        self.model_label.setText(f"model: {loaded.name}{adapter} · {n / 1e6:.2f}M params · "
                                 f"{memory_bytes(loaded.model) / 2**20:.1f} MB ({kind})")
        self.settings.setValue("model/last", str(loaded.path))

    def _on_model_failed(self, msg: str):
        self.load_bar.hide()
        self.model_label.setText("no model loaded")
        self.statusBar().showMessage(f"could not load the model: {msg}", 15000)

    def closeEvent(self, e):
        self.settings.setValue("window/geometry", self.saveGeometry())
        for w in self.widgets.values():
            close = getattr(w, "shutdown", None)
            if close:
                try:
                    close()
                except Exception:
                    pass
        self.ctx.flush_settings()
        super().closeEvent(e)
