"""Never taken down, nothing lost (issue 15): hostile files, folders and arguments each end in one
`error:` line naming what is wrong, and nothing of the user's is changed."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import TINY_TEXT, make_tiny_model


def sol(argv, capsys) -> tuple[int, str, str]:
    from sol.core.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


TINY_PRETRAIN = ["--layers", 1, "--heads", 1, "--d-model", 16, "--context", 16, "--max-steps", 2,
                 "--batch-size", 2, "--eval-every", 0, "--sample-every", 0, "--checkpoint-every", 0,
                 "--threads", 1]


@pytest.fixture
def corpus(tmp_path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(TINY_TEXT, encoding="utf-8")
    return p


# ---- 1. --out that holds someone else's model -----------------------------------------------------
def test_train_refuses_an_out_folder_holding_a_hugging_face_model(tmp_path, corpus, capsys):
    hf = tmp_path / "their-model"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf / name).write_text(f"theirs: {name}")
    before = snapshot(hf)
    code, _, err = sol(["train", "pretrain", "--corpus", corpus, "--out", hf, *TINY_PRETRAIN], capsys)
    assert code == 1
    line = one_error(err)
    assert str(hf) in line and "config.json" in line and "not a Sol training run" in line
    assert snapshot(hf) == before


def test_train_refuses_a_sol_model_of_another_stage(tmp_path, corpus, capsys):
    m = make_tiny_model(tmp_path / "base")    # a finished base model
    before = snapshot(m)
    code, _, err = sol(["train", "sft", "--model", m, "--data", tmp_path / "none.jsonl", "--out", m,
                        "--max-steps", 1], capsys)
    assert code == 1
    assert "'base'" in one_error(err) and "'sft'" in one_error(err)
    assert snapshot(m) == before


def test_train_reuses_a_folder_holding_only_an_earlier_failed_runs_leftovers(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "events.jsonl").write_text('{"type": "error", "message": "x"}\n')
    code, _, err = sol(["train", "pretrain", "--corpus", corpus, "--out", out, *TINY_PRETRAIN], capsys)
    assert code == 0, err
    assert (out / "sol.json").is_file()


# ---- 4. --out that cannot be written fails before the first step -----------------------------------
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_train_checks_out_is_writable_before_the_first_step(tmp_path, corpus, capsys, where):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    out = f if where == "a file" else f / "run"
    code, stdout, err = sol(["train", "pretrain", "--corpus", corpus, "--out", out, *TINY_PRETRAIN,
                             "--events", "-"], capsys)
    assert code == 1
    assert str(out) in one_error(err)
    events = [json.loads(ln) for ln in stdout.splitlines()]
    assert not any(e["type"] in ("start", "step") for e in events)
    assert f.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_refuses_a_read_only_out_before_the_first_step(tmp_path, corpus, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = sol(["train", "pretrain", "--corpus", corpus, "--out", ro / "run", *TINY_PRETRAIN], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 1 and "cannot write" in one_error(err)


# ---- 3. several processes opening a new store at the same instant ---------------------------------
def test_many_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    import subprocess
    import sys
    import time
    code = ("import sys, time\n"
            "from sol.core.store import Store\n"
            "t = float(sys.argv[2])\n"
            "time.sleep(max(0, t - time.time()))\n"
            "s = Store(sys.argv[1]); s.add_message(s.create_conversation('c'), 'user', 'hi')\n")
    failures = []
    for round_ in range(3):
        db = tmp_path / f"r{round_}" / "sol.db"
        start = time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", code, str(db), str(start)], stderr=subprocess.PIPE,
                                  text=True) for _ in range(6)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            if p.returncode:
                failures.append(err.strip().splitlines()[-1])
        if not failures:
            from sol.core.store import Store
            assert len(Store(db).list_conversations()) == 6
    assert not failures, failures
