"""Tokenizer viewer: see how a text becomes tokens (the book's §2.5, Fig. 39).

Headless part: `spans.py` (token spans, counts). The Qt panel in `panel.py` is
imported only when the GUI builds the panel.
"""
from sol.core.plugins.hooks import PanelSpec, hookimpl

NAME = "tokenizer-viewer"
VERSION = "0.1.0"


def _factory(ctx):
    from .panel import TokenizerPanel
    return TokenizerPanel(ctx)


@hookimpl
def sol_panels():
    return [PanelSpec(name="tokens", title="Tokens", factory=_factory, icon="tokens.svg", order=20)]
