"""Training data: JSONL readers that name file:line, the SFT mask, corpora that are too small."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sol.core.data import conversations, jsonl
from sol.core.errors import SolError
from sol.core.formats.tokenizer import train_char

CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 12 times 7?"},
        {"role": "assistant", "content": "<|tool_call|>calculator: 12*7<|tool_end|>"},
        {"role": "tool", "content": "84"},
        {"role": "assistant", "content": "12 times 7 is 84."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "you are welcome"}]


@pytest.fixture
def tok(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ?.!:*+-/=", encoding="utf-8")
    return train_char([f])


def test_sft_mask_covers_exactly_the_assistant_tokens(tok):
    ids, mask = conversations.encode(tok, CHAT)
    # Piecewise encoding is the chat template's rendering, token for token.
    assert ids == tok.encode_ids(tok.apply_chat_template(CHAT, add_generation_prompt=False))
    targets = tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets == ("<|tool_call|>calculator: 12*7<|tool_end|>" "12 times 7 is 84.<|end|>"
                       "you are welcome<|end|>")
    inputs = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<|tool_result|>84<|tool_end|>" in inputs and "what is 12 times 7?" in inputs
    assert "<|assistant|>" in inputs and "be brief" in inputs


def test_inline_tool_result_is_never_a_target(tok):
    msgs = [{"role": "user", "content": "2+2"},
            {"role": "assistant", "content": "<|tool_call|>calculator: 2+2<|tool_end|><|tool_result|>4<|tool_end|>It is 4."}]
    ids, mask = conversations.encode(tok, msgs)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == \
        "<|tool_call|>calculator: 2+2<|tool_end|>It is 4.<|end|>"


@pytest.mark.parametrize("line, expect", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"msgs": []}', 'missing key "messages"'),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', "unknown role 'wizard'"),
    ('{"messages": [{"role": "user"}]}', 'needs both "role" and "content"'),
])
def test_malformed_chat_line_names_file_and_line(tmp_path, line, expect):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    f = tmp_path / "chat.jsonl"
    f.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(SolError) as e:
        jsonl.read_chat(f)
    assert str(e.value).startswith(f"{f}:3: ") and expect in str(e.value)


def test_preference_and_prompt_lines_are_checked(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(SolError, match=rf'{f}:2: missing key "rejected"'):
        jsonl.read_prefs(f)
    g = tmp_path / "rl.jsonl"
    g.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    with pytest.raises(SolError, match=rf'{g}:2: missing key "answer"'):
        jsonl.read_prompts(g, need_answer=True)
    assert jsonl.read_prompts(g)[1] == {"messages": [{"role": "user", "content": "2+2"}], "answer": None}


def _sol(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sol.core.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_stops_before_training_on_a_bad_line(tmp_path, tiny_model):
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                 '{"messages": [{"role": "robot", "content": "hi"}]}\n')
    r = _sol("train", "sft", "--model", tiny_model, "--data", f, "--out", tmp_path / "out", "--events", "-")
    assert r.returncode == 1
    assert f"error: {f}:2: messages[0] has unknown role 'robot'" in r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["type"] for e in events] == ["error"]          # no start: nothing trained
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_empty_and_too_short_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = _sol("train", "pretrain", "--corpus", empty, "--out", tmp_path / "a", "--preset", "tiny")
    assert r.returncode == 1 and "corpus is empty" in r.stderr
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be." * 5)
    r = _sol("train", "pretrain", "--corpus", short, "--out", tmp_path / "b", "--preset", "tiny", "--context", "64")
    assert r.returncode == 1 and "needs at least 65 tokens" in r.stderr and "--context" in r.stderr


def test_a_character_the_char_vocabulary_lacks_is_unk_not_end_of_text(tok):
    from sol.core.formats.tokenizer import EOT, UNK
    ids = tok.encode_ids("café", add_special_tokens=False)
    assert len(ids) == 4 and ids[:3] == tok.encode_ids("caf", add_special_tokens=False)
    assert ids[3] == tok.token_to_id(UNK) != tok.token_to_id(EOT)
