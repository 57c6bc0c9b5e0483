"""Sol's headless engine, in rooms by concern; docs/architecture.md is the map.

Nothing under core/ imports Qt, sol.app or sol.plugins (one exception: `sol gui` starts the app), and a
sub-package imports only the layers below it; .importlinter states both and tests/test_layers.py checks.
"""
