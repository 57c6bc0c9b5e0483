"""The Plugins panel: list, details, enable/disable, install with pip's log live, restart offer; and
a tab for MCP servers (mcp_tab.py)."""
from __future__ import annotations

import sys

from PySide6.QtCore import QProcess, Qt
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (QApplication, QFileDialog, QFrame, QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit,
                               QPushButton, QSplitter, QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget)

from sol.app.kit import page, table

from .mcp_tab import McpTab

COLUMNS = ["Plugin", "Version", "Kind", "State", "Hooks", "Error"]


def install_argv(spec: str) -> list[str]:
    return [sys.executable, "-m", "sol.core.cli", "plugins", "install", spec]


class PluginsPanel(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.infos = []
        self.proc: QProcess | None = None
        outer = page(self, "Plugins", "Plugins add tools to the chat, panels to this window, training stages and "
                                      "commands; MCP servers add tools. One that fails is marked and left out; "
                                      "Sol keeps working.")
        self.tabs = QTabWidget()
        outer.addWidget(self.tabs, 1)
        plugins_page = QWidget()
        lay = QVBoxLayout(plugins_page)
        lay.setContentsMargins(0, 8, 0, 0)
        self.tabs.addTab(plugins_page, "Plugins")
        self.mcp_tab = McpTab(ctx)
        self.tabs.addTab(self.mcp_tab, "MCP servers")
        # Servers start when their tab is first shown, not when the window opens.
        self.tabs.currentChanged.connect(lambda i: i == 1 and not self.mcp_tab.rows and self.mcp_tab.refresh())

        bar = QHBoxLayout()
        self.toggle_btn = QPushButton("Disable")
        self.refresh_btn = QPushButton("Reload")
        bar.addWidget(self.toggle_btn)
        bar.addWidget(self.refresh_btn)
        bar.addStretch(1)
        lay.addLayout(bar)

        split = QSplitter(Qt.Vertical)
        self.table = table(COLUMNS)
        split.addWidget(self.table)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setPlaceholderText("Select a plugin to see its details and, if it is broken, the traceback.")
        split.addWidget(self.details)
        split.addWidget(self._install_box())
        split.setSizes([300, 140, 260])
        lay.addWidget(split, 1)

        self.table.itemSelectionChanged.connect(self.show_details)
        self.toggle_btn.clicked.connect(self.toggle)
        self.refresh_btn.clicked.connect(self.reload)
        self.refresh()

    def _install_box(self) -> QWidget:
        box = QFrame()
        box.setObjectName("card")
        lay = QVBoxLayout(box)
        lay.setContentsMargins(14, 10, 14, 10)
        head = QLabel("Install a plugin")
        head.setObjectName("h2")
        lay.addWidget(head)
        row = QHBoxLayout()
        self.spec = QLineEdit()
        self.spec.setPlaceholderText("a package name, a wheel file, or a folder")
        self.install_btn = QPushButton("Install")
        self.install_btn.setObjectName("primary")
        file_btn = QPushButton("File…")
        dir_btn = QPushButton("Folder…")
        row.addWidget(self.spec, 1)
        row.addWidget(file_btn)
        row.addWidget(dir_btn)
        row.addWidget(self.install_btn)
        lay.addLayout(row)
        self.pip_log = QPlainTextEdit()
        self.pip_log.setReadOnly(True)
        f = QFont("monospace")
        f.setStyleHint(QFont.Monospace)
        self.pip_log.setFont(f)
        self.pip_log.setPlaceholderText("pip's output appears here, line by line.")
        lay.addWidget(self.pip_log, 1)
        self.restart_bar = QFrame()
        rb = QHBoxLayout(self.restart_bar)
        rb.setContentsMargins(0, 0, 0, 0)
        self.restart_label = QLabel("Installed. Restart Sol to load the plugin's panels.")
        restart = QPushButton("Restart now")
        restart.setObjectName("primary")
        rb.addWidget(self.restart_label, 1)
        rb.addWidget(restart)
        self.restart_bar.hide()
        lay.addWidget(self.restart_bar)
        self.install_btn.clicked.connect(lambda: self.install(self.spec.text().strip()))
        file_btn.clicked.connect(self._pick_file)
        dir_btn.clicked.connect(self._pick_dir)
        restart.clicked.connect(self.restart)
        return box

    # ---- listing -----------------------------------------------------------
    def is_ready(self) -> bool:
        return True

    def refresh(self):
        pm = self.ctx.plugins
        self.infos = list(pm.plugins()) if pm is not None else []
        self.table.setRowCount(len(self.infos))
        for r, p in enumerate(self.infos):
            state = "broken" if p.status == "broken" else ("enabled" if p.enabled else "disabled")
            vals = [p.name, p.version, "built-in" if p.builtin else "installed", state, ", ".join(p.hooks),
                    p.error or ""]
            for c, v in enumerate(vals):
                item = QTableWidgetItem(v)
                if c == 3:
                    item.setForeground(QColor({"broken": "#ef5b5b", "enabled": "#4cc38a"}.get(state, "#8b93a5")))
                if c == 5 and v:
                    item.setForeground(QColor("#ef5b5b"))
                    item.setToolTip(v)
                self.table.setItem(r, c, item)
        if self.infos:
            self.table.selectRow(0)

    def state_of(self, name: str) -> str:
        """The State column for a plugin (tests read it)."""
        for r, p in enumerate(self.infos):
            if p.name == name:
                return self.table.item(r, 3).text()
        return ""

    def selected(self):
        rows = self.table.selectionModel().selectedRows()
        return self.infos[rows[0].row()] if rows else None

    def show_details(self):
        p = self.selected()
        if p is None:
            return
        self.toggle_btn.setText("Enable" if not p.enabled else "Disable")
        lines = [f"{p.name} {p.version}  ({'built-in' if p.builtin else 'installed'})",
                 f"state: {p.status}, {'enabled' if p.enabled else 'disabled'}",
                 f"hooks: {', '.join(p.hooks) or '—'}"]
        if p.error:
            lines.append(f"error: {p.error}")
        if p.traceback:
            lines += ["", p.traceback]
        self.details.setPlainText("\n".join(lines))

    def toggle(self):
        p = self.selected()
        if p is None or self.ctx.plugins is None:
            return
        try:
            (self.ctx.plugins.disable if p.enabled else self.ctx.plugins.enable)(p.name)
        except Exception as e:
            self.details.setPlainText(str(e))
            return
        self.refresh()
        self.ctx.status_message.emit(f"{p.name} {'disabled' if p.enabled else 'enabled'}; "
                                     "panels change after a restart")

    def reload(self):
        if self.ctx.plugins is not None:
            self.ctx.plugins.load()
        self.refresh()

    # ---- install -----------------------------------------------------------
    def _pick_file(self):
        path, _ = QFileDialog.getOpenFileName(self, "Plugin wheel or archive", "", "Wheels (*.whl *.tar.gz *.zip);;All (*)")
        if path:
            self.spec.setText(path)

    def _pick_dir(self):
        path = QFileDialog.getExistingDirectory(self, "Plugin folder (with pyproject.toml)")
        if path:
            self.spec.setText(path)

    def install(self, spec: str, argv: list[str] | None = None):
        if not spec or self.proc is not None:
            return
        self.restart_bar.hide()
        self.pip_log.clear()
        argv = argv or install_argv(spec)
        self.pip_log.appendPlainText("$ sol plugins install " + spec)
        self.proc = QProcess(self)
        self.proc.setProcessChannelMode(QProcess.MergedChannels)
        self.proc.readyReadStandardOutput.connect(self._output)
        self.proc.finished.connect(self._installed)
        self.install_btn.setEnabled(False)
        self.proc.start(argv[0], argv[1:])

    def _output(self):
        text = bytes(self.proc.readAllStandardOutput()).decode("utf-8", "replace")
        for line in text.splitlines():
            self.pip_log.appendPlainText(line)

    def _installed(self, code, _status):
        self._output()
        self.proc.deleteLater()
        self.proc = None
        self.install_btn.setEnabled(True)
        if code == 0:
            self.pip_log.appendPlainText("✓ installed")
            self.reload()
            self.restart_bar.show()
        else:
            self.pip_log.appendPlainText(f"✗ install failed (exit code {code}); nothing was changed")

    def restart(self):
        QProcess.startDetached(sys.executable, ["-m", "sol.core.cli", "gui"])
        QApplication.instance().quit()
