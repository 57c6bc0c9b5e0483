"""The Plugins panel's MCP servers tab: servers with their state, tools, trust and stderr log; add,
remove, enable, disable, restart, import another app's mcp.json.

Starting a server can take its whole timeout, so every start runs in a worker (ctx.run); the GUI thread
only reads what the last start left (state, error, tools) and edits mcp.json."""
from __future__ import annotations

import shlex

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFrame, QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit,
                               QPushButton, QSplitter, QTableWidgetItem, QVBoxLayout, QWidget)

from sol.app.kit import table
from sol.core.mcp.config import TRUST, ServerSpec, check_name

SERVER_COLUMNS = ["Server", "Transport", "State", "Tools", "Error"]
TOOL_COLUMNS = ["Tool", "Trust", "Description"]
STATE_COLORS = {"running": "#4cc38a", "failed": "#ef5b5b", "exited": "#ef5b5b", "disabled": "#8b93a5"}


def parse_server(name: str, where: str, extra: str) -> ServerSpec:
    """The add form: a command line or a URL, and KEY=VALUE env pairs or 'Header: value' pairs (;-separated)."""
    check_name(name)
    where = where.strip()
    if not where:
        raise ValueError("type the server's command (e.g. uvx mcp-server-time) or its URL")
    if where.startswith(("http://", "https://")):
        headers = {}
        for part in filter(None, (p.strip() for p in extra.split(";"))):
            k, found, v = part.partition(":")
            if not found:
                raise ValueError(f"header {part!r}: write it as Name: value")
            headers[k.strip()] = v.strip()
        return ServerSpec(name=name, url=where, headers=headers,
                          transport="sse" if where.rstrip("/").endswith("/sse") else "http")
    argv = shlex.split(where)
    env = {}
    for part in shlex.split(extra):
        k, found, v = part.partition("=")
        if not found:
            raise ValueError(f"environment {part!r}: write it as KEY=VALUE")
        env[k] = v
    return ServerSpec(name=name, command=argv[0], args=argv[1:], env=env)


class McpTab(QWidget):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.rows: list[dict] = []
        self._jobs = 0
        self._doing = ""
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 8, 0, 0)
        note = QLabel("Model Context Protocol servers give the chat their tools, named SERVER.TOOL. A tool runs "
                      "when its trust allows: ask (you are asked each time), allow, or deny. Tools a server marks "
                      "read-only are allowed unless you say otherwise. Kept in mcp.json, the shape Claude "
                      "Desktop, Cursor and LM Studio use.")
        note.setWordWrap(True)
        note.setObjectName("muted")
        lay.addWidget(note)
        bar = QHBoxLayout()
        self.toggle_btn = QPushButton("Disable")
        self.restart_btn = QPushButton("Restart")
        self.remove_btn = QPushButton("Remove")
        self.remove_btn.setObjectName("danger")
        self.import_btn = QPushButton("Import mcp.json…")
        self.refresh_btn = QPushButton("Refresh")
        for b in (self.toggle_btn, self.restart_btn, self.remove_btn, self.import_btn, self.refresh_btn):
            bar.addWidget(b)
        bar.addStretch(1)
        self.status = QLabel()
        self.status.setObjectName("stat")
        bar.addWidget(self.status)
        lay.addLayout(bar)

        split = QSplitter(Qt.Vertical)
        self.servers = table(SERVER_COLUMNS)
        split.addWidget(self.servers)
        below = QSplitter(Qt.Horizontal)
        self.tools = table(TOOL_COLUMNS)
        below.addWidget(self.tools)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setPlaceholderText("The selected server's stderr appears here.")
        below.addWidget(self.log)
        below.setSizes([520, 380])
        split.addWidget(below)
        split.setSizes([180, 260])
        lay.addWidget(split, 1)
        lay.addWidget(self._add_box())

        self.servers.itemSelectionChanged.connect(self.show_server)
        self.toggle_btn.clicked.connect(self.toggle)
        self.restart_btn.clicked.connect(self.restart)
        self.remove_btn.clicked.connect(self.remove)
        self.import_btn.clicked.connect(self._pick_import)
        self.refresh_btn.clicked.connect(self.refresh)

    def _add_box(self) -> QWidget:
        box = QFrame()
        box.setObjectName("card")
        lay = QHBoxLayout(box)
        lay.setContentsMargins(14, 8, 14, 8)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name")
        self.name_edit.setMaximumWidth(140)
        self.where_edit = QLineEdit()
        self.where_edit.setPlaceholderText("command and arguments (mcp-server-time), or a URL (https://…/mcp)")
        self.extra_edit = QLineEdit()
        self.extra_edit.setPlaceholderText("env KEY=VALUE … / headers Name: value; …")
        self.add_btn = QPushButton("Add server")
        self.add_btn.setObjectName("primary")
        lay.addWidget(self.name_edit)
        lay.addWidget(self.where_edit, 2)
        lay.addWidget(self.extra_edit, 1)
        lay.addWidget(self.add_btn)
        self.add_btn.clicked.connect(self.add)
        return box

    # ---- reading ----------------------------------------------------------------------------
    @property
    def mcp(self):
        pm = self.ctx.plugins
        return pm.mcp if pm is not None else None

    def is_ready(self) -> bool:
        return not self.busy

    @property
    def busy(self) -> bool:
        return self._jobs > 0

    def refresh(self, start: bool = True) -> None:
        """Read mcp.json and each server's state in a worker, starting the enabled ones when `start`: stopping a
        server whose entry changed or went away, or starting one, can take seconds, never on the GUI thread."""
        if self.mcp is None:
            self.status.setText("safe mode: no MCP server is started")
            return
        self._work("starting servers …" if start else "reading mcp.json …", self._read, start)

    def _read(self, start: bool) -> list[dict]:
        self.mcp.reload()
        return self.mcp.status(start=start)

    def _work(self, what: str, fn, *args) -> None:
        self._jobs += 1
        self._doing = what
        self.status.setText(what)
        self.ctx.run(fn, *args, on_done=self._started, on_error=self._start_failed)

    def _started(self, rows) -> None:
        self._jobs -= 1
        if self.mcp.error:
            self.status.setText(self.mcp.error)
        elif self.status.text() == self._doing:   # a message said meanwhile (added, removed) stays
            self.status.setText("")
        self._show(rows)

    def _start_failed(self, e) -> None:
        self._jobs -= 1
        self.status.setText(f"error: {e}")

    def _show(self, rows: list[dict]) -> None:
        keep = self.selected_name()
        self.rows = rows
        self.servers.setRowCount(len(rows))
        for r, row in enumerate(rows):
            vals = [row["name"], row["transport"], row["state"], str(len(row["tools"])), row["error"] or ""]
            for c, v in enumerate(vals):
                item = QTableWidgetItem(v)
                if c == 2:
                    item.setForeground(QColor(STATE_COLORS.get(v, "#e6e8ee")))
                if c == 4 and v:
                    item.setForeground(QColor("#ef5b5b"))
                    item.setToolTip(v)
                self.servers.setItem(r, c, item)
        names = [row["name"] for row in rows]
        if names:
            self.servers.selectRow(names.index(keep) if keep in names else 0)
        else:
            self.tools.setRowCount(0)
            self.log.clear()

    def state_of(self, name: str) -> str:
        """The State column for a server (tests read it)."""
        return next((row["state"] for row in self.rows if row["name"] == name), "")

    def selected_name(self) -> str | None:
        rows = self.servers.selectionModel().selectedRows()
        return self.rows[rows[0].row()]["name"] if rows and rows[0].row() < len(self.rows) else None

    def show_server(self) -> None:
        name = self.selected_name()
        if name is None or self.mcp is None:
            return
        spec = self.mcp.config.servers.get(name)
        self.toggle_btn.setText("Enable" if spec is not None and spec.disabled else "Disable")
        tools = [t for t in self.mcp.tools(start=False).values() if t.server == name]
        self.tools.setRowCount(len(tools))
        for r, t in enumerate(tools):
            self.tools.setItem(r, 0, QTableWidgetItem(t.tool))
            box = QComboBox()
            own = spec.tool_trust.get(t.tool) if spec else None
            for choice in TRUST:
                box.addItem(choice, choice)
            box.setCurrentIndex(TRUST.index(t.trust))
            box.setToolTip("ask: you are asked at each call · allow: runs without asking (and by `sol serve`) · "
                           "deny: never runs" + ("" if own else f"\nnow: {t.trust}, "
                                                 + ("the server's setting" if spec and spec.trust else
                                                    "read-only by the server's annotation" if t.trust == "allow"
                                                    else "the default")))
            box.currentIndexChanged.connect(lambda _i, b=box, tool=t: self.set_trust(tool, b.currentData()))
            self.tools.setCellWidget(r, 1, box)
            desc = QTableWidgetItem((t.description.strip().splitlines() or [""])[0])
            desc.setToolTip(t.description)
            self.tools.setItem(r, 2, desc)
        conn = self.mcp.connection(name)
        where = spec.url if spec and spec.transport != "stdio" else " ".join([spec.command, *spec.args]) if spec else ""
        lines = [f"{name}: {where}", f"state: {self.state_of(name)}"]
        if conn.error:
            lines.append(f"error: {conn.error}")
        tail = conn.stderr_tail(200)
        self.log.setPlainText("\n".join(lines + (["", "stderr:"] + tail if tail else [])))

    # ---- changing ---------------------------------------------------------------------------
    def set_trust(self, tool, trust: str) -> None:
        try:
            self.mcp.config.set_trust(tool.name, trust)
        except Exception as e:
            self.status.setText(f"error: {e}")
            return
        self.ctx.status_message.emit(f"{tool.name}: {trust}")

    def add(self) -> None:
        if self.mcp is None:
            return
        try:
            spec = parse_server(self.name_edit.text().strip(), self.where_edit.text(), self.extra_edit.text())
            self.mcp.config.add(spec)
        except Exception as e:
            self.status.setText(f"error: {e}")
            return
        for w in (self.name_edit, self.where_edit, self.extra_edit):
            w.clear()
        self.status.setText(f"added {spec.name}")
        self.refresh()

    def _selected_or_none(self):
        name = self.selected_name()
        return (name, self.mcp.config.servers.get(name)) if name and self.mcp is not None else (None, None)

    def toggle(self) -> None:
        name, spec = self._selected_or_none()
        if spec is None:
            return
        self.mcp.config.set_disabled(name, not spec.disabled)
        self.refresh()

    def restart(self) -> None:
        name, spec = self._selected_or_none()
        if spec is None or spec.disabled or self.busy:
            return
        conn = self.mcp.connection(name)
        self._work(f"restarting {name} …", lambda: (conn.restart(), self.mcp.status(start=False))[1])

    def remove(self) -> None:
        name, spec = self._selected_or_none()
        if spec is None:
            return
        self.mcp.config.remove(name)
        self.refresh(start=False)
        self.status.setText(f"removed {name}")

    def _pick_import(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Another app's mcp.json", "", "JSON (*.json);;All (*)")
        if path:
            self.import_file(path)

    def import_file(self, path: str) -> None:
        try:
            added, notes = self.mcp.config.import_file(path)
        except Exception as e:
            self.status.setText(f"error: {e}")
            return
        self.status.setText(f"imported {len(added)}: {', '.join(added) or 'none'}" + (f" ({'; '.join(notes)})"
                                                                                       if notes else ""))
        self.refresh()
