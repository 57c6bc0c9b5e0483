"""The core services the window hands to its PanelContext: store and plugin manager.

Both live in core; this module only creates them and degrades gracefully when
one is missing or fails (the window still opens and says why).
"""
from __future__ import annotations

import importlib
import pkgutil
import traceback


def make_store():
    try:
        from sol.core.store import Store
    except ImportError:
        return None
    try:
        return Store()
    except Exception as e:  # a corrupt database must not stop the window opening
        print(f"warning: the store could not open: {e}")
        return None


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
        from sol.core.plugins import PluginManager
    except ImportError:
        return BuiltinPanels()
    pm = PluginManager(safe_mode=safe_mode)
    pm.load()
    return pm
