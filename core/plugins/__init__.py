"""Plugins as core sees them: the hook specifications a plugin implements (hooks) and the manager that
finds, loads, isolates and calls them (manager). The built-in plugins themselves live in sol.plugins.

`sol.core.plugins` was one module before this package; its names still resolve here, with a
DeprecationWarning, until Sol 0.2 (core/_moved.py). Import them from sol.core.plugins.manager.
"""
from .._moved import forward

__getattr__ = forward(__name__, "sol.core.plugins.manager", package_path=__path__)
