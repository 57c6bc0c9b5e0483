"""GUI tests (pytest-qt, offscreen): every panel does its one essential thing on a tiny model."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TEXT, make_tiny_model  # noqa: E402


def loaded(path):
    from sol.core.formats.checkpoint import load_model
    return load_model(path)


def test_the_installed_pyside6_keeps_its_references_to_none():
    # PySide6 6.12.0 under Python < 3.12 drops a reference to None on every void call and
    # crashes Sol within seconds of streaming; pyproject excludes it and `sol gui` refuses it.
    from sol.app.main import qt_binding_problem
    assert qt_binding_problem() is None


def test_window_lists_every_panel_and_the_device(window):
    win, ctx = window
    assert win.names()[:2] == ["chat", "models"]
    assert {"tokens", "attention", "training", "plugins"} <= set(win.names())
    assert win.device_label.text().startswith(("CPU", "GPU", "⚠"))
    assert win.model_label.text() == "no model loaded"


def test_a_panel_that_raises_shows_its_error_in_place(window):
    from sol.app.window import PanelError
    from sol.core.plugins.hooks import PanelSpec
    win, ctx = window
    win.specs.append(PanelSpec("bad", "Bad", lambda c: 1 / 0, None, 999, "sol"))
    win.stack.addWidget(__import__("PySide6.QtWidgets").QtWidgets.QWidget())
    w = win.panel("bad")
    assert isinstance(w, PanelError)
    assert win.panel("chat") is not None   # the rest still works


def test_chat_streams_a_reply_and_stop_ends_it(window, qtbot, tmp_path):
    win, ctx = window
    ctx.set_model(loaded(make_tiny_model(tmp_path / "m", context=1024)))
    chat = win.panel("chat")
    chat.params.max_tokens.setValue(900)
    chat.params.temperature.setValue(1.0)
    # A fixed draw whose answer is long (294 tokens): with a random one the tiny model sometimes
    # samples the end of the turn within the first tokens and the answer is over before it is seen.
    chat.params.seed.setValue(0)
    chat.send("Hello there")
    qtbot.waitUntil(lambda: chat.answer is not None and len(chat.answer.tokens) >= 3, timeout=30_000)
    answer = chat.answer
    assert chat.stop_btn.isEnabled()
    chat.stop()
    qtbot.waitUntil(lambda: not chat.busy, timeout=30_000)
    assert 3 <= len(answer.tokens) < 900
    assert answer.text                       # streamed text reached the widget
    assert chat.status.text() == "stopped"
    assert chat.send_btn.isEnabled()
    # the conversation is in the store and listed
    assert chat.list.count() == 1


def test_chat_finished_answer_has_stats_and_explains_a_token(window, qtbot, tmp_path):
    win, ctx = window
    ctx.set_model(loaded(make_tiny_model(tmp_path / "m")))
    chat = win.panel("chat")
    chat.params.max_tokens.setValue(8)
    chat.params.seed.setValue(3)
    chat.send("Hi")
    qtbot.waitUntil(lambda: not chat.busy, timeout=30_000)
    answer = [b for b in chat.bubbles if type(b).__name__ == "AnswerBubble"][-1]
    assert "tokens" in answer.stats.text() and "tok/s" in answer.stats.text()
    for ev in answer.tokens:
        # At the temperature it used, the view shows the sampler's own numbers: the draw passes the
        # chosen token's running sum and not the one before it (the book's rule, Fig. 56).
        chat._explain(ev)
        view, expl = chat.explain, ev["explanation"]
        bars = view.bars.opts["height"]
        assert np.allclose(bars, expl["probs"][:len(bars)])
        i = expl["index"]
        cum = view.cum.getData()[1]
        assert cum[i] > expl["draw"] * (1 - 1e-6) and (i == 0 or cum[i - 1] <= expl["draw"] * (1 + 1e-6))
        assert view.ids[i] == ev["id"] and f"would pick {view.labels[i]!r}" in view.summary.text()
    chat.explain.slider.setValue(300)       # hotter: flatter bars, renormalised among those shown
    flatter = chat.explain.bars.opts["height"]
    assert abs(float(np.sum(flatter)) - 1.0) < 1e-6
    assert max(flatter) / min(flatter) < max(bars) / min(bars)
    # reopened (after a restart) the answer's tokens can still be explained, with the same draw
    cid, n, draw = chat.conversation_id, len(answer.tokens), answer.tokens[-1]["explanation"]["draw"]
    chat.new_chat()
    chat.open_conversation(cid)
    again = [b for b in chat.bubbles if type(b).__name__ == "AnswerBubble" and b.isVisibleTo(chat)][-1]
    assert len(again.tokens) == n and not again.tokens_btn.isHidden()
    chat._explain(again.tokens[-1])
    assert f"random draw <b>{draw:.3f}</b>" in chat.explain.summary.text()
    assert ctx.last_answer == answer.text


def test_token_viewer_shows_one_span_per_token(window, qtbot, tmp_path):
    win, ctx = window
    ctx.set_model(loaded(make_tiny_model(tmp_path / "m", tokenizer="char")))
    panel = win.panel("tokens")
    qtbot.waitUntil(panel.is_ready, timeout=10_000)
    panel.input.setPlainText("Speak, speak.")
    panel.update_views()
    col = panel.a
    assert len(col.text_view.ranges) == 13         # a character tokenizer: one span per character
    assert len(col.ids_view.ranges) == 13
    assert col.counts.text().startswith("13 tokens · 13 characters · 2 words")
    col.hover(2)                                    # hover links both views
    assert col.text_view.lit == 2 and col.ids_view.lit == 2


def test_token_viewer_merges_a_character_split_across_tokens(tmp_path):
    from sol.core.formats.tokenizer import Tokenizer
    from sol.plugins.tokenizer_viewer.spans import counts, segments, token_segments
    tok = Tokenizer.from_file(make_tiny_model(tmp_path / "m") / "tokenizer.json")
    segs = token_segments(segments(tok, "a ẞ<|endoftext|>"))
    assert [s.text for s in segs] == ["a", " ", "ẞ", "<|endoftext|>"]
    assert len(segs[2].ids) == 3 and segs[3].special
    assert counts(tok, "a ẞ")["tokens"] == 5


def test_attention_heatmap_is_tokens_by_tokens_and_rows_sum_to_one(window, qtbot, tmp_path):
    win, ctx = window
    ctx.set_model(loaded(make_tiny_model(tmp_path / "m")))
    panel = win.panel("attention")
    panel.input.setPlainText("Before we proceed any further, hear me speak.")
    panel.run()
    panel.layer.setValue(1)
    panel.head.setCurrentIndex(2)                  # head 1
    qtbot.waitUntil(lambda: 1 in panel.layers, timeout=20_000)
    qtbot.waitUntil(lambda: panel.is_ready(), timeout=20_000)
    T = len(panel.ids)
    data = panel.heatmap.data
    assert T > 5 and data.shape == (T, T)
    assert np.allclose(data.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(data, 1), 0)        # causal: nothing attends to the future
    s = __import__("sol.plugins.attention_visualizer.compute", fromlist=["x"]).step_by_step(panel.layers[1], 1, T - 1)
    assert np.allclose(s["weights"], s["model_weights"], atol=1e-5)


def test_training_panel_runs_20_steps_and_plots(window, qtbot, tmp_path):
    from sol.plugins.training_runner.runs import command
    win, ctx = window
    panel = win.panel("training")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT * 3, encoding="utf-8")
    argv = command("pretrain", str(tmp_path / "out"), str(corpus),
                   options={"preset": "tiny", "context": 32, "batch_size": 4, "max_steps": 20, "eval_every": 10,
                            "sample_every": 10, "checkpoint_every": 0, "device": "cpu"})
    panel.run_argv(argv)
    qtbot.waitUntil(lambda: panel.state in ("done", "failed"), timeout=150_000)
    assert panel.state == "done", panel.log.toPlainText()[-2000:]
    xs, ys = panel.curves["loss"].getData()
    assert xs is not None and len(xs) >= 1 and xs[-1] == 20
    assert panel.progress.value() == 20
    import torch

    from sol.core.devices import training_precision
    expected = training_precision("auto", torch.device("cpu"))   # bf16 on a CPU with native bf16
    assert f"parameters, {expected} matrix products" in panel.log.toPlainText()
    # the run's events stay beside it: a new panel shows the same curves
    from sol.plugins.training_runner.panel import TrainingPanel
    again = TrainingPanel(ctx)
    qtbot.addWidget(again)
    assert again.state == "done" and len(again.series["loss"][0]) == len(panel.series["loss"][0])
    # ... with the form as that run was started, showing only the fields pretraining reads
    assert (again.steps.value(), again.batch.value(), again.context.value()) == (20, 4, 32)
    assert again.form.isRowVisible(again.preset) and not again.form.isRowVisible(again.reward)
    again.stage.setCurrentIndex(again.stage.findData("rl"))
    assert again.form.isRowVisible(again.reward) and not again.form.isRowVisible(again.preset)


def test_training_panel_shows_a_failed_run(window, qtbot, tmp_path):
    from sol.plugins.training_runner.runs import command
    win, ctx = window
    panel = win.panel("training")
    panel.run_argv(command("pretrain", str(tmp_path / "out"), str(tmp_path / "missing.txt"),
                           options={"max_steps": 5}))
    qtbot.waitUntil(lambda: panel.state in ("done", "failed"), timeout=60_000)
    assert panel.state == "failed"
    assert "missing.txt" in panel.error_label.text()


def test_batch_preview_has_end_of_text_separators(tmp_path):
    from sol.plugins.training_runner.runs import batch_preview
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 20, encoding="utf-8")
    b = batch_preview(str(tmp_path), "char", batch=4, context=32)
    assert len(b.rows) == 4 and all(len(r) == 32 for r in b.rows)
    assert any(eot for r in b.rows for _, eot in r)


def test_plugins_panel_lists_builtins_and_a_broken_plugin(window, qtbot, tmp_path, monkeypatch):
    from sol.core.plugins.manager import PluginManager
    from sol.plugins.plugin_manager.panel import PluginsPanel
    (tmp_path / "broken_sol_plugin.py").write_text(textwrap.dedent("""
        NAME = "broken-test"
        def sol_tools():
            raise RuntimeError("this plugin is broken on purpose")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    win, ctx = window
    pm = PluginManager(extra_modules=["broken_sol_plugin"])
    pm.load()
    pm.tools()
    ctx.plugins = pm
    panel = PluginsPanel(ctx)
    qtbot.addWidget(panel)
    names = [p.name for p in panel.infos]
    for builtin in ("tokenizer-viewer", "attention-visualizer", "training-runner", "plugin-manager"):
        assert builtin in names
        assert panel.state_of(builtin) == "enabled"
    assert panel.state_of("broken-test") == "broken"
    row = names.index("broken-test")
    assert "broken on purpose" in panel.table.item(row, 5).text()
    panel.table.selectRow(row)
    assert "RuntimeError" in panel.details.toPlainText()


def test_server_switch_starts_serves_and_stops_sol_serve(window, qtbot):
    # Before test_screenshot_saves_a_png_and_exits: once a test has run app.exec() and app.exit(), a
    # QProcess started later in the same QApplication never leaves the Starting state.
    import os
    import time
    import urllib.request

    from PySide6.QtCore import Qt
    win, ctx = window
    panel = win.panel("server")
    panel.select_model(panel.model_box.itemData(panel.model_box.findText("starter")))
    panel.port.setValue(0)
    qtbot.mouseClick(panel.switch, Qt.LeftButton)
    qtbot.waitUntil(lambda: panel.state in ("running", "failed"), timeout=60_000)
    assert panel.state == "running", panel.status.text()
    assert panel.url.startswith("http://127.0.0.1:") and panel.url in panel.curl.toPlainText()
    assert '"model": "starter"' in panel.curl.toPlainText() and panel.url in panel.python.toPlainText()
    body = json.dumps({"model": "starter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    req = urllib.request.Request(panel.url + "/v1/chat/completions", body.encode(),
                                 {"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
    assert reply["usage"]["completion_tokens"] >= 1
    qtbot.waitUntil(lambda: panel.log.rowCount() == 1, timeout=10_000)
    assert panel.log.item(0, 1).text() == "/v1/chat/completions" and panel.log.item(0, 2).text() == "200"
    proc = panel.proc
    qtbot.mouseClick(panel.switch, Qt.LeftButton)
    qtbot.waitUntil(lambda: panel.state == "stopped", timeout=10_000)
    assert panel.proc is None and proc is not None
    # Closing the window stops a server the panel started.
    panel.start()
    qtbot.waitUntil(lambda: panel.state == "running", timeout=60_000)
    pid = panel.proc.processId()
    win.close()
    with pytest.raises(ProcessLookupError):   # gone (and reaped) by the time close() returns
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)


def test_screenshot_saves_a_png_and_exits(tmp_path):
    # In its own process: `sol gui --screenshot` runs and quits a whole application, and doing that in
    # pytest's QApplication left later tests' threads and child processes never starting.
    import subprocess
    out = tmp_path / "shot.png"
    model = make_tiny_model(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "gui", "--panel", "models", "--model", str(model),
                        "--screenshot", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 1000


def test_training_commands_use_each_stage_flags():
    from sol.plugins.training_runner.runs import command
    assert command("sft", "o", "chat.jsonl", "base")[5:9] == ["--out", "o", "--data", "chat.jsonl"]
    rl = command("rl", "o", "p.jsonl", "sft", {"reward": "exact"})
    assert rl[rl.index("--prompts") + 1] == "p.jsonl" and rl[rl.index("--model") + 1] == "sft"
    assert command("pretrain", "o", "c.txt", "ignored", resume=True)[-3:] == ["--resume", "--events", "-"]
    assert "--model" not in command("pretrain", "o", "c.txt", "ignored")


def test_training_form_gives_rl_a_reward(window, qtbot, tmp_path):
    win, ctx = window
    panel = win.panel("training")
    panel.stage.setCurrentIndex(panel.stage.findData("rl"))
    assert panel.reward.isEnabled()
    assert panel.options()["reward"] == "calculator"
    rm = make_tiny_model(tmp_path / "rm")
    meta = json.loads((rm / "sol.json").read_text())
    (rm / "sol.json").write_text(json.dumps({**meta, "stage": "rm"}))
    panel._fill_models([{"name": "rm", "path": str(rm), "format": "sol"}])
    panel.reward.setCurrentIndex(panel.reward.findText("reward model: rm"))
    opts = panel.options()
    assert opts["reward_model"] == str(rm) and "reward" not in opts
    panel.stage.setCurrentIndex(panel.stage.findData("sft"))
    assert not panel.reward.isEnabled() and "reward" not in panel.options()


def test_tool_card_shows_arguments_and_result_and_collapses(qtbot):
    from sol.app.chat.messages import ToolCard
    card = ToolCard("calculator", {"expression": "12*7"})
    qtbot.addWidget(card)
    card.show()
    assert "…" in card.body.text()
    card.set_result({"type": "tool_result", "result": "84"})
    assert card.body.text() == 'arguments: {"expression": "12*7"}\nresult: 84'
    assert card.toggle.text() == "▾ tool call: calculator"
    card.toggle.click()
    assert not card.body.isVisible() and card.toggle.text() == "▸ tool call: calculator"
    card.set_result({"type": "tool_result", "error": "division by zero"})
    assert card.body.text().endswith("result: error: division by zero")


def test_an_answer_shows_its_tool_call_as_a_card_not_as_markup(qtbot):
    from PySide6.QtGui import QGuiApplication

    from sol.app.chat.messages import AnswerBubble
    pieces = ["Let me see.", " <|tool", "_call|>calculator: 12*7", "<|tool_end|>"]
    b = AnswerBubble()
    qtbot.addWidget(b)
    b.show()
    b.streaming = True
    shown = []
    for p in pieces:   # streamed in, painted after each token as the panel does
        b.add_token({"type": "token", "text": p})
        b.render()
        shown.append(b.body.toPlainText())
    assert shown == ["Let me see.", "Let me see. ", "Let me see. ", "Let me see. "]
    raw = "".join(pieces)
    b.finish({"id": 1, "content": raw, "completion_tokens": 4})
    assert b.body.toPlainText().strip() == "Let me see." and b.text == raw   # the conversation keeps the markup
    b.copy_btn.click()
    assert QGuiApplication.clipboard().text() == "Let me see."
    b.tokens_btn.click()   # the tokens view shows every token, the call's too
    assert "<|tool_call|>" in b.body.toPlainText()

    only = AnswerBubble("<|tool_call|>calculator: 12*7<|tool_end|>", 2)   # a stored answer that is only a call
    qtbot.addWidget(only)
    only.show()
    assert not only.body.isVisible()
    plain = AnswerBubble("1 < 2, and <b> stays")   # not a call: kept as written
    qtbot.addWidget(plain)
    plain.show()
    assert plain.body.isVisible() and plain.body.toPlainText().strip() == "1 < 2, and <b> stays"


def test_the_panel_kit_that_plugins_use(qtbot):
    # docs/plugins.md promises these names to plugin panels
    from PySide6.QtWidgets import QAbstractItemView, QLabel, QWidget

    from sol.app.kit import page, table
    w = QWidget()
    qtbot.addWidget(w)
    lay = page(w, "Word count", "Words in each answer.")
    t = table(["Answer", "Words"])
    lay.addWidget(t)
    labels = [lay.itemAt(i).widget() for i in range(2)]
    assert [(x.text(), x.objectName()) for x in labels if isinstance(x, QLabel)] == \
        [("Word count", "h1"), ("Words in each answer.", "muted")]
    assert t.columnCount() == 2 and t.editTriggers() == QAbstractItemView.NoEditTriggers
    assert t.selectionBehavior() == QAbstractItemView.SelectRows


def test_chat_sampling_takes_the_models_generation_config_unless_the_user_set_it(window, tmp_path):
    win, ctx = window
    folder = make_tiny_model(tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20}))
    chat = win.panel("chat")
    chat.params.top_k.setValue(7)                      # the user's own: kept
    ctx.set_model(loaded(folder))
    p = chat.params.generation_params().sampling
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.6, 0.9, 7, 1.1)
    assert "generation_config.json" in chat.params.source.text()
    chat.params.reset.click()                          # "Model defaults" gives top-k back to the model
    assert chat.params.generation_params().sampling.top_k == 20
    ctx.set_model(loaded(make_tiny_model(tmp_path / "plain")))   # a model without one: Sol's defaults
    p = chat.params.generation_params().sampling
    assert (p.temperature, p.top_p, p.top_k) == (0.8, 0.95, 50) and chat.params.source.text() == ""


def test_a_damaged_database_is_shown_in_the_window_and_new_chats_go_to_a_fresh_one(qtbot, isolated_home):
    from sol.app.main import build_window
    from sol.core.chat.store import Store
    damaged = isolated_home / "sol.db"
    junk = b"this is not SQLite" * 1000
    damaged.write_bytes(junk)
    win, ctx = build_window()
    qtbot.addWidget(win)
    fresh = isolated_home / "sol-new.db"
    assert not win.problem.isHidden()
    assert str(damaged) in win.problem.text() and str(fresh) in win.problem.text()
    cid = ctx.store.create_conversation("kept")
    ctx.store.add_message(cid, "user", "hello")
    ctx.store.close()
    assert damaged.read_bytes() == junk                       # untouched
    assert [c["title"] for c in Store(fresh).list_conversations()] == ["kept"]   # on disk, not in memory


def test_models_panel_lists_a_broken_folder_with_its_reason(window, isolated_home):
    from sol.core.formats.registry import list_models
    (isolated_home / "models" / "bad").mkdir(parents=True)
    (isolated_home / "models" / "bad" / "config.json").write_text("[1, 2]")
    win, ctx = window
    panel = win.panel("models")
    panel._fill(list_models(True))          # what refresh() hands it from its worker
    row = next(r for r, m in enumerate(panel.models) if m["name"] == "bad")
    assert panel.table.item(row, 2).text() == "broken"
    assert "config.json" in panel.table.item(row, 2).toolTip()
    assert any(m["name"] == "starter" for m in panel.models)     # the rest still listed


def test_loading_a_model_shows_its_progress_in_the_status_bar_until_it_is_loaded(window, qtbot, monkeypatch):
    import threading

    from sol.core.formats import checkpoint
    from sol.core.formats.registry import builtin_models_dir
    win, ctx = window
    real, halfway = checkpoint.load_model, threading.Event()

    def held(path, device, progress=None):   # the load waits halfway until the test has looked at the bar
        def watched(fraction, what):
            progress(fraction, what)
            if fraction >= 0.5:
                halfway.wait(30)
        return real(path, device, progress=watched)
    monkeypatch.setattr(checkpoint, "load_model", held)
    seen = []
    ctx.model_load_progress.connect(lambda f, what: seen.append((f, what, threading.current_thread())))
    assert win.load_bar.isHidden()
    ctx.load_model(str(builtin_models_dir() / "starter"))
    try:
        qtbot.waitUntil(lambda: not win.load_bar.isHidden() and win.load_bar.value() >= 500, timeout=10_000)
        percent = int(seen[-1][0] * 100)
        assert 50 <= percent < 100 and win.load_bar.format().startswith(f"{percent}% · ")
        assert "weight" in win.load_bar.format() or "bias" in win.load_bar.format()   # the tensor it reads
        assert win.model_label.text().startswith("loading ")
    finally:
        halfway.set()
    qtbot.waitUntil(lambda: ctx.loaded is not None, timeout=30_000)
    assert win.load_bar.isHidden() and win.model_label.text().startswith("model: starter")
    fractions = [f for f, _, _ in seen]
    assert fractions == sorted(fractions) and seen[-1][:2] == (1.0, "ready")
    assert {t for _, _, t in seen} == {threading.main_thread()}   # queued to the GUI thread

    ctx.load_model(str(builtin_models_dir() / "no-such-model"))   # a failed load hides it too
    assert not win.load_bar.isHidden()
    qtbot.waitUntil(lambda: win.load_bar.isHidden(), timeout=10_000)
    assert win.model_label.text() == "no model loaded"


def test_load_progress_reaches_the_gui_thread_about_30_times_a_second_and_the_last_report_is_kept(qtbot):
    import threading
    import time

    from sol.app.workers import ProgressRelay, run_task
    got = []
    relay = ProgressRelay(lambda f, what: got.append((time.monotonic(), f, what)))

    def work():   # 3000 reports in ~0.3 s, then a long last stage
        for i in range(3000):
            relay(i / 3000, f"tensor {i}")
            if i % 10 == 0:
                time.sleep(0.001)
        relay(0.99, "moving to the GPU")
        time.sleep(0.3)
        return threading.current_thread()
    done = []
    t0 = time.monotonic()
    run_task(work, on_done=done.append)
    qtbot.waitUntil(lambda: bool(done), timeout=20_000)
    took = time.monotonic() - t0
    assert done[0] is not threading.main_thread()
    assert 3 <= len(got) <= took * ProgressRelay.PER_S + 2
    gaps = [b[0] - a[0] for a, b in zip(got, got[1:])]
    assert min(gaps) >= 1 / ProgressRelay.PER_S - 0.005
    assert got[-1][1:] == (0.99, "moving to the GPU")   # shown during the long stage, not dropped
    relay(1.0, "ready")   # reported, then the work is over: close() hands it on at once
    relay.close()
    assert got[-1][1:] == (1.0, "ready")
    relay(1.0, "late")
    qtbot.wait(100)
    assert got[-1][1:] == (1.0, "ready")


def test_fine_tune_from_the_models_panel_lists_the_adapter_under_its_base_and_the_chat_runs_it(
        window, qtbot, tmp_path):
    """Models panel → Fine-tune → the Training panel (LoRA, an estimate) → `sol train sft --lora` → the adapter
    under its base in the Models panel → the chat's selector puts it on the loaded base, and answers with it."""
    from sol.core.data.synthetic import write
    from sol.core.formats.registry import builtin_models_dir, models_dir
    from sol.core.model import lora
    win, ctx = window
    data = write("sft", 40, 0, tmp_path / "chat.jsonl")
    models = win.panel("models")
    qtbot.waitUntil(models.is_ready, timeout=20_000)
    starter = str(builtin_models_dir() / "starter")
    row = next(r for r, m in enumerate(models.models) if m["path"] == starter)
    models.table.selectRow(row)
    assert models.fine_tune_btn.isEnabled()
    models.fine_tune_btn.click()
    training = win.current_panel()
    assert training is win.panel("training")
    assert training.stage.currentData() == "sft" and training.base.currentData() == starter
    assert training.lora.isChecked() and training.form.isRowVisible(training.lora_r)
    out = Path(training.out.text())
    assert out.parent == models_dir() and out.name.startswith("starter-lora-")
    training.data.setText(str(data))
    training.steps.setValue(3)
    training.batch.setValue(4)
    training.eval_every.setValue(0)
    training.sample_every.setValue(0)
    training.ckpt_every.setValue(0)
    training.lora_r.setValue(4)
    training.update_estimate()
    qtbot.waitUntil(lambda: training.estimate_result is not None and training.estimate_result.steps == 3
                    and training.estimate_result.adapter_params == 4 * 131072 // 16, timeout=30_000)
    e = training.estimate_result
    assert e.seq_from == "the longest conversation in the data" and 0 < e.seq_len <= 128
    assert e.total_bytes == e.base_bytes + e.adapter_bytes + e.activation_bytes + e.runtime_bytes
    assert e.base_bytes == 4 * e.base_params and e.adapter_bytes == 16 * e.adapter_params
    assert "memory ≈" in training.estimate.text() and training.estimate.text().startswith("Estimate")
    training.start_btn.click()
    argv = training.argv
    assert "--lora" in argv and argv[argv.index("--lora-r") + 1] == "4" and "--quantize" not in argv
    qtbot.waitUntil(lambda: training.state in ("done", "failed"), timeout=90_000)
    assert training.state == "done", training.log.toPlainText()[-2000:]
    assert (out / "adapter_config.json").is_file()

    # the Models panel refreshed on the run's end: the adapter is the row under its base, indented
    def listed():
        rows = [m["path"] for m in models.models]
        return str(out) in rows and rows.index(str(out)) > rows.index(starter)
    qtbot.waitUntil(listed, timeout=20_000)
    rows = [m["path"] for m in models.models]
    r = rows.index(str(out))
    base_row = rows.index(starter)
    assert all(models.models[i]["format"] == "lora" for i in range(base_row + 1, r + 1))
    assert models.table.item(r, 0).text().strip() == f"└ {out.name}"
    assert models.table.item(r, 1).text() == "lora r4" and models.table.item(r, 2).text() == "adapter of starter"
    models.table.selectRow(r)
    assert not models.fine_tune_btn.isEnabled()           # an adapter is fine-tuned through its base

    # the chat: load the base, answer once without the adapter, switch, answer again (greedy, same prompt)
    models.table.selectRow(base_row)
    models.load_selected()
    qtbot.waitUntil(lambda: ctx.loaded is not None, timeout=30_000)
    chat = win.panel("chat")
    qtbot.waitUntil(lambda: chat.adapter.findData(str(out)) >= 0, timeout=20_000)
    assert chat.adapter.isVisible() or not chat.isVisible()
    chat.params.temperature.setValue(0.0)
    chat.params.max_tokens.setValue(6)
    model = ctx.loaded.model

    def answer():
        chat.new_chat()
        chat.send("what is 3 times 4?")
        qtbot.waitUntil(lambda: not chat.busy, timeout=30_000)
        a = [b for b in chat.bubbles if type(b).__name__ == "AnswerBubble"][-1]
        return [t["logprob"] for t in a.tokens]
    before = answer()
    i = chat.adapter.findData(str(out))
    chat.adapter.setCurrentIndex(i)
    chat.adapter.activated.emit(i)
    qtbot.waitUntil(lambda: ctx.active_adapter == out.name, timeout=20_000)
    assert ctx.loaded.model is model                          # the base was not reloaded
    assert lora.adapter_names(model) == [out.name]
    assert all(layer.active == out.name for layer in lora.lora_layers(model).values())
    assert f"adapter {out.name}" in chat.model_hint.text()
    after = answer()
    assert len(before) == len(after) and before != after     # the answer ran with the adapter's weights
    # back to the base: the same answer as before, and the adapter stays on the model for the next switch
    chat.adapter.setCurrentIndex(0)
    chat.adapter.activated.emit(0)
    qtbot.waitUntil(lambda: ctx.active_adapter is None, timeout=20_000)
    assert answer() == pytest.approx(before, abs=1e-5)
    assert lora.adapter_names(model) == [out.name]


def _random_adapter(base_dir, out, seed=1):
    """A LoRA adapter folder for the model at base_dir whose B is not zero (it changes the model's answers)."""
    import torch

    from sol.core.formats.adapter import save_adapter
    from sol.core.model import lora
    lm = loaded(base_dir)
    settings = lora.LoraSettings(r=2, alpha=4.0, dropout=0.0)
    torch.manual_seed(seed)
    for p in lora.add_adapter(lm.model, settings):
        torch.nn.init.normal_(p, std=0.5)
    return save_adapter(out, lm.model, settings, str(base_dir), {"name": Path(out).name, "stage": "sft"})


def test_an_adapter_switch_waits_for_the_answer_being_generated(window, qtbot, tmp_path):
    import threading

    from sol.core.model import lora
    win, ctx = window
    base = make_tiny_model(tmp_path / "m")
    adapter = _random_adapter(base, tmp_path / "ad")
    ctx.set_model(loaded(base))
    release, seen = threading.Event(), []

    def slow(cancel):       # a generation in flight: records which adapter each of its steps ran with
        for _ in range(3):
            layers = lora.lora_layers(ctx.loaded.model)
            seen.append(next(iter(layers.values())).active if layers else None)
            release.wait(10)
            yield {"type": "token"}
    worker = ctx.stream(slow, lambda ev: None)
    qtbot.waitUntil(lambda: len(seen) == 1, timeout=10_000)
    ctx.use_adapter(str(adapter))
    qtbot.wait(300)
    assert ctx.active_adapter is None and ctx.adapter_busy     # waiting for the answer to end
    assert lora.adapter_names(ctx.loaded.model) == []          # not even put on the model yet
    release.set()
    qtbot.waitUntil(lambda: ctx.active_adapter == "ad", timeout=20_000)
    assert seen == [None, None, None] and not worker.running and not ctx.adapter_busy
    # a generation started while an adapter is being put on waits for it, and runs with it
    adapter2 = _random_adapter(base, tmp_path / "ad2", seed=2)
    ctx.use_adapter(str(adapter2))
    got = []
    ctx.stream(lambda cancel: iter([next(iter(lora.lora_layers(ctx.loaded.model).values())).active]), got.append)
    qtbot.waitUntil(lambda: bool(got), timeout=20_000)
    assert got == ["ad2"] and ctx.active_adapter == "ad2"
    assert sorted(lora.adapter_names(ctx.loaded.model)) == ["ad", "ad2"]
    # a folder that does not fit the model: one message naming it, the model keeps its adapter
    other = make_tiny_model(tmp_path / "other", d_model=48)
    bad = _random_adapter(other, tmp_path / "bad")
    failures = []
    ctx.adapter_failed.connect(failures.append)
    ctx.use_adapter(str(bad))
    qtbot.waitUntil(lambda: bool(failures), timeout=20_000)
    assert str(bad) in failures[0] and ctx.active_adapter == "ad2"


def test_models_panel_loads_an_adapter_onto_its_base(window, qtbot, tmp_path, isolated_home):
    from sol.core.formats.registry import list_models
    win, ctx = window
    base = make_tiny_model(isolated_home / "models" / "tiny")
    _random_adapter(base, isolated_home / "models" / "tiny-ad")
    panel = win.panel("models")
    panel._fill(list_models(True))
    names = [m["name"] for m in panel.models]
    r = names.index("tiny-ad")
    assert names[r - 1] == "tiny" and panel.table.item(r, 2).text() == "adapter of tiny"
    panel.table.selectRow(r)
    assert "r" in [panel.details.item(i, c).text() for i in range(panel.details.rowCount()) for c in (0, 2)
                   if panel.details.item(i, c)]
    panel.load_selected()                  # the base first, then the adapter on it
    qtbot.waitUntil(lambda: ctx.active_adapter == "tiny-ad", timeout=30_000)
    assert ctx.loaded.path == base and "with adapter tiny-ad" in panel.loaded_label.text()


def test_training_panel_shows_tokenizing_progress_then_steps(window):
    win, ctx = window
    panel = win.panel("training")
    panel.handle({"type": "progress", "what": "tokenizing the corpus", "done": 25 * 2 ** 20, "total": 100 * 2 ** 20})
    assert panel.progress.value() == 250 and panel.progress.text() == "tokenizing the corpus: 25%"
    panel.handle({"type": "progress", "what": "tokenizing the corpus", "done": 100 * 2 ** 20,
                  "total": 100 * 2 ** 20})
    assert panel.log.toPlainText().endswith("tokenizing the corpus: 100.0 MB done")
    panel.handle({"type": "start", "stage": "pretrain", "max_steps": 10})
    panel.handle({"type": "step", "step": 2, "loss": 3.0, "tokens_per_s": 100.0, "eta_s": 8})
    panel._redraw()
    assert panel.progress.text() == "2 / 10 steps"
