"""load_model(progress=...) tells its caller (the GUI's status bar) how far a load is, from where the work is
done: a GGUF file's tensors as they are read, a folder's stages and tensors; a callback that raises is ignored."""
from __future__ import annotations

import pytest
import torch

from sol.core.formats import gguf_io
from sol.core.formats.checkpoint import load_model
from sol.core.formats.registry import builtin_models_dir


@pytest.fixture(scope="module")
def starter():
    d = builtin_models_dir() / "starter"
    assert (d / "config.json").is_file(), f"{d}: the shipped starter model is missing"
    return d


@pytest.fixture(scope="module")
def starter_gguf(starter, tmp_path_factory):
    """The starter exported as float32 and as Q8_0 GGUF files."""
    out = tmp_path_factory.mktemp("gguf")
    lm = load_model(starter)
    return {kind: gguf_io.export_gguf(lm, out / f"starter-{kind}.gguf", kind) for kind in ("f32", "q8_0")}


def _load(path, **kw):
    seen = []
    lm = load_model(path, progress=lambda f, what: seen.append((f, what)), **kw)
    return lm, seen


def _check_reports(seen):
    fractions = [f for f, _ in seen]
    assert len(seen) > 10
    assert all(isinstance(f, float) and 0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions), "the fraction went back"
    assert fractions[0] < 0.1 and len(set(fractions)) > 10   # it moves, in many steps
    assert seen[-1] == (1.0, "ready")
    assert all(isinstance(w, str) and w for _, w in seen)


@pytest.mark.parametrize("kind,quantize", [("f32", None), ("q8_0", "auto")])
def test_a_gguf_load_reports_each_tensor_it_reads(starter_gguf, kind, quantize):
    path = starter_gguf[kind]
    lm, seen = _load(path, quantize=quantize)
    _check_reports(seen)
    names = {t.name for t in gguf_io.open_gguf(path).tensors}
    read = [w.removeprefix("reading ") for _, w in seen if w.removeprefix("reading ") in names]
    assert sorted(read) == sorted(names)          # every tensor of the file, each once, as it is read
    fractions = [f for f, w in seen if w.removeprefix("reading ") in names]
    assert len(set(fractions)) == len(names)      # each one a step further
    assert lm.model(torch.tensor([[1, 2, 3]])).shape[-1] == lm.config.vocab_size


def test_a_folder_load_reports_its_stages_and_tensors(starter):
    lm, seen = _load(starter)
    _check_reports(seen)
    whats = [w for _, w in seen]
    tensors = set(lm.model.state_dict()) - {"lm_head.weight"}   # tied to the token table
    assert {w.removeprefix("checking ") for w in whats if w.startswith("checking ")} == tensors
    assert {w.removeprefix("building ") for w in whats if w.startswith("building ")} == tensors
    assert whats[0].startswith("opening ") and any(w.startswith("opened ") for w in whats)


def test_a_hugging_face_folder_reports_renaming_its_tensors(tmp_path):
    pytest.importorskip("transformers")
    from hf_models import make_hf_model
    make_hf_model("qwen2", tmp_path / "qwen2")
    _, seen = _load(tmp_path / "qwen2")
    _check_reports(seen)
    assert any(w == "reading model.layers.1.self_attn.q_proj.weight" for _, w in seen)


def test_an_int8_folder_load_reports_quantizing_before_ready(starter):
    _, seen = _load(starter, quantize="int8")
    _check_reports(seen)
    assert seen[-2][1] == "quantizing to int8"


@pytest.mark.parametrize("which", ["folder", "f32", "q8_0"])
def test_a_progress_callback_that_raises_does_not_break_loading(starter, starter_gguf, which):
    path = starter if which == "folder" else starter_gguf[which]
    calls = []

    def broken(fraction, what):
        calls.append(fraction)
        raise RuntimeError("the window that watched this load is gone")
    lm = load_model(path, progress=broken)
    plain = load_model(path)
    assert len(calls) > 10 and calls[-1] == 1.0   # still told, to the end
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids), plain.model(ids))
