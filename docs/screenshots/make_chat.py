"""docs/screenshots/chat.png and chat-explain.png: the starter asked two sums, the calculator card,
then the answer's tokens with its first token explained (where the model picks how to phrase it) (`sol gui --screenshot`
cannot type or click, so this drives the same window).

    SOL_HOME=$(mktemp -d) xvfb-run -a -s "-screen 0 1400x900x24" \
        python docs/screenshots/make_chat.py [MODEL]      # MODEL: resources/models/starter
"""
import sys

from sol.core.formats.checkpoint import load_model

from window import ctx, spin, win  # noqa: E402 (the shared window)

ctx.set_model(load_model(sys.argv[1] if len(sys.argv) > 1 else "resources/models/starter"))
win.show_panel("chat")
chat = win.panel("chat")
chat.new_chat()
chat.params.seed.setValue(7)
for question in ("what is 12 times 7?", "what is 345 plus 12?"):
    chat.send(question)
    spin(60, lambda: not chat.busy)
spin(1)
win.grab().save("docs/screenshots/chat.png")
print("saved docs/screenshots/chat.png")

answer = [b for b in chat.bubbles if hasattr(b, "tokens") and b.tokens][-1]
answer.tokens_btn.setChecked(True)
chat._explain(answer.tokens[0])
spin(1)
win.grab().save("docs/screenshots/chat-explain.png")
print("saved docs/screenshots/chat-explain.png")
