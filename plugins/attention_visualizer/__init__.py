"""Attention visualizer: which earlier tokens each token looks at, per layer and head
(the book's §4.5.1.3 step by step, §4.5.1.7 multi-head). Headless math in `compute.py`;
the Qt panel in `panel.py` is imported only by the GUI."""
from sol.core.plugins.hooks import PanelSpec, hookimpl

NAME = "attention-visualizer"
VERSION = "0.1.0"


def _factory(ctx):
    from .panel import AttentionPanel
    return AttentionPanel(ctx)


@hookimpl
def sol_panels():
    return [PanelSpec(name="attention", title="Attention", factory=_factory, icon="attention.svg", order=30)]
