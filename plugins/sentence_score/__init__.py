"""Sentence score: the chain rule of the book's §2.9 on two sentences side by side. The math is
sol.core.introspect.score (also `sol score`); the Qt panel in `panel.py` is imported only by the GUI."""
from sol.core.plugins.hooks import PanelSpec, hookimpl

NAME = "sentence-score"
VERSION = "0.1.0"


def _factory(ctx):
    from .panel import ScorePanel
    return ScorePanel(ctx)


@hookimpl
def sol_panels():
    return [PanelSpec(name="score", title="Score", factory=_factory, icon="score.svg", order=25)]
