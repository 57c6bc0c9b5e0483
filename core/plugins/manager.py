"""The plugin manager: find plugins, load them, call their hooks, never let one take Sol down.

Plugins come from two places:
- built-ins: every subpackage of `sol.plugins` (the repository's plugins/ folder);
- third-party distributions registering a module under the entry-point group
  `sol.plugins` (see docs/plugins.md).

Each import and each hook call runs inside its own try/except. A plugin that
raises is marked broken, with a one-line error and the traceback kept for
the GUI, and is skipped from then on; everything else keeps working.
Which plugins are disabled is kept in `plugins.json` in the data directory.
Safe mode (`--safe-mode`, or SOL_SAFE_MODE=1) loads no third-party plugin.

The tools of MCP servers (core/mcp, configured in mcp.json) join the plugins' tools here as
`SERVER.TOOL`, so the chat, `sol serve` and `sol tools` see one list; a call to one passes its trust
first (ask the user, allow, deny). Safe mode starts no MCP server either.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback as tb_module
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Callable

import pluggy

from ..errors import SolError
from .hooks import ENTRY_POINT_GROUP, PROJECT, PanelSpec, SolHookSpecs, StageSpec, ToolSpec

PROJECT_DIST = "sol-lab"   # Sol's distribution: its entry points are the built-in plugins
TOOL_TIMEOUT_S = 30.0
IMPORT_TIMEOUT_S = 10.0    # a third-party plugin that takes longer to import is marked broken


def import_timeout_s() -> float:
    try:
        return float(os.environ.get("SOL_PLUGIN_IMPORT_TIMEOUT", IMPORT_TIMEOUT_S))
    except ValueError:
        return IMPORT_TIMEOUT_S


def sol_version() -> str:
    try:
        return metadata.version(PROJECT_DIST)
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class McpToolSpec(ToolSpec):
    """A tool of an MCP server, named SERVER.TOOL; `plugin` is "mcp:SERVER"."""
    server: str = ""
    tool: str = ""
    trust: str = "ask"
    annotations: dict = field(default_factory=dict)


def safe_mode_from_env() -> bool:
    return os.environ.get("SOL_SAFE_MODE", "").strip().lower() in ("1", "true", "yes", "on")


def _entry_points() -> list:
    try:
        return list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:   # broken metadata somewhere in site-packages: no plugins rather than no Sol
        return []


def _is_sol(ep) -> bool:
    """An entry point of Sol's own distribution (a built-in plugin)."""
    dist = getattr(ep, "dist", None)
    name = dist.metadata["Name"] if dist is not None else ""
    return (name or "").lower().replace("_", "-") == PROJECT_DIST


def default_state_path() -> Path:
    from ..formats.registry import data_dir
    return data_dir() / "plugins.json"


@dataclass
class PluginInfo:
    name: str
    version: str
    builtin: bool
    enabled: bool
    status: str = "ok"                     # "ok" | "broken"
    error: str | None = None               # one line: what went wrong, or a note (safe mode, a shadowed tool)
    hooks: list[str] = field(default_factory=list)
    traceback: str | None = None           # the full traceback of a failure, for the GUI's details
    module: ModuleType | None = field(default=None, repr=False)
    dist: str | None = None                # the distribution to `pip uninstall`, for third-party plugins
    entry: str | None = None               # the entry-point name it was found under (failures are kept by it)

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "builtin": self.builtin, "enabled": self.enabled,
                "status": self.status, "error": self.error, "hooks": list(self.hooks)}


class _Pluggy(pluggy.PluginManager):
    """Accept plain functions named like a hook, too: forgetting @hookimpl should not silently do nothing."""

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("sol_") and callable(getattr(plugin, name, None)):
            return {}
        return opts


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class PluginManager:
    def __init__(self, safe_mode: bool | None = None, state_path: Path | None = None,
                 extra_modules: list[str | ModuleType] | None = None, mcp=None):
        """`extra_modules`: module names (or modules) loaded as third-party plugins; for tests and embedding.
        `mcp`: the MCP servers (core/mcp's McpServers); by default those of mcp.json in the data folder."""
        self.safe_mode = safe_mode_from_env() if safe_mode is None else bool(safe_mode)
        self.state_path = Path(state_path) if state_path else default_state_path()
        self.extra_modules = list(extra_modules or [])
        self._lock = threading.RLock()
        self._infos: dict[str, PluginInfo] = {}
        self._pm = _Pluggy(PROJECT)
        self._tools: dict[str, ToolSpec] = {}
        self._panels: list[PanelSpec] = []
        self._stages: list[StageSpec] = []
        self._loaded = False
        self._mcp = mcp
        self._noted: set[str] = set()

    # ---- state ---------------------------------------------------------------------
    def _disabled(self) -> set[str]:
        if not self.state_path.is_file():
            return set()
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            return set(data.get("disabled", []))
        except (OSError, ValueError, AttributeError):
            # A damaged state file must not stop Sol; every plugin starts enabled, the file is left as it is.
            return set()

    def _state(self) -> dict:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_disabled(self, disabled: set[str]) -> None:
        self._save_state({**self._state(), "disabled": sorted(disabled)})

    def _save_state(self, state: dict) -> None:
        from ..atomic import write_text
        try:
            write_text(self.state_path, json.dumps(state, indent=2) + "\n")
        except OSError:
            pass   # a read-only data folder costs the memory of it, never the command

    def _failures(self) -> dict:
        """Failures recorded in earlier runs: {plugin name: {"version", "error"}}."""
        f = self._state().get("failures")
        return f if isinstance(f, dict) else {}

    def _record_failure(self, info: PluginInfo) -> None:
        """A failure seen outside load() (a command, a chat event, a slow import) is kept in plugins.json,
        so `sol plugins list` and the Plugins panel of a later run show it too; `enable` clears it."""
        state = self._state()
        failures = state.get("failures") if isinstance(state.get("failures"), dict) else {}
        failures[info.entry or info.name] = {"version": info.version, "error": info.error}
        self._save_state({**state, "failures": failures})

    def _clear_failure(self, name: str) -> None:
        state = self._state()
        if isinstance(state.get("failures"), dict) and name in state["failures"]:
            del state["failures"][name]
            self._save_state(state)

    # ---- loading -------------------------------------------------------------------
    def load(self) -> None:
        """(Re)discover and load every plugin. Never raises because of a plugin."""
        with self._lock:
            importlib.invalidate_caches()   # a plugin pip just installed must be seen
            self._pm = _Pluggy(PROJECT)
            self._pm.add_hookspecs(SolHookSpecs)
            self._infos = {}
            disabled = self._disabled()
            self._earlier = self._failures()
            for name, loader, version in self._builtins():
                self._load_one(name, loader, version, builtin=True, disabled=disabled)
            for name, loader, version, dist in self._third_party():
                info = self._load_one(name, _with_time_limit(name, loader), version, builtin=False,
                                      disabled=disabled, skip=self.safe_mode)
                info.dist = dist
            self._collect()
            self._loaded = True

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def _builtins(self):
        """(name, loader, version) for each of Sol's own plugins. They register under the entry-point group
        every plugin uses (pyproject.toml), so core finds them without importing sol.plugins, the layer above
        it; what makes them built-in is that Sol's own distribution declares them."""
        found = [(ep.name, ep.load, None) for ep in _entry_points() if _is_sol(ep)]
        return sorted(found, key=lambda f: f[0])

    def _third_party(self):
        found = []
        for ep in _entry_points():
            if _is_sol(ep):
                continue
            dist = getattr(ep, "dist", None)
            found.append((ep.name, ep.load, dist.version if dist else "?", dist.name if dist else None))
        for m in self.extra_modules:
            if isinstance(m, ModuleType):
                found.append((getattr(m, "NAME", m.__name__), lambda m=m: m, getattr(m, "VERSION", "?"), None))
            else:
                found.append((m, lambda m=m: importlib.import_module(m), "?", None))
        return found

    def _load_one(self, name: str, loader: Callable, version: str | None, builtin: bool, disabled: set[str],
                  skip: bool = False) -> PluginInfo:
        info = PluginInfo(name, version or sol_version(), builtin, name not in disabled, entry=name)
        earlier = getattr(self, "_earlier", {}).get(name)
        if skip:
            info.error = "not loaded: safe mode"
        elif (not builtin and info.enabled and isinstance(earlier, dict)
              and earlier.get("version") == info.version):
            # It failed in an earlier run (a hung import, a raising command): not imported again until
            # `sol plugins enable NAME` or a new version.
            self._fail(info, f"{earlier.get('error')} (in an earlier run; `sol plugins enable {name}` "
                             "tries it again)", with_traceback=False)
        elif builtin or info.enabled:   # built-ins are imported even when disabled: their NAME is their identity
            try:
                module = loader()
                if any(i.module is module for i in self._infos.values()):
                    other = next(i.name for i in self._infos.values() if i.module is module)
                    raise _Duplicate(f"module {module.__name__} is already loaded as plugin {other!r} "
                                     "(registered under two entry-point names); remove one entry point")
                info.module = module
                info.name = str(getattr(module, "NAME", None) or name)
                info.version = str(getattr(module, "VERSION", None) or info.version)
            except _Duplicate as e:
                self._fail(info, str(e), with_traceback=False)
            except ImportTimeout as e:
                self._fail(info, str(e), with_traceback=False)
                self._record_failure(info)
            except BaseException as e:   # SystemExit and friends from a plugin are its failure, not ours
                if isinstance(e, KeyboardInterrupt):
                    raise
                self._fail(info, f"import failed: {_one_line(e)}")
        if info.name in self._infos:   # two plugins of one name: the first one wins
            other = info.name
            info.name = f"{info.name} ({'built-in' if builtin else 'third-party'} duplicate)"
            self._fail(info, f"another plugin is already named {other!r}", with_traceback=False)
        info.enabled = info.name not in disabled
        self._infos[info.name] = info
        if info.module is not None and info.enabled and info.status == "ok":
            try:
                self._pm.register(info.module, name=info.name)
                info.hooks = sorted(h.name for h in self._pm.get_hookcallers(info.module) or [])
                unknown = [h for h in info.hooks if not hasattr(SolHookSpecs, h)]
                if unknown:
                    raise SolError(f"unknown hook {unknown[0]!r}; Sol's hooks are "
                                   + ", ".join(h for h in dir(SolHookSpecs) if h.startswith("sol_")))
            except Exception as e:
                self._fail(info, f"cannot register: {_one_line(e)}")
        return info

    def _fail(self, info: PluginInfo, message: str, with_traceback: bool = True) -> None:
        """Mark a plugin broken and take it out of every further hook call."""
        with self._lock:
            info.status = "broken"
            info.error = message
            if with_traceback:
                info.traceback = tb_module.format_exc()
            if info.module is not None and self._pm.is_registered(info.module):
                try:
                    self._pm.unregister(info.module)
                except Exception:
                    pass

    def _call(self, hook: str, **kwargs) -> list[tuple[PluginInfo, object]]:
        """Call one hook on every plugin, each in its own try/except. Returns (plugin, result) pairs."""
        results = []
        for impl in list(getattr(self._pm.hook, hook).get_hookimpls()):
            info = self._infos.get(impl.plugin_name)
            if info is None or info.status != "ok":
                continue
            try:
                out = impl.function(*[kwargs[a] for a in impl.argnames])
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                self._fail(info, f"{hook} raised {_one_line(e)}")
                continue
            results.append((info, out))
        return results

    def _specs(self, hook: str, kind: type) -> list[tuple[PluginInfo, object]]:
        """A list-returning hook's items, checked: a plugin returning something else is broken."""
        out = []
        for info, items in self._call(hook):
            try:
                items = list(items or [])
                bad = next((x for x in items if not isinstance(x, kind)), None)
                if bad is not None:
                    raise TypeError(f"returned {type(bad).__name__}, expected {kind.__name__}")
                for x in items:
                    check_spec(x)
            except Exception as e:
                self._fail(info, f"{hook} {_one_line(e)}")
                continue
            out.extend((info, x) for x in items)
        return out

    def _collect(self) -> None:
        self._tools, self._panels, self._stages = {}, [], []
        for info, spec in self._specs("sol_tools", ToolSpec):
            spec.plugin = info.name
            if spec.name in self._tools:
                first = self._tools[spec.name].plugin
                info.error = f"tool {spec.name!r} skipped: plugin {first!r} provides it"
                if first != info.name and self._infos[first].status == "ok":
                    self._infos[first].error = (f"tool {spec.name!r} is also offered by plugin {info.name!r}; "
                                                "this one is used")
                continue
            self._tools[spec.name] = spec
        for info, spec in self._specs("sol_panels", PanelSpec):
            spec.plugin = info.name
            self._panels.append(spec)
        self._panels.sort(key=lambda p: (p.order, p.title))
        for info, spec in self._specs("sol_training_stages", StageSpec):
            spec.plugin = info.name
            self._stages.append(spec)
        # A plugin that broke in a later hook takes its earlier contributions with it.
        ok = {n for n, i in self._infos.items() if i.status == "ok"}
        self._tools = {k: t for k, t in self._tools.items() if t.plugin in ok}
        self._panels = [p for p in self._panels if p.plugin in ok]
        self._stages = [s for s in self._stages if s.plugin in ok]

    # ---- what the GUI and the CLI use -------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        self._ensure_loaded()
        return list(self._infos.values())

    def plugin(self, name: str) -> PluginInfo:
        self._ensure_loaded()
        info = self._infos.get(name)
        if info is None:
            known = ", ".join(self._infos) or "none"
            raise SolError(f"no plugin named {name!r} (installed: {known}); see `sol plugins list`")
        return info

    def tools(self) -> dict[str, ToolSpec]:
        """Every enabled plugin's tools, then the MCP servers' (their servers started on first need)."""
        self._ensure_loaded()
        tools = {k: t for k, t in self._tools.items() if self._infos[t.plugin].status == "ok"}
        for name, spec in self._mcp_tools().items():
            tools.setdefault(name, spec)
        return tools

    def tools_ready(self) -> bool:
        """Whether tools() answers at once: the plugins are loaded and no MCP server would start first
        (sol serve asks on its event loop, and calls tools() on a thread only when this says no)."""
        return self._loaded and (self.safe_mode or (self._mcp is not None and not self._mcp.pending()))

    # ---- MCP servers' tools --------------------------------------------------------------------
    @property
    def mcp(self):
        """The MCP servers of mcp.json beside sol.db (core/mcp), or None in safe mode."""
        if self._mcp is None and not self.safe_mode:
            from ..mcp.servers import McpServers
            self._mcp = McpServers()
        return self._mcp

    def _mcp_tools(self) -> dict[str, McpToolSpec]:
        if self.mcp is None or not self.mcp.names():
            return {}
        return {name: McpToolSpec(t.name, t.description, t.parameters, func=None, plugin=f"mcp:{t.server}",
                                  server=t.server, tool=t.tool, trust=t.trust, annotations=t.annotations)
                for name, t in self.mcp.tools().items()}

    def tool_notes(self) -> list[str]:
        """Lines the user should see once: an MCP server that failed, an mcp.json that could not be read."""
        if self.mcp is None:
            return []
        notes = self.mcp.failures()
        if self.mcp.error and self.mcp.error not in self._noted:
            self._noted.add(self.mcp.error)
            notes.insert(0, f"MCP servers are off: {self.mcp.error}")
        return notes

    def _call_mcp(self, tool: McpToolSpec, arguments: dict, consent, override_deny: bool) -> dict:
        """Trust first: `deny` is never sent, `ask` goes to `consent(name, arguments)` ("allow", "always" or
        "deny"; no one to ask is a deny), "always" is remembered in mcp.json."""
        if tool.trust == "deny" and not override_deny:
            return {"ok": False, "error": f"{tool.name}: the user's trust setting denies this tool "
                                          f"(`sol mcp trust {tool.name} ask` lets the model ask)"}
        if tool.trust == "ask":
            try:
                answer = consent(tool.name, arguments) if consent is not None else "deny"
            except Exception:   # a consent prompt that broke is a no
                answer = "deny"
            if answer == "always":
                self.mcp.config.set_trust(tool.name, "allow")
            elif answer != "allow":
                return {"ok": False, "error": f"{tool.name}: the user did not allow this call"}
        return self.mcp.call(tool.server, tool.tool, arguments)

    def tool_schemas(self) -> list[dict]:
        """The tools in the OpenAI/Hugging Face form chat templates take as `tools=`."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in self.tools().values()]

    def call_tool(self, name: str, arguments: dict, timeout_s: float = TOOL_TIMEOUT_S, consent=None,
                  override_deny: bool = False) -> dict:
        """{"ok": True, "result": ...} or {"ok": False, "error": "..."}. Never raises.

        The tool runs on its own daemon thread so one that hangs cannot hang the chat: after
        `timeout_s` we answer with an error and leave it behind. An MCP tool passes its trust first
        (`consent`, `override_deny`: see _call_mcp) and runs under its server's own timeout."""
        tools = self.tools()
        tool = tools.get(name)
        if tool is None:
            server = name.partition(".")[0]
            if "." in name and self.mcp is not None and server in self.mcp.names():
                why = self.mcp.connection(server).error or "it is disabled (sol mcp enable " + server + ")"
                return {"ok": False, "error": f"{name}: MCP server {server!r} is not available: {why}"}
            return {"ok": False, "error": f"no tool named {name!r}; available: {', '.join(tools) or 'none'}"}
        if not isinstance(arguments, dict):
            return {"ok": False, "error": f"{name}: arguments must be a JSON object, not {type(arguments).__name__}"}
        missing = [p for p in tool.parameters.get("required", []) if p not in arguments]
        if missing:
            return {"ok": False, "error": f"{name}: missing argument {missing[0]!r}"}
        if isinstance(tool, McpToolSpec):
            return self._call_mcp(tool, arguments, consent, override_deny)
        box: dict = {}

        def run():
            try:
                box["result"] = tool.func(arguments)
            except BaseException as e:   # a tool's failure is an answer the model reads, not a crash
                box["error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        t = threading.Thread(target=run, name=f"sol-tool-{name}", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            return {"ok": False, "error": f"{name}: no answer after {timeout_s:g} s"}
        if "error" in box:
            return {"ok": False, "error": box["error"]}
        result = box.get("result")
        try:
            json.dumps(result)
        except (TypeError, ValueError):
            result = str(result)
        return {"ok": True, "result": result}

    def panels(self) -> list[PanelSpec]:
        self._ensure_loaded()
        return [p for p in self._panels if self._infos[p.plugin].status == "ok"]

    def create_panel(self, spec: PanelSpec, context) -> object | None:
        """Call a panel's factory; a factory that raises marks its plugin broken and gives None."""
        info = self._infos.get(spec.plugin)
        try:
            return spec.factory(context)
        except Exception as e:
            if info is not None:
                self._fail(info, f"panel {spec.name!r} failed: {_one_line(e)}")
            return None

    def training_stages(self) -> list[StageSpec]:
        self._ensure_loaded()
        return [s for s in self._stages if self._infos[s.plugin].status == "ok"]

    def chat_event(self, event: dict) -> None:
        """Show a chat event to every plugin that observes the chat; one that raises is broken and skipped."""
        self._ensure_loaded()
        self._call_recorded("sol_chat_event", event=event)

    def add_cli_commands(self, subparsers) -> None:
        self._ensure_loaded()
        self._call_recorded("sol_cli_commands", subparsers=subparsers)

    def _call_recorded(self, hook: str, **kwargs) -> None:
        """A hook called after load(): a plugin that breaks here is remembered across runs."""
        ok = {n for n, i in self._infos.items() if i.status == "ok"}
        self._call(hook, **kwargs)
        for name in ok:
            info = self._infos[name]
            if info.status != "ok" and not info.builtin:
                self._record_failure(info)

    # ---- enable, disable, install, uninstall ------------------------------------------
    def enable(self, name: str) -> None:
        self._set_enabled(name, True)

    def disable(self, name: str) -> None:
        self._set_enabled(name, False)

    def _set_enabled(self, name: str, enabled: bool) -> None:
        self.plugin(name)   # names an unknown plugin
        if enabled:
            self._clear_failure(self.plugin(name).entry or name)
        disabled = self._disabled()
        (disabled.discard if enabled else disabled.add)(name)
        self._save_disabled(disabled)
        self.load()

    def install(self, spec: str, on_output: Callable[[str], None] = print, pip_args: list[str] | None = None) -> int:
        """`pip install SPEC` (a folder, a wheel, or a name) into this Python, keeping sol-lab at its version.
        pip's output goes to `on_output` line by line. Returns pip's exit code."""
        spec = spec.strip()
        if not spec or spec.startswith("-"):
            raise SolError(f"plugin {spec!r}: give a folder, a wheel file or a package name (not a pip option)")
        fd, constraints = tempfile.mkstemp(prefix="sol-constraints-", suffix=".txt")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"sol-lab=={sol_version()}\n")
            cmd = [sys.executable, "-m", "pip", "install", "--constraint", constraints, *(pip_args or []), spec]
            code = run_streaming(cmd, on_output)
        finally:
            Path(constraints).unlink(missing_ok=True)
        self.load()
        return code

    def uninstall(self, name: str, on_output: Callable[[str], None] = print) -> int:
        """`pip uninstall -y` the distribution that provides plugin `name`."""
        info = self.plugin(name)
        if info.builtin:
            raise SolError(f"plugin {name!r} is built into Sol and cannot be uninstalled; "
                           f"use `sol plugins disable {name}`")
        if not info.dist:
            raise SolError(f"plugin {name!r} does not come from an installed distribution; nothing to uninstall")
        code = run_streaming([sys.executable, "-m", "pip", "uninstall", "-y", info.dist], on_output)
        self.load()
        return code


def run_streaming(cmd: list[str], on_output: Callable[[str], None]) -> int:
    """Run a command, handing each line of its output (stdout and stderr together) to on_output."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", bufsize=1, env=env)
    except OSError as e:
        raise SolError(f"cannot run {cmd[0]}: {e}") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        on_output(line.rstrip("\n"))
    return proc.wait()


def add_cli_commands(subparsers) -> None:
    """Called by core/cli.py while it builds the parser: plugins add their `sol` subcommands."""
    safe = safe_mode_from_env() or "--safe-mode" in sys.argv[1:]
    try:
        PluginManager(safe_mode=safe).add_cli_commands(subparsers)
    except Exception:
        # The `sol` command must always start, whatever a plugin (or its state file) does.
        pass


class _Duplicate(Exception):
    pass


class ImportTimeout(Exception):
    pass


def _with_time_limit(name: str, loader: Callable) -> Callable:
    """Import a third-party plugin on its own thread: one that hangs at import is left behind after the
    time limit (as a daemon thread, which does not keep Sol from exiting) instead of hanging Sol."""
    def load():
        box: dict = {}

        def run():
            try:
                box["module"] = loader()
            except BaseException as e:
                box["error"] = e
        limit = import_timeout_s()
        t = threading.Thread(target=run, name=f"sol-plugin-import-{name}", daemon=True)
        t.start()
        t.join(limit)
        if t.is_alive():
            raise ImportTimeout(f"import took longer than {limit:g} s; marked broken")
        if "error" in box:
            raise box["error"]
        return box["module"]
    return load


def _is_cli_name(s) -> bool:
    import re
    return isinstance(s, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", s) is not None


def check_spec(spec) -> None:
    """Every field of a ToolSpec, PanelSpec or StageSpec of the right kind, checked when plugins load:
    a tool named None broke `sol tools list` for everyone. Raises TypeError naming the field."""
    kind = type(spec).__name__

    def bad(field: str, want: str):
        raise TypeError(f"{kind}.{field} must be {want}, not {getattr(spec, field)!r}")
    if not _is_cli_name(spec.name):
        bad("name", "a non-empty name of letters, digits, '_', '.' or '-'")
    if isinstance(spec, ToolSpec):
        if not isinstance(spec.description, str):
            bad("description", "a string")
        if not isinstance(spec.parameters, dict) or spec.parameters.get("type", "object") != "object":
            bad("parameters", 'a JSON schema object, {"type": "object", "properties": {...}}')
        req = spec.parameters.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise TypeError(f"ToolSpec.parameters['required'] must be a list of names, not {req!r}")
        try:
            json.dumps(spec.parameters)
        except (TypeError, ValueError):
            bad("parameters", "JSON-able")
        if not callable(spec.func):
            bad("func", "callable")
    elif isinstance(spec, PanelSpec):
        if not isinstance(spec.title, str) or not spec.title:
            bad("title", "a non-empty string")
        if not callable(spec.factory):
            bad("factory", "callable")
        if spec.icon is not None and not isinstance(spec.icon, str):
            bad("icon", "a file name or None")
        if not isinstance(spec.order, (int, float)) or isinstance(spec.order, bool):
            bad("order", "a number")
    elif isinstance(spec, StageSpec):
        if not isinstance(spec.description, str):
            bad("description", "a string")
        if not callable(spec.add_arguments):
            bad("add_arguments", "callable")
        if not callable(spec.run):
            bad("run", "callable")


def normalize_dist(name: str) -> str:
    import re
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_of_spec(spec: str) -> str | None:
    """The distribution a `sol plugins install` spec names: a folder's pyproject name, a wheel's file
    name, or the requirement's name; None when it cannot be told."""
    import re
    p = Path(spec).expanduser()
    if p.is_dir():
        try:
            import tomllib
        except ImportError:   # Python 3.10
            return None
        try:
            return tomllib.loads((p / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if p.suffix == ".whl":
        return p.name.split("-")[0]
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    return m.group(1) if m and not p.exists() else None
