"""Old import paths, kept for one release after core/ was split into sub-packages.

Plugins written against Sol 0.1 import `sol.core.hooks`, `sol.core.store`, `sol.core.plugins`,
`sol.core.engine`, `sol.core.checkpoint`, `sol.core.model` or `sol.core.tokenizer`. Those names still
resolve, each with a DeprecationWarning that gives its new module; Sol 0.2 removes them. Sol's own
code and tests import the new paths (a monkeypatch on an old path would patch nothing that runs).
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

REMOVED_IN = "0.2"


def forward(old: str, *new: str, package_path=None):
    """A module-level __getattr__ for the old module `old`: each name is looked up in the new modules,
    in order. In a package (`package_path`), a submodule's name is left to the import system."""
    submodules = {m.name for m in pkgutil.iter_modules(package_path)} if package_path else set()

    def __getattr__(name: str):
        if name.startswith("__") or name in submodules:
            raise AttributeError(name)
        for target in new:
            module = importlib.import_module(target)
            if hasattr(module, name):
                value = getattr(module, name)
                home = getattr(value, "__module__", None)   # where a class or function is defined
                home = home if isinstance(home, str) and home.startswith("sol.core.") else target
                warnings.warn(f"{old}.{name} has moved to {home}.{name}; import it from there "
                              f"(the old path goes in Sol {REMOVED_IN})", DeprecationWarning, stacklevel=2)
                sys.modules[old].__dict__[name] = value   # once a name: later uses do not warn again
                return value
        raise AttributeError(f"module {old!r} has no attribute {name!r}")
    return __getattr__
