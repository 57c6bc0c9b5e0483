"""Embedding explorer: neighbours, analogies, a map, the same word in two contexts and the position
embeddings (the book's §2.6 and Box 7). The math is sol.core.introspect.embeddings (also `sol embed`); the Qt
panel in `panel.py` is imported only by the GUI."""
from sol.core.plugins.hooks import PanelSpec, hookimpl

NAME = "embedding-explorer"
VERSION = "0.1.0"


def _factory(ctx):
    from .panel import EmbeddingsPanel
    return EmbeddingsPanel(ctx)


@hookimpl
def sol_panels():
    return [PanelSpec(name="embeddings", title="Embeddings", factory=_factory, icon="embeddings.svg", order=22)]
