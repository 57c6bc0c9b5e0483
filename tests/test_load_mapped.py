"""Loading without waste: weights mapped from their files, one meta-device build, no random initialisation."""
from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sol.core.formats.checkpoint import load_model, read_safetensors_header, save_model
from sol.core.formats.mapped import map_safetensors, release
from sol.core.formats.tokenizer import train_char
from sol.core.model.config import ModelConfig
from sol.core.model.transformer import Transformer


@pytest.fixture
def sol_model(tmp_path):
    torch.manual_seed(0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hear me speak, o sun and pluto\n" * 4)
    tok = train_char([corpus])
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, context=32)
    model = Transformer(cfg).eval()
    save_model(tmp_path / "m", model, tok)
    return tmp_path / "m", model


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mapped_tensors_equal_the_librarys_and_share_one_mapping(sol_model):
    d, _ = sol_model
    f = d / "model.safetensors"
    mapped = map_safetensors(f, read_safetensors_header(f))
    read = load_file(str(f))
    assert mapped.keys() == read.keys()
    for k in read:
        assert mapped[k].dtype == read[k].dtype and torch.equal(mapped[k], read[k]), k
    assert len({t.untyped_storage().data_ptr() for t in mapped.values()}) == 1   # views, not copies


def test_a_loaded_float32_model_uses_the_files_bytes_and_never_writes_the_file(sol_model):
    d, original = sol_model
    before = _digest(d / "model.safetensors")
    lm = load_model(d)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids), original(ids))
        storages = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
        assert len(storages) == 1                      # every weight is a view of the one mapping
        for p in lm.model.parameters():                # copy-on-write: changing the model leaves the file alone
            p.add_(1.0)
    assert _digest(d / "model.safetensors") == before
    # and it saves (safetensors refuses tensors that share a storage; the saver gives each its own)
    save_model(d.parent / "again", lm.model, lm.tokenizer)
    again = load_model(d.parent / "again")
    with torch.no_grad():
        assert torch.equal(again.model(ids), lm.model(ids))


def test_loading_builds_once_and_initialises_nothing(sol_model, monkeypatch):
    d, _ = sol_model
    built = []
    real_init = Transformer.__init__

    def counting(self, cfg):
        built.append(cfg)
        real_init(self, cfg)
    monkeypatch.setattr(Transformer, "__init__", counting)

    def refuse(*a, **k):
        raise AssertionError("a loaded model's weights were randomly initialised")
    lm = load_model(d)   # nn.init is swapped for the build; refuse() below would fire only outside it
    assert len(built) == 1
    assert all(not p.is_meta for p in lm.model.parameters())
    assert lm.model.lm_head.weight is lm.model.embed.weight or not lm.model.cfg.tie_embeddings
    monkeypatch.setattr(torch.nn.init, "normal_", refuse)
    load_model(d)


def test_an_empty_model_leaves_torchs_init_functions_and_dynamo_alone():
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, context=16)
    before = {n: getattr(torch.nn.init, n) for n in ("normal_", "uniform_", "kaiming_uniform_", "zeros_")}
    m = Transformer.empty(cfg)
    assert all(p.is_meta for p in m.parameters())
    assert {n: getattr(torch.nn.init, n) for n in before} == before
    code = ("import sys; from sol.core.model.config import ModelConfig; from sol.core.model.transformer import "
            "Transformer; Transformer.empty(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, context=16)); "
            "print('torch._dynamo' in sys.modules)")
    import subprocess
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_release_gives_back_only_the_tensors_own_pages(tmp_path):
    f = tmp_path / "w.safetensors"
    a, b, c = torch.randn(3000), torch.randn(5000), torch.randn(3000)
    save_file({"a": a, "b": b, "c": c}, str(f))
    mapped = map_safetensors(f, read_safetensors_header(f))
    fused = torch.cat([mapped["b"]])
    release(mapped["b"])
    assert torch.equal(mapped["a"], a) and torch.equal(mapped["c"], c) and torch.equal(fused, b)
    assert torch.equal(mapped["b"], b)   # a released page of a private file mapping is read from the file again
    plain = torch.randn(5000)
    keep = plain.clone()
    release(plain)                        # not a mapping of ours: left alone
    assert torch.equal(plain, keep)



def test_auto_keeps_bfloat16_weights_where_they_lie_on_the_cpu(tmp_path, sol_model):
    """dtype None (`--dtype auto`): float32 weights stay float32, bfloat16 ones stay bfloat16 as views of the
    file; float32 is still there when asked for, and both give the same greedy tokens here."""
    from sol.core.devices import pick_dtype
    d, original = sol_model
    assert pick_dtype("auto", torch.device("cpu")) is None
    assert load_model(d).model.dtype == torch.float32
    save_model(tmp_path / "bf16", original.to(torch.bfloat16), load_model(d).tokenizer)
    lm = load_model(tmp_path / "bf16")
    assert lm.model.dtype == torch.bfloat16
    assert len({p.untyped_storage().data_ptr() for p in lm.model.parameters()}) == 1   # not copied
    exact = load_model(tmp_path / "bf16", dtype=torch.float32)
    assert exact.model.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = lm.model(ids).float(), exact.model(ids)
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()


def test_a_dropped_models_mapping_is_forgotten(sol_model):
    """The registry of mappings must not keep a dropped model's file mapped (nor, once it is unmapped, treat
    whatever memory later lands at its addresses as a mapping)."""
    import gc

    from sol.core.formats import mapped
    d, _ = sol_model
    gc.collect()
    before = len(mapped._MAPPED)
    lm = load_model(d)
    assert len(mapped._MAPPED) == before + 1
    del lm
    gc.collect()
    assert len(mapped._MAPPED) == before


def test_a_model_built_on_another_thread_meanwhile_is_still_initialised(monkeypatch):
    """Transformer.empty swaps torch.nn.init's functions process-wide; another thread building a real
    model at that moment (the GUI creating one while loading another) must still get random weights."""
    import threading

    from sol.core.model import transformer as T
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, context=16)
    inside, release_build = threading.Event(), threading.Event()
    real_init = T.Transformer.__init__

    def slow_init(self, c):
        real_init(self, c)
        if self.embed.weight.is_meta:   # the empty build: hold the swap open while the other thread builds
            inside.set()
            release_build.wait(10)
    monkeypatch.setattr(T.Transformer, "__init__", slow_init)
    worker = threading.Thread(target=T.Transformer.empty, args=(cfg,))
    worker.start()
    assert inside.wait(10)
    torch.manual_seed(0)
    real = T.Transformer(cfg)
    release_build.set()
    worker.join(10)
    w = real.embed.weight
    assert bool(torch.isfinite(w).all()) and 0.015 < w.std().item() < 0.025   # N(0, 0.02), not left as allocated
