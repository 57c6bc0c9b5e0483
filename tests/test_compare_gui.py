"""The Compare and Evaluate panels (issue 30, pytest-qt, offscreen): two models stream at once, a blind vote is
kept and reveals the names, answers show tags as text, `sol eval` runs as a child with progress and a cancel,
and a model that is not there gets one error."""
from __future__ import annotations

import json
import sys
import threading

import pytest
from conftest import TINY_TEXT, make_tiny_model


@pytest.fixture
def window(qtbot):
    from sol.app.main import build_window
    win, ctx = build_window()
    qtbot.addWidget(win)
    yield win, ctx
    for w in win.widgets.values():
        if hasattr(w, "shutdown"):
            w.shutdown()


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
    assert panel.wins.item(0, 2).text() == ("1–0 (100% / 0%)" if winner == a else "0–1 (0% / 100%)")
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
