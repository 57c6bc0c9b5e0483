"""docs/screenshots/chat-explain.png: an answer in the tokens view with one token explained
(`sol gui --screenshot` cannot click, so this drives the same window).

    xvfb-run -s "-screen 0 1400x900x24" python docs/screenshots/make_explain.py MODEL
"""
import sys
import time

from PySide6.QtWidgets import QApplication

from sol.app.main import build_window
from sol.core.checkpoint import load_model

win, ctx = build_window()
win.resize(1400, 860)
win.show()
app = QApplication.instance()


def spin(seconds, until=lambda: False):
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not until():
        app.processEvents()
        time.sleep(0.01)


ctx.set_model(load_model(sys.argv[1]))
win.show_panel("chat")
chat = win.panel("chat")
chat.new_chat()
chat.params.max_tokens.setValue(40)
chat.params.seed.setValue(11)
chat.send("Speak, speak.")
spin(60, lambda: not chat.busy)
answer = [b for b in chat.bubbles if hasattr(b, "tokens")][-1]
answer.tokens_btn.setChecked(True)
chat._explain(answer.tokens[5])
spin(1)
win.grab().save("docs/screenshots/chat-explain.png")
print("saved docs/screenshots/chat-explain.png")
