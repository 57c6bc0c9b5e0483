"""One connection per MCP server, on the official SDK, driven from Sol's threads.

The SDK is async and its transports are context managers that must be entered and left in one task,
while the chat, `sol serve` and the GUI call tools from plain threads. So every connection lives as a
task on one event loop that runs on a daemon thread ("sol-mcp"): the task enters the transport and the
session, lists the tools, then waits to be told to stop; a call from any thread is a coroutine sent to
that loop, with the server's timeout around it. Leaving the task's contexts is what stops a stdio
server (the SDK closes its stdin, then terminates its process tree); `close_all` does it for every
server when Sol exits, so no server outlives Sol.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import re
import threading
import weakref
from pathlib import Path

from .config import ServerSpec

STARTING, RUNNING, FAILED, EXITED, STOPPED, DISABLED = ("starting", "running", "failed", "exited", "stopped",
                                                       "disabled")
NOT_STARTED = "not started"
STOP_WAIT_S = 5.0


class _Loop:
    """The event loop every connection runs on, on its own daemon thread; made on first use."""
    _lock = threading.Lock()
    _shared: _Loop | None = None

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sol-mcp", daemon=True)
        self.thread.start()

    @classmethod
    def shared(cls) -> _Loop:
        with cls._lock:
            if cls._shared is None:
                cls._shared = _Loop()
            return cls._shared

    def run(self, coro, timeout: float | None = None):
        """Run `coro` on the loop and wait for it from this (another) thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_live: weakref.WeakSet[Connection] = weakref.WeakSet()


@atexit.register
def close_all() -> None:
    """Stop every server this process started (at exit, and for tests)."""
    for conn in list(_live):
        conn.stop()


def quiet_sdk_logging(log_path: Path) -> None:
    """The SDK logs a traceback for every line a server prints that is not JSON-RPC (a stray print()):
    into Sol's MCP log, not over the chat on the terminal."""
    logger = logging.getLogger("mcp")
    if logger.handlers:
        return
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_path, encoding="utf-8", delay=True)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


def _leaf(e: BaseException) -> BaseException:
    """The first real error inside the exception groups anyio's task groups wrap errors in."""
    while getattr(e, "exceptions", None):   # BaseExceptionGroup (a backport's on Python 3.10)
        e = e.exceptions[0]
    return e


def _describe(e: BaseException, spec: ServerSpec) -> str:
    e = _leaf(e)
    if isinstance(e, FileNotFoundError) and spec.command:
        return f"cannot start {spec.command!r}: no such program (is it installed, and on PATH?)"
    if isinstance(e, PermissionError) and spec.command:
        return f"cannot start {spec.command!r}: permission denied"
    text = " ".join(str(e).split())[:300]
    name = type(e).__name__
    if name == "MCPError" and text:
        return text
    return f"{name}: {text}" if text else name


def content_text(result: dict) -> str:
    """What the model reads of a tools/call result: its text blocks, the text of embedded resources,
    a line for each link, image or audio, and the structured content where nothing else was given."""
    parts = []
    for block in result.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind == "resource":
            res = block.get("resource") or {}
            parts.append(res["text"] if "text" in res else f"[binary resource {res.get('uri', '')} "
                                                            f"({res.get('mimeType', 'unknown type')})]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.get('name') or ''} {block.get('uri', '')}]".replace("  ", " "))
        elif kind in ("image", "audio"):
            parts.append(f"[{kind}: {block.get('mimeType', 'unknown type')}, "
                         f"{len(block.get('data') or '') * 3 // 4} bytes]")
    if not any(p.strip() for p in parts) and result.get("structuredContent") is not None:
        parts = [json.dumps(result["structuredContent"], ensure_ascii=False)]
    return "\n".join(p for p in parts if p)


class Connection:
    """A server's connection: its state, its tools (as the server lists them), and calls to them."""

    def __init__(self, spec: ServerSpec, log_path: Path):
        self.spec = spec
        self.launched = spec.launch()          # what it starts with; McpServers.reload compares mcp.json to it
        self.log_path = Path(log_path)
        self.state = DISABLED if spec.disabled else NOT_STARTED
        self.error: str | None = None
        self.tools: list[dict] = []            # each tool's JSON as listed: name, description, inputSchema, ...
        self._session = None
        self._task: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self._log = None
        self.noise: str | None = None          # a line the server wrote on stdout that is not JSON-RPC
        self._lock = threading.Lock()
        _live.add(self)

    # ---- starting and stopping -------------------------------------------------------------
    def start(self) -> bool:
        """Start the server if it is not running; False (with `error`) if it cannot. A server that failed
        to start stays failed until `restart()`; one that exited after running is started again."""
        with self._lock:
            if self.state == RUNNING:
                return True
            if self.state in (FAILED, DISABLED):
                return False
            self.state, self.error = STARTING, None
            quiet_sdk_logging(self.log_path.parent / "sdk.log")
            loop = _Loop.shared()
            if self._task is not None and not self._task.done():   # a server that exited: end its task first
                loop.run(self._finish(self._task), STOP_WAIT_S + 1)
            self._close_log()
            loop.run(self._start())
            return self.state == RUNNING

    def restart(self) -> bool:
        self.stop()
        with self._lock:
            self.state = DISABLED if self.spec.disabled else NOT_STARTED
        return self.start() if not self.spec.disabled else False

    def stop(self) -> None:
        task = self._task
        if task is not None and not task.done():
            loop = _Loop.shared()
            try:
                loop.run(self._finish(task), STOP_WAIT_S + 1)
            except Exception:
                pass
        self._task = None
        if self.state in (RUNNING, STARTING):
            self.state = STOPPED
        self._close_log()

    async def _finish(self, task: asyncio.Task) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_WAIT_S)
        except (asyncio.TimeoutError, Exception):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())   # read, so asyncio never warns
        self._stop = asyncio.Event()
        self._task = loop.create_task(self._run(ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.spec.timeout)
        except asyncio.TimeoutError:
            self._fail(f"no answer after {self.spec.timeout:g} s while starting")
        except BaseException as e:
            self._fail(_describe(e, self.spec))
        if self.state != RUNNING:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def _fail(self, why: str) -> None:
        if why == "Connection closed":
            why = "the server closed the connection before answering (it exited at start)"
        last = self.stderr_tail(1)
        if self.noise:
            why += f"; it wrote {self.noise!r} on stdout, which is not MCP (a server keeps stdout for the protocol)"
        elif last and last[0] not in why:
            why += f" (its last words on stderr: {last[0]})"
        self.state, self.error = FAILED, why

    async def _on_message(self, message) -> None:
        """The SDK hands us what it could not read as JSON-RPC: keep the line, for the error it explains."""
        if isinstance(message, Exception):
            m = re.search(r"input_value='(.{0,80})", str(message))
            self.noise = (m.group(1).split("', input_type")[0] if m else str(message).splitlines()[0])[:80]

    async def _run(self, ready: asyncio.Future) -> None:
        from mcp import ClientSession
        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await self._transport(stack)
                session = await stack.enter_async_context(ClientSession(read, write, message_handler=self._on_message))
                await session.initialize()
                self.tools = await _list_tools(session)
                self._session, self.state = session, RUNNING
                ready.set_result(True)
                await self._stop.wait()
        except asyncio.CancelledError:
            if not ready.done():
                ready.cancel()
            raise
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else RuntimeError(_describe(e, self.spec)))
            elif self.state == RUNNING:
                self.state, self.error = EXITED, _describe(e, self.spec)
        finally:
            self._session = None

    async def _transport(self, stack: contextlib.AsyncExitStack):
        spec = self.spec
        if spec.transport == "stdio":
            from mcp import StdioServerParameters, stdio_client
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")   # the server's stderr, for the Plugins panel
            params = StdioServerParameters(command=spec.command, args=list(spec.args), env=dict(spec.env) or None)
            streams = await stack.enter_async_context(stdio_client(params, errlog=self._log))
        elif spec.transport == "sse":
            from mcp.client.sse import sse_client
            streams = await stack.enter_async_context(sse_client(spec.url, headers=dict(spec.headers) or None,
                                                                 timeout=spec.timeout))
        else:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client
            client = await stack.enter_async_context(httpx2.AsyncClient(
                headers=dict(spec.headers), timeout=httpx2.Timeout(spec.timeout, read=max(300.0, spec.timeout))))
            streams = await stack.enter_async_context(streamable_http_client(spec.url, http_client=client))
        return streams[0], streams[1]

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def stderr_tail(self, lines: int = 50) -> list[str]:
        """The last lines the server wrote on stderr (its log), newest last."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return [ln.rstrip("\n") for ln in f.readlines()[-lines:] if ln.strip()][-lines:]
        except OSError:
            return []

    # ---- calls ------------------------------------------------------------------------------
    def call(self, tool: str, arguments: dict) -> dict:
        """{"ok": True, "result": text} or {"ok": False, "error": one line}. Never raises."""
        if not self.start():
            return {"ok": False, "error": f"MCP server {self.spec.name!r} is not running: {self.error}"}
        try:
            return _Loop.shared().run(self._call(tool, arguments), self.spec.timeout + STOP_WAIT_S)
        except Exception as e:   # the loop itself failed us: still an answer, not a crash
            return {"ok": False, "error": f"{self.spec.name}.{tool}: {_describe(e, self.spec)}"}

    async def _call(self, tool: str, arguments: dict) -> dict:
        where = f"{self.spec.name}.{tool}"
        session = self._session
        if session is None:
            return {"ok": False, "error": f"{where}: the server is not running ({self.error or self.state})"}
        try:
            result = await asyncio.wait_for(session.call_tool(tool, arguments), self.spec.timeout)
        except asyncio.TimeoutError:
            noise = f" (it wrote {self.noise!r} on stdout, which is not MCP)" if self.noise else ""
            return {"ok": False, "error": f"{where}: no answer after {self.spec.timeout:g} s{noise}"}
        except Exception as e:
            why = _describe(e, self.spec)
            if self._task is None or self._task.done() or "closed" in why.lower():
                self.state, self.error = EXITED, why
            return {"ok": False, "error": f"{where}: {why}"}
        data = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        text = content_text(data)
        if data.get("isError"):
            return {"ok": False, "error": f"{where}: {' '.join(text.split())[:500] or 'the tool reported an error'}"}
        return {"ok": True, "result": text}


async def _list_tools(session) -> list[dict]:
    """Every tool, following the listing's pages."""
    from mcp import types
    tools, cursor = [], None
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = (await session.list_tools(params=params)).model_dump(mode="json", by_alias=True, exclude_none=True)
        tools += page.get("tools") or []
        cursor = page.get("nextCursor")
        if not cursor:
            return tools
