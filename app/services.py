"""The core services the window hands to its PanelContext: store and plugin manager.

Both live in core; this module only creates them and degrades gracefully when
one is missing or fails (the window still opens and says why).
"""
from __future__ import annotations

import importlib
import pkgutil
import traceback


def make_store():
    """(store, problem): a damaged sol.db is left untouched and new chats go to a fresh database beside
    it; `problem` says so (the window shows it). (None, problem) only when no database can be opened."""
    try:
        from sol.core.chat.store import open_or_fresh
    except ImportError:
        return None, None
    try:
        return open_or_fresh()
    except Exception as e:  # not even a fresh database: the window still opens and says why
        return None, f"No conversation database could be opened, so chats are not kept: {e}"


class BuiltinPanels:
    """Minimal stand-in for core's PluginManager when it is unavailable:
    asks each built-in plugin package for its panels, isolating failures."""

    def __init__(self):
        self.errors: dict[str, str] = {}

    def load(self):
        return self

    def panels(self):
        import sol.plugins as pkg
        specs = []
        for m in pkgutil.iter_modules(pkg.__path__):
            try:
                mod = importlib.import_module(f"{pkg.__name__}.{m.name}")
                hook = getattr(mod, "sol_panels", None)
                for s in (hook() if hook else []):
                    s.plugin = getattr(mod, "NAME", m.name)
                    specs.append(s)
            except Exception:
                self.errors[m.name] = traceback.format_exc()
        return specs

    def plugins(self):
        return []

    def tools(self):
        return []

    def chat_event(self, event):
        pass


def make_plugin_manager(safe_mode: bool | None = None):
    try:
        from sol.core.plugins.manager import PluginManager
    except ImportError:
        return BuiltinPanels()
    pm = PluginManager(safe_mode=safe_mode)
    pm.load()
    return pm
