"""Starting a real `sol serve` for tests: a child process on a free loopback port (ServerProcess), or the
app in this process on a thread (app_server), where a test needs to reach into its engine."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`sol serve ... --port 0`; `url` comes from its `listening on` line. Its stdout (the request
    log) is read by a thread into `lines`, so the pipe never fills."""

    def __init__(self, args: list[str], home: Path, env: dict | None = None, timeout: float = 90.0):
        e = {**os.environ, "SOL_HOME": str(home), "HF_HOME": str(home / "hf"), **(env or {})}
        if "SOL_API_KEY" not in (env or {}):
            e.pop("SOL_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "sol.core.cli", "serve", "--port", "0", "--log-json",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                                     cwd=str(home))
        self.lines: list[str] = []
        self.url = None
        first = threading.Event()

        def read():
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                if self.url is None and line.startswith("listening on "):
                    self.url = line[len("listening on "):]
                    first.set()
                self.lines.append(line)
            first.set()
        threading.Thread(target=read, daemon=True).start()
        first.wait(timeout)
        if self.url is None:
            self.proc.kill()
            raise RuntimeError(f"sol serve did not start: {self.proc.stderr.read()}")

    def log(self) -> list[dict]:
        return [json.loads(x) for x in self.lines if x.startswith("{")]

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return rc, time.perf_counter() - t0


@contextlib.contextmanager
def app_server(app, engine):
    """`app` served by uvicorn on a thread, on a free loopback port; yields its base URL. On the way out the
    server stops and `engine` (already started) is closed."""
    import uvicorn

    from sol.core.commands.serve import bind
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        engine.close()
        t.join(10)
