"""Issue 27's two hostile inputs: `sol train pretrain` on a 50 MB corpus with no newline (it ran minutes
without a word; now it reports its tokenizing and finishes in under 60 s), and `sol chat` reading bytes
that are not UTF-8 from standard input (it ended in `error: unexpected UnicodeEncodeError`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import make_tiny_model

from sol.core.data import corpus
from sol.core.formats.tokenizer import train_bpe, train_char


def test_the_char_encoder_gives_the_tokenizers_ids(tmp_path):
    """The table lookup that replaced the character-level tokenizer's per-character pass gives its ids:
    special tokens in the text (leftmost, longest), characters the vocabulary lacks, astral ones, whitespace."""
    f = tmp_path / "c.txt"
    f.write_text("hello world\tab\r\n", encoding="utf-8")
    tok = train_char([f])
    rng = np.random.default_rng(0)
    noise = "".join(chr(c) for c in rng.integers(32, 0x2FFF, 5000) if not 0xD800 <= c < 0xE000)
    text = ("hello<|endoftext|>wor<|end|><|endoftext|x 😀 ã\t\r\n<|user|><|tool_end|><|end|>ld" + noise
            + "<|tool_result|>")
    fast = corpus.CharEncoder.of(tok)
    assert fast is not None
    assert fast.encode(text).tolist() == tok.encode_ids(text, add_special_tokens=False)
    assert fast.encode("").tolist() == []
    assert corpus.CharEncoder.of(train_bpe([f], 300)) is None   # only for the shape it mirrors


def test_pretrain_on_50_mb_without_a_newline_reports_progress_and_finishes_in_a_minute(tmp_path):
    rng = np.random.default_rng(1)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      ", dtype=np.uint8)
    (tmp_path / "one-line.txt").write_bytes(letters[rng.integers(0, len(letters), 50_000_000)].tobytes())
    env = {**os.environ, "SOL_HOME": str(tmp_path / "home")}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "train", "pretrain", "--corpus",
                        str(tmp_path / "one-line.txt"), "--out", str(tmp_path / "out"), "--preset", "tiny",
                        "--max-steps", "1", "--threads", "1", "--events", "-"],
                       capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    progress = [e for e in events if e["type"] == "progress" and e["what"] == "tokenizing the corpus"]
    assert progress and kinds.index("progress") < kinds.index("start")
    assert progress[-1]["done"] == progress[-1]["total"] == 50_000_000
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    assert kinds[-1] == "done" and took < 60, took


def test_chat_reading_bytes_that_are_not_utf8_replaces_them_and_says_so(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    env = {**os.environ, "SOL_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "chat", "--model", str(model), "--max-tokens", "2",
                        "--safe-mode", "--temperature", "0"], input=b"\xff\xfe hello\n", capture_output=True,
                       timeout=120, env=env)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err
    assert "error:" not in err and "Traceback" not in err, err
    assert "note: standard input: bytes that are not UTF-8 were replaced" in err
    assert "completion tokens" in err   # the line was answered
    conversations = list((tmp_path / "home").rglob("*.db"))
    assert conversations   # and stored, with the replacement characters
    import sqlite3
    texts = [row[0] for db in conversations for row in
             sqlite3.connect(db).execute("SELECT content FROM messages WHERE role = 'user'")]
    assert "\ufffd\ufffd hello" in texts
