"""Deprecated: `sol.core.hooks` moved to `sol.core.plugins.hooks`. Its names still resolve here, with a
DeprecationWarning, until Sol 0.2 (see core/_moved.py)."""
from ._moved import forward

__getattr__ = forward(__name__, "sol.core.plugins.hooks")
