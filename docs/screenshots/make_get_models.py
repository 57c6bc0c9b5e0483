"""docs/screenshots/get-models.png: the Get models view against the tests' local stand-in of the Hub
(tests/hub_standin.py), after a search, with one download done and one under way.

    xvfb-run -a -s "-screen 0 1400x900x24" python docs/screenshots/make_get_models.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def wait(app, condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise SystemExit("timed out")
        app.processEvents()
        time.sleep(0.02)


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="sol-shot-"))
    os.environ.update(SOL_HOME=str(home), HF_HOME=str(home / "hf"))
    from hub_standin import GGUF_REPO, StandIn, build_repos
    hub = StandIn()
    for repo in build_repos(home / "repos"):
        hub.add(repo)
    os.environ["HF_ENDPOINT"] = hub.url

    from sol.app.main import application, build_window
    app = application()
    win, ctx = build_window()
    win.resize(1400, 900)
    win.show()
    win.show_panel("get")
    panel = win.panel("get")
    panel.query.setText("tiny")
    panel.search()
    wait(app, lambda: panel.results and panel.is_ready())
    row = [e["repo"] for e in panel.results].index(GGUF_REPO)
    panel.table.selectRow(row)
    done = ctx.downloads.add(GGUF_REPO, "tiny-llama-Q8_0.gguf")
    wait(app, lambda: done.state == "done")
    hub.slow(GGUF_REPO, "tiny-llama-F32.gguf", 0.25)
    going = ctx.downloads.add(GGUF_REPO, "tiny-llama-F32.gguf")
    panel.file.setCurrentIndex(panel.file.findData("tiny-llama-F32.gguf"))
    wait(app, lambda: going.fraction >= 0.45)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    out = ROOT / "docs" / "screenshots" / "get-models.png"
    print("saved" if win.grab().save(str(out)) else "could not save", out)
    ctx.downloads.cancel(going)
    wait(app, lambda: going.state == "cancelled")
    win.close()
    hub.close()


if __name__ == "__main__":
    main()
