"""Shared fixtures. Every test runs with its own SOL_HOME and HF cache, so
nothing touches the developer's real data and no test sees another's models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
             "Olá! Café, naïve, 世界, 🌍 — accents, CJK and emoji.\n") * 20


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("solhome")
    monkeypatch.setenv("SOL_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("OLLAMA_MODELS", str(home / "ollama"))   # never the developer's own Ollama store
    monkeypatch.delenv("SOL_SAFE_MODE", raising=False)
    # A developer's SOL_INT8_KERNEL=0 would turn the int8 kernel's tests into skips (require_int8_kernel);
    # tests that want it off set it themselves.
    monkeypatch.delenv("SOL_INT8_KERNEL", raising=False)
    return home


@pytest.fixture
def window(qtbot):
    """Sol's main window and its context, built as `sol gui` builds them; its panels are shut down after."""
    from sol.app.main import build_window
    win, ctx = build_window()
    qtbot.addWidget(win)
    yield win, ctx
    for w in win.widgets.values():
        if hasattr(w, "shutdown"):
            w.shutdown()


def require_int8_kernel():
    """Skip where this machine cannot build Sol's int8 kernel (no compiler, no AVX2, not x86-64 Linux: the
    environment's SOL_INT8_KERNEL is cleared by isolated_home); where it can, the kernel must build and load,
    or the test fails."""
    from sol.core.kernels import int8_kernel
    why = int8_kernel._unsupported()
    if why:
        pytest.skip(f"Sol's int8 kernel cannot run here: {why}")
    assert int8_kernel.available(), int8_kernel.why_not()
    return int8_kernel


@pytest.fixture
def tiny_text_file(tmp_path) -> Path:
    p = tmp_path / "tiny.txt"
    p.write_text(TINY_TEXT, encoding="utf-8")
    return p


def make_tiny_model(out: Path, tokenizer: str = "bpe", seed: int = 0, **cfg):
    """A random Sol model directory: byte-level BPE (or char) tokenizer trained on TINY_TEXT."""
    import torch

    from sol.core.formats.checkpoint import save_model
    from sol.core.formats.tokenizer import train_bpe, train_char
    from sol.core.model.config import ModelConfig
    from sol.core.model.transformer import Transformer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / f"{out.name}-corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    tok = train_char([corpus]) if tokenizer == "char" else train_bpe([corpus], 400)
    torch.manual_seed(seed)
    defaults = dict(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, context=128)
    model = Transformer(ModelConfig(**{**defaults, **cfg}))
    save_model(out, model, tok, {"name": out.name, "stage": "base"})
    return out


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return make_tiny_model(tmp_path / "tiny")


@pytest.fixture
def shared_data() -> Path:
    # The corpora are part of the test set-up (CI clones the repo with ../shared beside it): a missing
    # folder is a failure that says what to do, not a silent skip.
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA}: the shared test corpora are missing; put the shared folder beside this checkout")
    return SHARED_DATA
