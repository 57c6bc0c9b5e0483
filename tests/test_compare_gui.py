"""The Compare and Evaluate panels (issue 30, pytest-qt, offscreen): two models stream at once, a blind vote is
kept and reveals the names, answers show tags as text, `sol eval` runs as a child with progress and a cancel,
and a model that is not there gets one error."""
from __future__ import annotations

import json
import threading

import pytest
from conftest import make_tiny_model


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_tiny_model(root / "alpha", seed=0), make_tiny_model(root / "beta", seed=1)


def compare_panel(win, models, blind: bool, prompt: str = "All:\nSpeak", max_tokens: int = 100):
    panel = win.panel("compare")
    for picker, path in zip(panel.pickers, models):
        picker.setEditText(str(path))
    panel.blind.setChecked(blind)
    panel.chat.setChecked(False)
    panel.prompt.setPlainText(prompt)
    panel.params.max_tokens.setValue(max_tokens)
    panel.params.temperature.setValue(1.0)
    panel.params.seed.setValue(3)
    return panel


def test_two_models_stream_at_once(window, qtbot, two_models):
    win, ctx = window
    panel = compare_panel(win, two_models, blind=False)
    assert panel.start()
    events = []
    panel.worker.event.connect(events.append)
    qtbot.waitUntil(lambda: not panel.busy, timeout=60_000)
    assert not panel.error.isVisible() and not panel.error.text()
    kinds = [(e["type"], e.get("model")) for e in events]
    first_done = next(i for i, k in enumerate(kinds) if k[0] == "done")
    assert {m for t, m in kinds[:first_done] if t == "token"} == {0, 1}    # both streamed before either ended
    for k, path in enumerate(two_models):
        col = panel.columns[k]
        assert col.head.text() == f"{'AB'[k]} · {path}"                      # not blind: names shown
        assert "tok/s" in col.stats.text() and col.shown_text()
    assert panel.comparison_id is not None                                   # kept, not blind, not voted on
    assert ctx.store.comparison(panel.comparison_id)["blind"] is False


def test_a_blind_vote_is_kept_reveals_the_models_and_counts_in_the_win_rates(window, qtbot, two_models):
    win, ctx = window
    panel = compare_panel(win, two_models, blind=True, max_tokens=12)
    assert panel.start()
    qtbot.waitUntil(lambda: not panel.busy, timeout=60_000)
    names = {str(p) for p in two_models}
    heads = [c.head.text() for c in panel.columns[:2]]
    assert heads == ["A", "B"] and not any(n in h for h in heads for n in names)      # hidden before the vote
    assert all("tok/s" not in c.stats.text() for c in panel.columns[:2])
    assert all(b.isEnabled() for k, b in panel.vote_btns.items() if k in ("A", "B", "tie", "both_bad"))
    stored = ctx.store.comparison(panel.comparison_id)
    assert stored["blind"] and stored["vote"] is None and all(a["model"] is None for a in stored["answers"])
    winner = panel.run["models"][panel.run["order"][0]][0]          # the model column A showed
    assert panel.vote("A")
    stored = ctx.store.comparison(panel.comparison_id)
    assert stored["vote"] == "A" and stored["answers"][0]["model"] == winner
    assert [a["text"] for a in stored["answers"]] == [c.text for c in panel.columns[:2]]
    assert stored["answers"][0]["lineage"]["path"] == str(two_models[0 if winner == str(two_models[0]) else 1])
    heads = [c.head.text() for c in panel.columns[:2]]
    assert heads[0] == f"A · {winner}" and {h.split(" · ")[1] for h in heads} == names   # revealed
    assert not panel.vote_btns["B"].isEnabled() and not panel.vote("B")                # one vote
    qtbot.waitUntil(lambda: panel.wins.rowCount() == 1, timeout=10_000)
    a, b = sorted(names)
    assert panel.wins.item(0, 0).text() == f"{a} vs {b}" and panel.wins.item(0, 1).text() == "1"
    assert panel.wins.item(0, 2).text() == ("100% – 0%" if winner == a else "0% – 100%")
    assert "after 10 votes (1 so far)" in panel.elo_note.text() and panel.elo.isHidden()


def test_enough_votes_give_elo_with_its_interval(window, qtbot):
    win, ctx = window
    for k in range(12):
        cid = ctx.store.add_comparison("p", [{"model": "x", "text": "1"}, {"model": "y", "text": "2"}])
        ctx.store.vote(cid, "A" if k % 3 else "B")
    panel = win.panel("compare")
    qtbot.waitUntil(lambda: panel.elo.rowCount() == 2, timeout=20_000)
    assert panel.elo.item(0, 0).text() == "x" and " – " in panel.elo.item(0, 2).text()
    assert panel.wins.item(0, 1).text() == "12"


def test_an_answer_with_tags_shows_as_text_in_a_column(window, qtbot, two_models, monkeypatch):
    """The models 'choose' the tokens of an answer about HTML, generics and a special token (per thread: both
    columns write it), as tests/test_chat.py's script() does."""
    import sol.core.generation.engine as engine_mod
    from sol.core.formats.checkpoint import load_model
    answer = "Use a <div>, a List<String> and <unused1> here."
    tok = load_model(two_models[0]).tokenizer
    ids = tok.encode_ids(answer, add_special_tokens=False)
    streams: dict[str, object] = {}

    def choose(logits, p, g, h=None, explain=True):
        it = streams.setdefault(threading.current_thread().name, iter(ids))
        return next(it, None) or 0, None
    monkeypatch.setattr(engine_mod, "choose", choose)
    win, ctx = window
    panel = compare_panel(win, two_models, blind=False, max_tokens=len(ids))
    assert panel.start()
    qtbot.waitUntil(lambda: not panel.busy, timeout=60_000)
    for col in panel.columns[:2]:
        assert col.text == answer
        assert col.shown_text() == answer          # rendered as Markdown, the tags kept as text


def test_a_model_that_is_not_there_gets_one_error(window, qtbot, two_models):
    win, ctx = window
    panel = compare_panel(win, [two_models[0], "no-such-model"], blind=True)
    assert panel.start()
    qtbot.waitUntil(lambda: not panel.busy, timeout=60_000)
    text = panel.error.text()
    assert panel.error.isVisibleTo(panel) and text.count("error:") == 1
    assert text.startswith("error: model 'no-such-model': no such directory") and "choose one from the list" in text
    assert panel.comparison_id is None and not panel.vote_btns["A"].isEnabled()
    panel.pickers[1].setEditText("—")
    assert not panel.start() and panel.error.text().startswith("error: 1 model chosen: choose 2 to 4 models")


def test_evaluate_runs_perplexity_to_the_end_and_charts_it(window, qtbot, tmp_path, tiny_text_file):
    from sol.plugins.evaluate.eval_panel import command
    win, ctx = window
    model = make_tiny_model(tmp_path / "m")
    panel = win.panel("evaluate")
    panel.model.setEditText(str(model))
    panel.data.setText(str(tiny_text_file))
    assert panel.run_argv(command("perplexity", str(model), str(tiny_text_file), extra=["--window", "32"]))
    qtbot.waitUntil(lambda: panel.state != "running", timeout=60_000)
    assert panel.state == "done", panel.error.text()
    assert panel.progress.value() == panel.progress.maximum() > 1
    assert panel.result.text().startswith("m: perplexity ") and "kept in" in panel.result.text()
    assert (model / "evals" / "perplexity-tiny.json").is_file()
    qtbot.waitUntil(lambda: len(panel.rows) == 1, timeout=10_000)
    kept = json.loads((model / "evals" / "perplexity-tiny.json").read_text())
    assert panel.rows == [("m", kept["perplexity"])] and panel.bars is not None


def test_evaluate_cancel_ends_the_run_and_keeps_nothing(window, qtbot, tmp_path):
    from sol.plugins.evaluate.eval_panel import command
    win, ctx = window
    model = make_tiny_model(tmp_path / "m")
    text = tmp_path / "long.txt"
    text.write_text("Before we proceed any further, hear me speak. " * 400, encoding="utf-8")
    panel = win.panel("evaluate")
    panel.run_argv(command("perplexity", str(model), str(text), extra=["--window", "64", "--stride", "1"]))
    qtbot.waitUntil(lambda: panel.progress.value() >= 3, timeout=60_000)
    assert panel.cancel_btn.isEnabled()
    panel.cancel()
    qtbot.waitUntil(lambda: panel.proc is None, timeout=30_000)
    assert panel.state == "cancelled" and panel.result.text() == "cancelled: nothing was kept"
    assert panel.progress.value() < panel.progress.maximum()
    assert not (model / "evals").exists() and panel.run_btn.isEnabled()


def test_evaluate_a_model_that_is_not_there_gets_one_error(window, qtbot, tiny_text_file):
    win, ctx = window
    panel = win.panel("evaluate")
    panel.model.setEditText("")
    assert not panel.start()
    assert panel.error.text() == "error: no model: load one in the Models panel or choose one here"
    panel.model.setEditText("no-such-model")
    panel.data.setText(str(tiny_text_file))
    assert panel.start()
    qtbot.waitUntil(lambda: panel.proc is None, timeout=60_000)
    assert panel.state == "failed"
    text = panel.error.text()
    assert text.count("error:") == 1 and "no-such-model" in text and "no such directory" in text


def test_the_training_lineage_shows_each_stages_eval_results(tmp_path, tiny_text_file):
    from sol.core.evaluate.run import evaluate
    from sol.core.formats.checkpoint import load_model
    from sol.plugins.training_runner.runs import lineage
    base, sft = make_tiny_model(tmp_path / "base"), make_tiny_model(tmp_path / "sft")
    meta = json.loads((sft / "sol.json").read_text())
    (sft / "sol.json").write_text(json.dumps({**meta, "stage": "sft", "parent": {"path": str(base), "name": "base"}}))
    kept = evaluate("perplexity", load_model(sft), tiny_text_file, window=32)
    roots = lineage([{"name": "base", "path": str(base), "format": "sol"}, {"name": "sft", "path": str(sft),
                                                                            "format": "sol"}])
    assert [r.name for r in roots] == ["base"] and roots[0].evals == ""
    assert roots[0].children[0].evals == f"perplexity {kept['perplexity']:.2f} (tiny)"


def test_the_loaded_models_adapters_and_checkpoints_are_choices_and_an_adapter_answers_as_itself(window, qtbot):
    import torch

    from sol.core.formats.adapter import save_adapter
    from sol.core.formats.checkpoint import load_model
    from sol.core.formats.registry import models_dir
    from sol.core.model import lora
    base = make_tiny_model(models_dir() / "base")
    make_tiny_model(base / "checkpoints" / "step_000010", seed=2)
    lm = load_model(base)
    settings = lora.LoraSettings(r=2, alpha=4.0, dropout=0.0)
    torch.manual_seed(1)
    for p in lora.add_adapter(lm.model, settings):
        torch.nn.init.normal_(p, std=0.5)
    adapter = save_adapter(models_dir() / "base-lora", lm.model, settings, str(base), {"name": "base-lora"})
    win, ctx = window
    ctx.set_model(load_model(base))
    panel = win.panel("compare")
    qtbot.waitUntil(lambda: panel.pickers[0].count() >= 3, timeout=20_000)
    labels = [panel.pickers[0].itemText(i) for i in range(panel.pickers[0].count())]
    assert labels[:3] == ["base", "base @ 10", "base-lora"]        # the loaded model's family first
    panel.pickers[0].setCurrentIndex(0)
    panel.pickers[1].setCurrentIndex(2)
    panel.blind.setChecked(False)
    panel.prompt.setPlainText("All:\nSpeak")
    panel.params.max_tokens.setValue(16)
    panel.params.temperature.setValue(0.0)
    assert panel.start()
    qtbot.waitUntil(lambda: not panel.busy, timeout=60_000)
    assert not panel.error.text(), panel.error.text()
    assert panel.run["models"][0][1] == str(base) and str(base) not in panel.cache   # the loaded one, not a copy
    stored = ctx.store.comparison(panel.comparison_id)
    assert [a["model"] for a in stored["answers"]] == ["base", "base-lora"]
    assert stored["answers"][1]["lineage"]["adapter"] == str(adapter.resolve())
    assert stored["answers"][0]["text"] != stored["answers"][1]["text"]    # the adapter changes the answer


def test_the_kit_gives_plugin_panels_answer_markdown_and_the_sampling_controls(qtbot):
    from PySide6.QtWidgets import QTextBrowser

    from sol.app.kit import answer_markdown, sampling_controls
    view = QTextBrowser()
    qtbot.addWidget(view)
    view.setMarkdown(answer_markdown("a <div> and **bold**\nnext line"))
    assert view.toPlainText() == "a <div> and bold\nnext line"
    controls = sampling_controls({"temperature": 0.3, "seed": 5})
    qtbot.addWidget(controls)
    p = controls.generation_params()
    assert p.sampling.temperature == 0.3 and p.sampling.seed == 5
