"""The hostile-input table (issue 15, "Done when"): each hostile file, folder or argument goes through
`sol generate`, `sol models list`, `sol chat` or `sol train` in its own process, and must end with the
expected exit status, exactly one `error:` line naming the file or argument (none where Sol should carry
on), no traceback, within a time limit, and with every file that was there before left unchanged."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model

from sol.core.model.config import PRESETS

TIME_LIMIT_S = 90


def _header(path: Path, header: bytes, length: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * 64)


def _config(m: Path, **over) -> None:
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, **over}))


def _nan_weights(m: Path) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(m / "model.safetensors")
    sd["norm.weight"][0] = float("nan")
    save_file(sd, m / "model.safetensors")


def _pickle_only(m: Path) -> None:
    import pickle
    (m / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {m / 'pwned'}",))
    (m / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))


def _template(m: Path, template: str) -> None:
    (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))


CHAT = ["chat", "--model", "{m}", "--message", "hi", "--max-tokens", "2", "--safe-mode"]
GEN = ["generate", "--model", "{m}", "--prompt", "hi", "--max-tokens", "2"]
OK_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
SFT = ["train", "sft", "--model", "{m}", "--data", "{d}/data.jsonl", "--out", "{d}/run", "--max-steps", "1"]

# id: (prepare(case folder, model folder), argv, exit status, what the error line names (None: no error line))
CASES = {
    "fifo weights": (lambda d, m: ((m / "model.safetensors").unlink(), os.mkfifo(m / "model.safetensors")),
                     GEN, 1, "model.safetensors"),
    "header length 2^60": (lambda d, m: _header(m / "model.safetensors", b"{}", 2**60), GEN, 1, "model.safetensors"),
    "shape is a string": (lambda d, m: _header(m / "model.safetensors", json.dumps(
        {"w": {"dtype": "F32", "shape": "3", "data_offsets": [0, 12]}}).encode()), GEN, 1, "model.safetensors"),
    "weights link to /etc/passwd": (lambda d, m: ((m / "model.safetensors").unlink(),
                                                  (m / "model.safetensors").symlink_to("/etc/passwd")),
                                    GEN, 1, "model.safetensors"),
    "pickle that runs code": (lambda d, m: _pickle_only(m), GEN, 1, "pytorch_model.bin"),
    "config is a list": (lambda d, m: (m / "config.json").write_text("[]"), GEN, 1, "config.json"),
    "config nested 100000 deep": (lambda d, m: (m / "config.json").write_text("[" * 100000 + "]" * 100000),
                                  GEN, 1, "config.json"),
    "vocab_size -1": (lambda d, m: _config(m, vocab_size=-1), GEN, 1, "vocab_size"),
    "vocab_size 10^12": (lambda d, m: _config(m, vocab_size=10**12), GEN, 1, "vocab_size"),
    "n_layer 10^9": (lambda d, m: _config(m, n_layer=10**9), GEN, 1, "n_layer"),
    "d_model as a string": (lambda d, m: _config(m, d_model="32"), GEN, 1, "d_model"),
    "norm_eps NaN": (lambda d, m: (m / "config.json").write_text(
        (m / "config.json").read_text().replace('"norm_eps": 1e-05', '"norm_eps": NaN')), GEN, 1, "config.json"),
    "NaN weights": (lambda d, m: _nan_weights(m), GEN, 1, "model.safetensors"),
    "tokenizer_config is a list": (lambda d, m: (m / "tokenizer_config.json").write_text("[]"),
                                   GEN, 1, "tokenizer_config.json"),
    "--temperature nan": (None, GEN + ["--temperature", "nan"], 1, "--temperature"),
    "--temperature 1e-45": (None, GEN + ["--temperature", "1e-45"], 1, "--temperature"),
    "--repetition-penalty nan": (None, GEN + ["--repetition-penalty", "nan"], 1, "--repetition-penalty"),
    "--seed 2**70": (None, GEN + ["--seed", str(2**70)], 1, "--seed"),
    "lone surrogate argument": (None, ["generate", "--model", "{m}", "--prompt", "caf\udce9"], 1, "argument 5"),
    "nested-loop chat template": (lambda d, m: _template(
        m, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"), CHAT, 1,
        "chat template"),
    "9**(10**9) chat template": (lambda d, m: _template(m, "{{ (9**(10**9)) % 7 }}"), CHAT, 1, "chat template"),
    "self-calling macro template": (lambda d, m: _template(
        m, "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"), CHAT, 1, "chat template"),
    "damaged sol.db": (lambda d, m: (d / "home").mkdir() or (d / "home" / "sol.db").write_bytes(b"junk" * 500),
                       CHAT, 1, "sol.db"),
    "broken folder in models": (lambda d, m: (d / "home" / "models").mkdir(parents=True) or shutil.copytree(
        m, d / "home" / "models" / "bad") and _config(d / "home" / "models" / "bad", n_layer="x"),
        ["models", "list"], 0, None),
    "--out holds a Hugging Face model": (lambda d, m: (d / "theirs").mkdir() or [
        (d / "theirs" / n).write_text("theirs") for n in ("config.json", "model.safetensors", "tokenizer.json")],
        ["train", "pretrain", "--corpus", "{m}-corpus.txt", "--out", "{d}/theirs", "--max-steps", "1"], 1, "--out"),
    "--out is a file": (lambda d, m: (d / "notes.txt").write_text("mine"),
                        ["train", "pretrain", "--corpus", "{m}-corpus.txt", "--out", "{d}/notes.txt",
                         "--max-steps", "1"], 1, "--out"),
    "JSONL not UTF-8": (lambda d, m: (d / "data.jsonl").write_bytes(OK_CHAT.encode() + b"\n\xff\xfe\n"),
                        SFT, 1, "data.jsonl:2"),
    "JSONL 2 MB line": (lambda d, m: (d / "data.jsonl").write_text(OK_CHAT + "\n" + OK_CHAT.replace(
        "yo", "y" * 2_000_000) + "\n"), SFT, 1, "data.jsonl:2"),
    "JSONL lone surrogate": (lambda d, m: (d / "data.jsonl").write_text(OK_CHAT.replace("yo", "\\udc00") + "\n"),
                             SFT, 1, "data.jsonl:1"),
}


@pytest.fixture(scope="module")
def sol_model(tmp_path_factory):
    """A tiny model Sol could fine-tune (its tokenizer has Sol's chat tokens)."""
    return make_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


def snapshot(folder: Path) -> dict:
    out = {}
    for p in folder.rglob("*"):
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            out[str(p)] = "link:" + os.readlink(p)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(case, sol_model, tmp_path):
    prepare, argv, status, names = CASES[case]
    d = tmp_path / "case"
    d.mkdir()
    m = d / "model"
    shutil.copytree(sol_model, m)
    shutil.copy(sol_model.parent / f"{sol_model.name}-corpus.txt", d / "model-corpus.txt")
    if prepare:
        prepare(d, m)
    (d / "home").mkdir(exist_ok=True)
    before = snapshot(d)
    env = {**os.environ, "SOL_HOME": str(d / "home"), "HF_HOME": str(d / "home" / "hf")}
    env.pop("SOL_SAFE_MODE", None)
    args = [a.format(m=m, d=d) for a in argv]
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", *args], capture_output=True, timeout=TIME_LIMIT_S,
                       env=env, cwd=d)
    err = r.stderr.decode("utf-8", "replace")
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert r.returncode == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if names is None:
        assert not errors, err
    else:
        assert len(errors) == 1, err
        assert names in errors[0], errors[0]
    after = snapshot(d)
    assert {p: h for p, h in after.items() if p in before} == before     # nothing of the user's changed
    assert not (m / "pwned").exists()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_model_config(name):
    """`--preset NAME` must never be a config Sol itself refuses (the starter preset once had 6 heads
    for d_model 256)."""
    from sol.core.model.config import preset
    cfg = preset(name, vocab_size=97)
    assert cfg.d_model % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
