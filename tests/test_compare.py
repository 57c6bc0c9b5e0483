"""`sol compare`: each model's answer the same tokens `sol generate` (or `sol chat`) gives it alone; the
answers stream together; blind votes kept in the store; win rates and Elo with its uncertainty."""
from __future__ import annotations

import json
import math
import threading

import pytest

from conftest import make_tiny_model
from sol.core.cli import main

SAMPLING = ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01",
            "--repetition-penalty", "1.1", "--seed", "7", "--max-tokens", "24"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return make_tiny_model(root / "a", seed=0), make_tiny_model(root / "b", seed=1)


def lines(args, capsys) -> list[dict]:
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return [json.loads(x) for x in out.splitlines()]


def test_compare_gives_each_model_what_generate_gives_it(two_models, capsys):
    a, b = map(str, two_models)
    prompt = "First Citizen:\nBefore we"
    want = {}
    for m in (a, b):
        done = lines(["generate", "--model", m, "--prompt", prompt, "--json", *SAMPLING], capsys)[-1]
        want[m] = done
    got = lines(["compare", "--model", a, "--model", b, "--prompt", prompt, "--json", *SAMPLING], capsys)
    assert [g["model"] for g in got] == [a, b]
    for g in got:
        assert set(g) == {"model", "text", "tokens", "ids", "tokens_per_s"}
        assert g["ids"] == want[g["model"]]["token_ids"] and g["text"] == want[g["model"]]["text"]
        assert g["tokens"] == len(g["ids"]) and g["tokens_per_s"] > 0
    assert got[0]["ids"] != got[1]["ids"]     # two models, two answers


GREEDY = ["--temperature", "0", "--max-tokens", "60"]


@pytest.mark.parametrize("sampling", [SAMPLING, GREEDY], ids=["sampled", "greedy"])
def test_compare_chat_gives_each_model_what_chat_gives_it(two_models, capsys, sampling):
    a, b = map(str, two_models)
    want = {}
    for m in (a, "starter"):
        events = lines(["chat", "--model", m, "--message", "what is 12 times 7?", "--json", *sampling], capsys)
        ids = [e["id"] for e in events if e["type"] == "token" and not e["forced"]]
        text = [e["content"] for e in events if e["type"] == "message" and e["role"] == "assistant"][-1]
        want[m] = (ids, text)
    got = lines(["compare", "--model", a, "--model", "starter", "--prompt", "what is 12 times 7?", "--chat",
                 "--json", *sampling], capsys)
    for g in got:
        assert (g["ids"], g["text"]) == want[g["model"]]
    if sampling is GREEDY:
        assert "84" in got[1]["text"]           # the starter ran its calculator inside the comparison


def test_answers_stream_together_and_cancel_stops_them(two_models):
    """Tokens of both models arrive before either answer is done; a cancel ends both early."""
    from sol.core.evaluate.compare import compare
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.engine import GenerationParams
    from sol.core.generation.sampling import SamplingParams
    models = [(str(p), load_model(p)) for p in two_models]
    params = GenerationParams(max_tokens=100, sampling=SamplingParams(temperature=1.0, seed=3), explain=False)
    first_done, seen = None, set()
    cancel = threading.Event()
    events = list(compare(models, "All:\nSpeak", params, cancel=cancel))
    for k, ev in enumerate(events):
        if ev["type"] == "token":
            seen.add(ev["model"])
        if ev["type"] == "done" and first_done is None:
            first_done = k
    assert seen == {0, 1} and {e["model"] for e in events[:first_done] if e["type"] == "token"} == {0, 1}
    cancel = threading.Event()
    stopped = []
    for ev in compare(models, "All:\nSpeak", params, cancel=cancel):
        if ev["type"] == "token" and ev["model"] == 0:
            cancel.set()
        if ev["type"] == "done":
            stopped.append(ev)
    assert len(stopped) == 2 and all(d["stop_reason"] == "cancelled" and d["tokens"] < 100 for d in stopped)


def test_compare_bad_input(two_models, capsys):
    a = str(two_models[0])
    assert main(["compare", "--model", a, "--prompt", "x"]) == 1
    assert "2 to 4" in capsys.readouterr().err
    assert main(["compare", "--model", a, "--model", "no-such-model", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--model no-such-model" in err


def test_blind_votes_in_the_store(tmp_path):
    from sol.core.chat.store import Store
    store = Store(tmp_path / "sol.db")
    assert store.schema_version == 3
    cid = store.add_comparison("hi", [{"model": "sft", "text": "hello", "lineage": {"stage": "sft"}},
                                      {"model": "base", "text": "hey"}], settings={"seed": 7})
    hidden = store.comparison(cid)
    assert [a["label"] for a in hidden["answers"]] == ["A", "B"] and hidden["vote"] is None
    assert all(a["model"] is None and a["lineage"] is None for a in hidden["answers"])   # blind until the vote
    with pytest.raises(Exception, match="must be one of A, B, tie, both_bad"):
        store.vote(cid, "C")
    shown = store.vote(cid, "A")
    assert shown["vote"] == "A" and [a["model"] for a in shown["answers"]] == ["sft", "base"]
    assert shown["answers"][0]["lineage"] == {"stage": "sft"}
    with pytest.raises(Exception, match="already voted"):
        store.vote(cid, "B")
    three = store.add_comparison("x", [{"model": m, "text": m} for m in ("p", "q", "r")])
    store.vote(three, "B")
    tie = store.add_comparison("y", [{"model": "sft", "text": ""}, {"model": "base", "text": ""}])
    store.vote(tie, "both_bad")
    store.add_comparison("not voted", [{"model": "sft", "text": ""}, {"model": "base", "text": ""}])
    assert store.battles() == [("sft", "base", "a"), ("p", "q", "b"), ("q", "r", "a"), ("sft", "base", "both_bad")]
    assert Store(tmp_path / "sol.db").comparison(cid)["vote"] == "A"      # kept on disk


def test_a_version_2_database_gains_the_comparison_tables(tmp_path):
    import sqlite3

    from sol.core.chat.store import MIGRATIONS, Store
    p = tmp_path / "old.db"
    db = sqlite3.connect(p)
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (2)")
    db.execute("INSERT INTO conversations (title, created, updated) VALUES ('kept', 0, 0)")
    db.commit()
    db.close()
    s = Store(p)
    assert s.schema_version == 3 and [c["title"] for c in s.list_conversations()] == ["kept"]
    cid = s.add_comparison("p", [{"model": "a", "text": "x", "conversation_id": 1}, {"model": "b", "text": "y"}])
    assert s.vote(cid, "tie")["answers"][0]["conversation_id"] == 1


def test_win_rates_per_pair():
    from sol.core.evaluate.ratings import win_rates
    rates = win_rates([("x", "y", "a"), ("y", "x", "a"), ("x", "y", "tie"), ("y", "x", "b"), ("x", "z", "both_bad")])
    assert rates[0] == {"a": "x", "b": "y", "n": 4, "a_wins": 2, "b_wins": 1, "ties": 1, "both_bad": 0,
                        "a_rate": 0.5, "b_rate": 0.25}
    assert rates[1]["both_bad"] == 1 and rates[1]["n"] == 1


def test_elo_with_its_uncertainty():
    from sol.core.evaluate.ratings import MIN_VOTES, bradley_terry, elo
    assert elo([("x", "y", "a")] * (MIN_VOTES - 1)) is None                 # too few votes
    # two models: the fit's odds are the wins' ratio, with the virtual tie's half win each
    fit = bradley_terry([("x", "y", "a")] * 30 + [("x", "y", "b")] * 10)
    assert fit["x"] - fit["y"] == pytest.approx(400 * math.log10(30.5 / 10.5), abs=1e-6)
    assert (fit["x"] + fit["y"]) / 2 == pytest.approx(1000)
    even = elo([("x", "y", "a"), ("x", "y", "b")] * 10)
    assert even[0]["rating"] == pytest.approx(1000) and even[1]["rating"] == pytest.approx(1000)
    few = elo([("x", "y", "a")] * 9 + [("x", "y", "b")] * 3 + [("y", "z", "a")] * 6 + [("y", "z", "tie")] * 2)
    many = elo(([("x", "y", "a")] * 9 + [("x", "y", "b")] * 3 + [("y", "z", "a")] * 6 + [("y", "z", "tie")] * 2) * 8)
    assert [r["model"] for r in few] == ["x", "y", "z"] == [r["model"] for r in many]
    for r in few + many:
        assert r["low"] <= r["rating"] <= r["high"]
    width = lambda rs: sum(r["high"] - r["low"] for r in rs)   # noqa: E731
    assert width(many) < width(few) / 2                              # more votes, a narrower interval
