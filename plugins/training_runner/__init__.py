"""Training runner: start `sol train ...` as a child process and watch it learn (the book's §3.1, Box 6).
Headless helpers in `runs.py`; the Qt panel in `panel.py` is imported only by the GUI."""
from sol.core.plugins.hooks import PanelSpec, hookimpl

NAME = "training-runner"
VERSION = "0.1.0"


def _factory(ctx):
    from .panel import TrainingPanel
    return TrainingPanel(ctx)


@hookimpl
def sol_panels():
    return [PanelSpec(name="training", title="Training", factory=_factory, icon="training.svg", order=40)]
