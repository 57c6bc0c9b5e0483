"""`sol gui`: open the desktop app (`sol` alone does this)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("gui", help="open the desktop app")
    p.add_argument("--panel", default=None, help="panel to open (chat, models, server, tokens, embeddings, score, attention, lens, training, plugins)")
    p.add_argument("--model", default=None, help="model to load (default: the starter model)")
    p.add_argument("--screenshot", default=None, help="save a PNG of the window once loaded, then exit")
    p.add_argument("--safe-mode", action="store_true", help="load no third-party plugin")
    p.set_defaults(func=run)


def run(args) -> int:
    # The one import from core up into the GUI, late so that nothing else in core loads Qt; the layer
    # contract in .importlinter names it as its only exception.
    from sol.app.main import run as run_gui
    return run_gui(args)
