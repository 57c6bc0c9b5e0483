"""The configured MCP servers as Sol tools: `SERVER.TOOL`, with trust deciding who may run them.

Trust, most specific first: the tool's own (`toolTrust`), the server's (`trust`), then the default:
`allow` for a tool the server annotates `readOnlyHint` (it promises not to change anything), `ask` for
every other. `ask` needs the user's consent for each call (the GUI's Allow / Allow always / Deny,
`sol chat --yes`); `deny` is never sent to the server; a server with no one to ask (`sol serve`) runs
only what is `allow`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SolError
from .client import DISABLED, FAILED, NOT_STARTED, RUNNING, Connection
from .config import McpConfig


@dataclass
class McpTool:
    name: str                      # "time.get_current_time": server and tool, split at the first dot
    server: str
    tool: str                      # the name the server knows it by
    description: str
    parameters: dict               # the server's input JSON schema
    annotations: dict = field(default_factory=dict)
    trust: str = "ask"


def default_home() -> Path:
    from ..formats.registry import data_dir
    return data_dir()


class McpServers:
    """mcp.json and a connection per server, started on first need and stopped by `close()` (or at exit)."""

    def __init__(self, home: Path | None = None):
        home = Path(home) if home is not None else default_home()
        self.path = home / "mcp.json"
        self.log_dir = home / "logs" / "mcp"
        self.error: str | None = None   # mcp.json could not be read: no servers, and this says why
        self._connections: dict[str, Connection] = {}
        self._lock = threading.RLock()
        self._reported: set[str] = set()
        self.reload()

    # ---- configuration ----------------------------------------------------------------------
    def reload(self) -> None:
        """Read mcp.json again; servers whose entry changed or went away are stopped."""
        with self._lock:
            try:
                self.config = McpConfig(self.path)
                self.error = None
            except SolError as e:
                self.config = McpConfig.__new__(McpConfig)
                self.config.path, self.config.servers = self.path, {}
                self.error = str(e)
            for name, conn in list(self._connections.items()):
                spec = self.config.servers.get(name)
                # Against what the connection was made with: an entry changed in place (disabled from the GUI)
                # is the same object as the connection's spec, and would compare equal to itself.
                if spec is None or spec.launch() != conn.launched:
                    conn.stop()
                    del self._connections[name]
                else:
                    conn.spec = spec   # same entry: trust lives on the spec, keep it current

    def connection(self, name: str) -> Connection:
        with self._lock:
            spec = self.config.get(name)
            conn = self._connections.get(name)
            if conn is None:
                conn = self._connections[name] = Connection(spec, self.log_dir / f"{name}.log")
            return conn

    def names(self) -> list[str]:
        return list(self.config.servers)

    # ---- tools and trust ----------------------------------------------------------------------
    def trust_of(self, server: str, tool: str, annotations: dict | None = None) -> str:
        spec = self.config.servers.get(server)
        if spec is None:
            return "deny"
        if tool in spec.tool_trust:
            return spec.tool_trust[tool]
        if spec.trust:
            return spec.trust
        return "allow" if (annotations or {}).get("readOnlyHint") else "ask"

    def pending(self) -> bool:
        """Whether tools() would start a server first (which may take the server's timeout)."""
        with self._lock:
            return any(not spec.disabled and (name not in self._connections
                                              or self._connections[name].state not in (RUNNING, FAILED))
                       for name, spec in self.config.servers.items())

    def start(self) -> None:
        """Start every enabled server that is not running, side by side (each may take its timeout)."""
        conns = [self.connection(n) for n, s in self.config.servers.items() if not s.disabled]
        threads = [threading.Thread(target=c.start, name=f"sol-mcp-start-{c.spec.name}", daemon=True)
                   for c in conns if c.state not in (RUNNING, FAILED)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def tools(self, start: bool = True) -> dict[str, McpTool]:
        """Every tool of every enabled server that is running (started here when `start`)."""
        if start:
            self.start()
        out = {}
        for name in self.names():
            if self.config.servers[name].disabled:
                continue
            conn = self.connection(name)
            for t in conn.tools if conn.state not in (FAILED, DISABLED) else []:
                ann = t.get("annotations") or {}
                full = f"{name}.{t['name']}"
                out[full] = McpTool(full, name, t["name"], t.get("description") or "",
                                    t.get("inputSchema") or {"type": "object", "properties": {}}, ann,
                                    self.trust_of(name, t["name"], ann))
        return out

    def call(self, server: str, tool: str, arguments: dict) -> dict:
        return self.connection(server).call(tool, arguments)

    def failures(self) -> list[str]:
        """One line for each server that failed since the last time this was asked (the chat's notes)."""
        out = []
        with self._lock:
            for name, conn in self._connections.items():
                key = f"{name}:{conn.state}:{conn.error}"
                if conn.error and key not in self._reported:
                    self._reported.add(key)
                    out.append(f"MCP server {name!r} is not available: {conn.error}")
        return out

    def status(self, start: bool = True) -> list[dict]:
        """For `sol mcp list --json` and the Plugins panel: {"name", "transport", "state", "error", "tools"}."""
        if start:
            self.start()
        out = []
        for name, spec in self.config.servers.items():
            conn = self.connection(name)
            state = DISABLED if spec.disabled else conn.state
            out.append({"name": name, "transport": spec.transport, "state": state, "error": conn.error,
                        "tools": [t["name"] for t in conn.tools] if state not in (FAILED, DISABLED, NOT_STARTED)
                        else []})
        return out

    def close(self) -> None:
        with self._lock:
            for conn in self._connections.values():
                conn.stop()
