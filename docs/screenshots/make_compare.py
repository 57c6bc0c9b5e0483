"""docs/screenshots/compare.png: the Compare panel in blind mode after a vote, the starter beside the
word-level model (`sol gui --screenshot` cannot type or click, so this drives the same window). A few
comparisons are voted on first, so the win-rate table has something to count.

    SOL_HOME=$(mktemp -d) xvfb-run -a -s "-screen 0 1400x900x24" python docs/screenshots/make_compare.py [A B]
"""
import sys
from pathlib import Path

from sol.core.formats.checkpoint import load_model

a, b = sys.argv[1:3] if len(sys.argv) > 2 else ("resources/models/starter", "resources/models/words")
from window import ctx, spin, win  # noqa: E402 (the shared window)

def column_of(model: str) -> str:
    """The label of the blind column that shows `model`."""
    return next(label for label, m in zip("AB", panel.run["order"])
                if Path(panel.run["models"][m][1]).resolve() == Path(model).resolve())


ctx.set_model(load_model(a))
win.show_panel("compare")
panel = win.panel("compare")
spin(2, lambda: panel.pickers[1].count() > 1)
for picker, path in zip(panel.pickers, (a, b)):
    picker.setEditText(path)          # a listed model's folder: the column shows its listed name
panel.blind.setChecked(True)
panel.chat.setChecked(True)
panel.params.max_tokens.setValue(60)
panel.params.temperature.setValue(0.8)
prompts = ["what is 12 times 7?", "what is 345 plus 12?", "what is 9 times 8?"]
for k, prompt in enumerate(prompts):
    panel.params.seed.setValue(7 + k)
    panel.prompt.setPlainText(prompt)
    panel.start()
    spin(60, lambda: not panel.busy)
    if panel.error.isVisible():
        sys.exit(f"compare failed: {panel.error.text()}")
    panel.vote(column_of(a))             # the starter is better at sums; the last vote is the one shown
spin(3, lambda: panel.wins.rowCount() > 0)
spin(1)
win.grab().save("docs/screenshots/compare.png")
print("saved docs/screenshots/compare.png")
