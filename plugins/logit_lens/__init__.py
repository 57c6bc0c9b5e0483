"""Logit lens: what each layer would predict, a grid of layers × positions. The math is
sol.core.introspect.lens (also `sol lens`); the Qt panel in `panel.py` is imported only by the GUI."""
from sol.core.plugins.hooks import PanelSpec, hookimpl

NAME = "logit-lens"
VERSION = "0.1.0"


def _factory(ctx):
    from .panel import LensPanel
    return LensPanel(ctx)


@hookimpl
def sol_panels():
    return [PanelSpec(name="lens", title="Layers", factory=_factory, icon="lens.svg", order=35)]
