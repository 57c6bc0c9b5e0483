"""Judging models (issue 30): the Compare panel (2 to 4 models answer one prompt side by side, blind votes,
win rates and Elo) and the Evaluate panel (`sol eval` run as a child process, results across checkpoints).
The work is sol.core.evaluate's; the Qt panels are imported only by the GUI."""
from sol.core.plugins.hooks import PanelSpec, hookimpl

NAME = "evaluate"
VERSION = "0.1.0"


def _compare(ctx):
    from .compare_panel import ComparePanel
    return ComparePanel(ctx)


def _evaluate(ctx):
    from .eval_panel import EvaluatePanel
    return EvaluatePanel(ctx)


@hookimpl
def sol_panels():
    return [PanelSpec(name="compare", title="Compare", factory=_compare, icon="compare.svg", order=41),
            PanelSpec(name="evaluate", title="Evaluate", factory=_evaluate, icon="evaluate.svg", order=42)]
