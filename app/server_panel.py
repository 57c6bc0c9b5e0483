"""Server: `sol serve` as a child process, so other programs can use a model over the OpenAI API.

The switch starts it with the chosen model and port and stops it (SIGTERM; it exits within
seconds). The panel shows the URL, a curl and a Python example to copy, and one row per
request from the server's JSON log lines. Closing the window stops the server it started.
"""
from __future__ import annotations

import json
import sys

from PySide6.QtCore import QProcess, QProcessEnvironment, QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (QComboBox, QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit, QPushButton, QSpinBox,
                               QTableWidgetItem, QWidget)

from .kit import page, table

LOG_COLUMNS = ["Time", "Endpoint", "Status", "Tokens", "Duration"]
LISTENING = "listening on "


def examples(url: str, model: str, key: str | None) -> tuple[str, str]:
    """The curl command and the Python snippet the panel offers to copy."""
    auth = f" \\\n  -H 'Authorization: Bearer {key}'" if key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    curl = f"curl {url}/v1/chat/completions{auth} \\\n  -H 'Content-Type: application/json' \\\n  -d '{body}'"
    python = (f"from openai import OpenAI\n"
              f"client = OpenAI(base_url=\"{url}/v1\", api_key=\"{key or 'none'}\")\n"
              f"reply = client.chat.completions.create(model=\"{model}\",\n"
              f"    messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n"
              f"print(reply.choices[0].message.content)")
    return curl, python


class ServerPanel(QWidget):
    def __init__(self, ctx, parent=None):
        super().__init__(parent)
        self.ctx = ctx
        self.proc: QProcess | None = None
        self.state = "stopped"            # stopped | starting | running | stopping | failed
        self.url = ""
        self._buf = b""
        self._err = b""
        lay = page(self, "Server", "Serve a model over the OpenAI API, for editors, notebooks and agent "
                                   "frameworks on this machine. `sol serve` runs it from a terminal too.")
        row = QHBoxLayout()
        self.model_box = QComboBox()
        self.model_box.setMinimumWidth(220)
        self.port = QSpinBox()
        self.port.setRange(0, 65535)
        self.port.setValue(int(ctx.setting("server.port", 8000) or 8000))
        self.key = QLineEdit()
        self.key.setPlaceholderText("API key (optional)")
        self.key.setEchoMode(QLineEdit.Password)
        self.switch = QPushButton("Start server")
        self.switch.setCheckable(True)
        self.switch.clicked.connect(self._toggle)
        for label, w in (("Model", self.model_box), ("Port", self.port)):
            row.addWidget(QLabel(label))
            row.addWidget(w)
        row.addWidget(self.key)
        row.addWidget(self.switch)
        row.addStretch(1)
        lay.addLayout(row)
        self.status = QLabel("stopped")
        self.status.setObjectName("muted")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        ex = QHBoxLayout()
        self.curl = QPlainTextEdit()
        self.python = QPlainTextEdit()
        for name, box in (("curl", self.curl), ("Python", self.python)):
            box.setReadOnly(True)
            box.setMaximumHeight(130)
            col = QHBoxLayout()
            copy = QPushButton(f"Copy {name}")
            copy.clicked.connect(lambda _=False, b=box: QGuiApplication.clipboard().setText(b.toPlainText()))
            col.addWidget(box, 1)
            col.addWidget(copy)
            ex.addLayout(col, 1)
        lay.addLayout(ex)
        self.log = table(LOG_COLUMNS)
        lay.addWidget(self.log, 1)
        self.refresh_models()
        ctx.model_changed.connect(lambda _m: self.refresh_models())
        self._show_examples()

    # ---- models --------------------------------------------------------------------------
    def refresh_models(self) -> None:
        from sol.core.formats.registry import list_models
        current = self.model_box.currentData()
        self.model_box.clear()
        models = list_models()
        # The name the server will give it (its /v1/models id): as `sol models list` shows it, else the folder's.
        self._names = {m["path"]: m["name"] for m in models}
        loaded = self.ctx.loaded
        seen = set()
        if loaded is not None:
            self.model_box.addItem(f"{self._names.get(str(loaded.path), loaded.path.name)} (loaded)", str(loaded.path))
            seen.add(str(loaded.path))
        for m in models:
            if m["path"] not in seen:
                self.model_box.addItem(m["name"], m["path"])
                seen.add(m["path"])
        if current:
            i = self.model_box.findData(current)
            if i >= 0:
                self.model_box.setCurrentIndex(i)

    def select_model(self, path: str) -> None:
        i = self.model_box.findData(path)
        if i < 0:
            self.model_box.addItem(path, path)
            i = self.model_box.count() - 1
        self.model_box.setCurrentIndex(i)

    # ---- the child process ---------------------------------------------------------------------
    def _toggle(self, on: bool) -> None:
        self.start() if on else self.stop()

    def start(self) -> None:
        if self.proc is not None:
            return
        path = self.model_box.currentData()
        if not path:
            self._set_state("failed", "no model to serve: import or create one in the Models panel")
            return
        self.ctx.set_setting("server.port", self.port.value())
        self.proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        if self.key.text().strip():   # through the environment, not the command line others can read
            env.insert("SOL_API_KEY", self.key.text().strip())
        else:
            env.remove("SOL_API_KEY")
        self.proc.setProcessEnvironment(env)
        self.proc.setProgram(sys.executable)
        self.proc.setArguments(["-m", "sol.core.cli", "serve", "--model", path, "--port", str(self.port.value()),
                                "--log-json"])
        self.proc.readyReadStandardOutput.connect(self._read_stdout)
        self.proc.readyReadStandardError.connect(self._read_stderr)
        self.proc.finished.connect(self._finished)
        self.proc.errorOccurred.connect(self._proc_error)
        self._buf = self._err = b""
        self._set_state("starting", f"loading {self.model_box.currentText()}…")
        self.proc.start()

    def stop(self) -> None:
        if self.proc is not None and self.state in ("starting", "running"):
            self._set_state("stopping", "stopping…")
            self.proc.terminate()
            QTimer.singleShot(8000, self._kill_if_stuck)

    def _kill_if_stuck(self) -> None:
        if self.proc is not None and self.state == "stopping":
            self.proc.kill()

    def shutdown(self) -> None:
        """The window is closing: the server this panel started stops with it."""
        if self.proc is not None:
            self.proc.terminate()
            if not self.proc.waitForFinished(6000):
                self.proc.kill()
                self.proc.waitForFinished(2000)

    def _read_stdout(self) -> None:
        self._buf += bytes(self.proc.readAllStandardOutput())
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith(LISTENING):
                self.url = line[len(LISTENING):]
                self._set_state("running", f"serving {self.model_box.currentText()} at {self.url}")
                self._show_examples()
            elif line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if "endpoint" in entry:
                    self._add_row(entry)

    def _read_stderr(self) -> None:
        self._err = (self._err + bytes(self.proc.readAllStandardError()))[-4000:]

    def _proc_error(self, err) -> None:
        if err == QProcess.FailedToStart:
            self._err = f"could not start {sys.executable}: {self.proc.errorString()}".encode()
            self._finished(-1, QProcess.CrashExit)

    def _finished(self, code, status) -> None:
        if self.proc is None:
            return
        self._read_stdout()
        was = self.state
        self.proc.deleteLater()
        self.proc = None
        self.url = ""
        if was == "stopping" or code == 0:
            self._set_state("stopped", "stopped")
        else:
            lines = [x for x in self._err.decode("utf-8", "replace").splitlines() if x.strip()]
            self._set_state("failed", lines[-1] if lines else f"the server exited with code {code}")
        self._show_examples()

    # ---- what the panel shows ---------------------------------------------------------------
    def _set_state(self, state: str, text: str = "") -> None:
        self.state = state
        self.status.setText(text or state)
        self.status.setProperty("warn", state == "failed")
        self.switch.setChecked(state in ("starting", "running"))
        self.switch.setText("Stop server" if state in ("starting", "running") else "Start server")
        self.switch.setEnabled(state != "stopping")
        for w in (self.model_box, self.port, self.key):
            w.setEnabled(state in ("stopped", "failed"))

    def _show_examples(self) -> None:
        url = self.url or f"http://127.0.0.1:{self.port.value()}"
        path = self.model_box.currentData() or ""
        name = self._names.get(path, path.rstrip("/").rsplit("/", 1)[-1]) if path else "MODEL"
        curl, python = examples(url, name, self.key.text().strip() or None)
        self.curl.setPlainText(curl)
        self.python.setPlainText(python)

    def _add_row(self, e: dict) -> None:
        r = self.log.rowCount()
        self.log.insertRow(r)
        tokens = f"{e.get('prompt_tokens', 0)} + {e.get('completion_tokens', 0)}" if "prompt_tokens" in e else ""
        dur = f"{e['duration_s']:.2f} s" if "duration_s" in e else ""
        for c, v in enumerate([e.get("time", ""), e.get("endpoint", ""), str(e.get("status", "")), tokens, dur]):
            self.log.setItem(r, c, QTableWidgetItem(v))
        self.log.scrollToBottom()
