"""Plugin manager panel: see every plugin, its hooks and errors; enable, disable, install.
The Qt panel in `panel.py` is imported only by the GUI."""
from sol.core.plugins.hooks import PanelSpec, hookimpl

NAME = "plugin-manager"
VERSION = "0.1.0"


def _factory(ctx):
    from .panel import PluginsPanel
    return PluginsPanel(ctx)


@hookimpl
def sol_panels():
    return [PanelSpec(name="plugins", title="Plugins", factory=_factory, icon="plugins.svg", order=90)]
