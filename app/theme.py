"""Sol's palette: one dark theme, shared by Qt widgets and pyqtgraph plots."""
from __future__ import annotations

from PySide6.QtGui import QColor, QPalette

BG = "#16181d"
PANEL = "#1e2128"
RAISED = "#262a33"
BORDER = "#323743"
TEXT = "#e4e6eb"
MUTED = "#8b93a5"
ACCENT = "#f5a524"      # the sun
ACCENT2 = "#5aa9e6"
GOOD = "#4cc38a"
BAD = "#ef5b5b"

# Distinct, readable token colors on a dark background (alpha applied where drawn).
TOKEN_COLORS = ["#f5a524", "#5aa9e6", "#4cc38a", "#e66ab2", "#a98bf5", "#f07f4f", "#3cc9c4", "#d4cf4a"]


def apply_theme(app) -> None:
    import pyqtgraph as pg
    pg.setConfigOptions(background=PANEL, foreground=MUTED, antialias=False, imageAxisOrder="row-major")
    p = QPalette()
    for role, color in ((QPalette.Window, BG), (QPalette.WindowText, TEXT), (QPalette.Base, PANEL),
                        (QPalette.AlternateBase, RAISED), (QPalette.Text, TEXT), (QPalette.Button, RAISED),
                        (QPalette.ButtonText, TEXT), (QPalette.Highlight, ACCENT),
                        (QPalette.HighlightedText, "#111111"), (QPalette.ToolTipBase, RAISED),
                        (QPalette.ToolTipText, TEXT), (QPalette.PlaceholderText, MUTED), (QPalette.Link, ACCENT2)):
        p.setColor(role, QColor(color))
    app.setPalette(p)
