"""docs/screenshots/server.png: the Server panel serving the starter, after a few requests from
the openai client (`sol gui --screenshot` cannot click the switch, so this drives the same window).

    SOL_HOME=$(mktemp -d) xvfb-run -a -s "-screen 0 1400x900x24" python docs/screenshots/make_server.py
"""
import threading

from openai import OpenAI


from window import spin, win  # noqa: E402 (the shared window)

win.show_panel("server")
panel = win.panel("server")
panel.select_model(panel.model_box.itemData(panel.model_box.findText("starter")))
panel.port.setValue(8765)
panel.start()
spin(60, lambda: panel.state == "running")


def clients():
    c = OpenAI(base_url=panel.url + "/v1", api_key="none")
    c.chat.completions.create(model="starter", messages=[{"role": "user", "content": "what is 12 times 7?"}],
                              temperature=0)
    list(c.chat.completions.create(model="starter", messages=[{"role": "user", "content": "hello!"}],
                                   temperature=0.7, seed=1, stream=True))
    c.completions.create(model="starter", prompt="<|user|>hi<|end|><|assistant|>", max_tokens=16)
    c.embeddings.create(model="starter", input=["hello", "goodbye"])


t = threading.Thread(target=clients)
t.start()
spin(60, lambda: not t.is_alive())
spin(1)
win.grab().save("docs/screenshots/server.png")
print("saved docs/screenshots/server.png")
panel.shutdown()
