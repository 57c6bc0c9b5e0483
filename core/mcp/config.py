"""`mcp.json`: the MCP servers Sol knows, in the shape other apps already write.

    {"mcpServers": {
        "time":  {"command": "mcp-server-time", "args": [], "env": {}},
        "notes": {"url": "http://127.0.0.1:8000/mcp", "headers": {"Authorization": "Bearer ..."}}}}

That is Claude Desktop's, Cursor's and LM Studio's file, so one of theirs can be imported as it is
(VS Code's `{"servers": {...}}` too). Sol adds keys those apps ignore: `"trust"` (`ask`, `allow` or
`deny`, for the whole server), `"toolTrust"` ({TOOL: trust}), `"disabled"` (Cline's key) and
`"timeout"` (seconds a start or a call may take, default 30). The file lives beside sol.db
(`SOL_HOME` moves both) and is written atomically.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text
from ..errors import SolError

TRUST = ("ask", "allow", "deny")
DEFAULT_TIMEOUT_S = 30.0
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
NAME_RULE = "letters, digits, - and _ (no dots: a tool is named SERVER.TOOL)"


@dataclass
class ServerSpec:
    """One server: a command to start (stdio) or a URL to reach (streamable HTTP, or SSE)."""
    name: str
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    transport: str = "stdio"                   # "stdio" | "http" | "sse"
    trust: str | None = None                   # the server's default; None: ask, read-only tools allowed
    tool_trust: dict[str, str] = field(default_factory=dict)
    disabled: bool = False
    timeout: float = DEFAULT_TIMEOUT_S
    extra: dict = field(default_factory=dict)  # keys other apps wrote, kept as they were

    def launch(self) -> tuple:
        """What starting the server depends on (a change of trust needs no restart)."""
        return (self.command, tuple(self.args), tuple(sorted(self.env.items())), self.url,
                tuple(sorted(self.headers.items())), self.transport, self.timeout, self.disabled)

    def to_json(self) -> dict:
        out = dict(self.extra)
        if self.transport == "stdio":
            out.update(command=self.command, args=list(self.args))
            if self.env:
                out["env"] = dict(self.env)
        else:
            out["url"] = self.url
            if self.headers:
                out["headers"] = dict(self.headers)
            if self.transport == "sse":
                out["type"] = "sse"
        if self.trust:
            out["trust"] = self.trust
        if self.tool_trust:
            out["toolTrust"] = dict(self.tool_trust)
        if self.disabled:
            out["disabled"] = True
        if self.timeout != DEFAULT_TIMEOUT_S:
            out["timeout"] = self.timeout
        return out


def check_name(name: str, where: str = "server name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise SolError(f"{where} {name!r}: use {NAME_RULE}")
    return name


def _strings(value, where: str, kind: type) -> list | dict:
    """A list of strings or a {string: string} object, or a SolError naming `where`."""
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SolError(f"{where} must be a list of strings")
        return list(value)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise SolError(f"{where} must be an object of strings")
    return dict(value)


def parse_server(name: str, raw, where: str) -> ServerSpec:
    """One entry of `mcpServers`; `where` names it in errors (`mcp.json: mcpServers.time`)."""
    if not isinstance(raw, dict):
        raise SolError(f"{where}: expected an object with \"command\" or \"url\", got {type(raw).__name__}")
    raw = dict(raw)
    kind = raw.pop("type", None) or raw.pop("transport", None)
    spec = ServerSpec(name=name)
    if "command" in raw and "url" in raw:
        raise SolError(f"{where}: give \"command\" (a local server) or \"url\" (a remote one), not both")
    if "command" in raw:
        spec.command = raw.pop("command")
        if not isinstance(spec.command, str) or not spec.command.strip():
            raise SolError(f"{where}.command must be the program to run, a non-empty string")
        spec.args = _strings(raw.pop("args", []), f"{where}.args", list)
        spec.env = _strings(raw.pop("env", None) or {}, f"{where}.env", dict)
    elif "url" in raw or "serverUrl" in raw:
        spec.url = raw.pop("url", None) or raw.pop("serverUrl")
        if not isinstance(spec.url, str) or not re.match(r"^https?://", spec.url):
            raise SolError(f"{where}.url must be an http:// or https:// address")
        spec.headers = _strings(raw.pop("headers", None) or {}, f"{where}.headers", dict)
        spec.transport = "sse" if kind == "sse" or spec.url.rstrip("/").endswith("/sse") else "http"
    else:
        raise SolError(f"{where}: no \"command\" (a local server) or \"url\" (a remote one)")
    spec.trust = raw.pop("trust", None)
    if spec.trust is not None and spec.trust not in TRUST:
        raise SolError(f"{where}.trust must be one of {', '.join(TRUST)}")
    spec.tool_trust = _strings(raw.pop("toolTrust", None) or {}, f"{where}.toolTrust", dict)
    bad = next((t for t, v in spec.tool_trust.items() if v not in TRUST), None)
    if bad is not None:
        raise SolError(f"{where}.toolTrust.{bad} must be one of {', '.join(TRUST)}")
    spec.disabled = raw.pop("disabled", False)
    if not isinstance(spec.disabled, bool):
        raise SolError(f"{where}.disabled must be true or false")
    timeout = raw.pop("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise SolError(f"{where}.timeout must be a number of seconds above 0")
    spec.timeout = float(timeout)
    spec.extra = raw
    return spec


def parse_file(path: Path, rename: bool = False) -> tuple[dict[str, ServerSpec], list[str]]:
    """The servers of an mcp.json (Sol's or another app's) and notes on what was changed. `rename`:
    a name Sol cannot use (`my.server`) becomes a usable one (`my-server`) instead of an error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SolError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SolError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise SolError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    key = "mcpServers" if isinstance(data, dict) and "mcpServers" in data else "servers"
    if not isinstance(data, dict) or not isinstance(data.get(key), dict):
        raise SolError(f"{path}: expected an object with an \"mcpServers\" object "
                       "({\"mcpServers\": {\"NAME\": {\"command\": ...}}})")
    servers, notes = {}, []
    for name, raw in data[key].items():
        usable = name
        if not NAME.match(name):
            if not rename:
                raise SolError(f"{path}: {key}.{name}: server names are {NAME_RULE}; rename it")
            usable = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "server"
            notes.append(f"server {name!r} is named {usable!r} here ({NAME_RULE})")
        servers[usable] = parse_server(usable, raw, f"{path}: {key}.{name}")
    return servers, notes


class McpConfig:
    """Sol's mcp.json: read once, changed through these methods, written whole after each change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.servers: dict[str, ServerSpec] = {}
        if self.path.is_file():
            self.servers, _ = parse_file(self.path)

    def save(self) -> None:
        data = {"mcpServers": {n: s.to_json() for n, s in self.servers.items()}}
        write_text(self.path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def get(self, name: str) -> ServerSpec:
        if name not in self.servers:
            known = ", ".join(self.servers) or "none"
            raise SolError(f"no MCP server named {name!r} in {self.path} (known: {known}); see `sol mcp list`")
        return self.servers[name]

    def add(self, spec: ServerSpec, replace: bool = False) -> None:
        check_name(spec.name)
        if spec.name in self.servers and not replace:
            raise SolError(f"an MCP server named {spec.name!r} is already in {self.path}; "
                           f"`sol mcp remove {spec.name}` first, or choose another name")
        self.servers[spec.name] = spec
        self.save()

    def remove(self, name: str) -> ServerSpec:
        spec = self.get(name)
        del self.servers[name]
        self.save()
        return spec

    def import_file(self, path: Path) -> tuple[list[str], list[str]]:
        """Add another app's servers; a name Sol already has keeps Sol's entry. (added, notes)"""
        servers, notes = parse_file(path, rename=True)
        added = []
        for name, spec in servers.items():
            if name in self.servers:
                notes.append(f"server {name!r} is already configured; kept the one Sol has")
                continue
            self.servers[name] = spec
            added.append(name)
        self.save()
        return added, notes

    def set_trust(self, target: str, trust: str) -> None:
        """`SERVER` or `SERVER.TOOL` (split at the first dot) to ask, allow or deny."""
        if trust not in TRUST:
            raise SolError(f"trust {trust!r}: choose one of {', '.join(TRUST)}")
        server, _, tool = target.partition(".")
        spec = self.get(server)
        if tool:
            spec.tool_trust[tool] = trust
        else:
            spec.trust = trust
        self.save()

    def set_disabled(self, name: str, disabled: bool) -> None:
        self.get(name).disabled = disabled
        self.save()
