"""GGUF files of the families Sol also runs from Hugging Face folders: qwen3, gemma2, gemma3 (text) and phi3.

Each tiny random transformers model is written to GGUF F32 twice, by Sol's exporter (`sol models export`) and,
where this machine has llama.cpp's sources, by llama.cpp's own convert_hf_to_gguf.py; both files load in Sol
into the folder's config and compute transformers' logits. Sol's export holds the converter's tensors byte
for byte. What llama.cpp would compute otherwise is refused, naming the key."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import VOCAB, make_hf_model
from sol.core.cli import main
from sol.core.errors import SolError
from sol.core.formats import gguf_io
from sol.core.formats.checkpoint import load_model
from sol.core.formats.gguf_file import GGUFFile

FAMILIES = ["qwen3", "gemma2-tied", "gemma3-tied", "phi3", "phi3-longrope"]
ARCH = {"qwen3": "qwen3", "gemma2-tied": "gemma2", "gemma3-tied": "gemma3", "phi3": "phi3", "phi3-longrope": "phi3"}
TEXT = "  Olá, café naïve! 世界 🌍🎉 It is   the east.\n\tJuliet is the sun."


def _llama_cpp() -> Path | None:
    """llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py), as .ci/run and benchmarks/ unpack it."""
    if os.environ.get("SOL_LLAMA_CPP"):
        return Path(os.environ["SOL_LLAMA_CPP"])
    found = sorted((Path.home() / ".cache" / "sol-bench" / "llamacpp").glob("llama_cpp_python-*/vendor/llama.cpp"))
    return found[-1] if found else None


LLAMA_CPP = _llama_cpp()

# convert_hf_to_gguf.py as it is, in its own process (it imports its own gguf-py), with three answers patched in
# for these test folders, none of them about tensors or model metadata:
# - the tokenizer's pre-tokenizer is GPT-2's ByteLevel, whose hash of a tiny vocabulary the converter cannot
#   know: get_vocab_base_pre says "gpt-2";
# - the vocabulary is a byte-level BPE tokenizer.json: Qwen2/3 and Phi-3 would take that path themselves without
#   a tokenizer.model (but import sentencepiece before looking), Gemma 2 assumes SentencePiece: all write it as
#   the converter writes any BPE vocabulary (_set_vocab_gpt2).
CONVERT = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
from conversion import base, gemma, phi, qwen
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
for cls in (gemma.Gemma2Model, qwen.Qwen2Model, phi.Phi3MiniModel):
    cls.set_vocab = lambda self: self._set_vocab_gpt2()
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _hf_folder(family: str, folder: Path):
    ref = make_hf_model(family, folder)
    # transformers' AutoTokenizer (which the converter reads the vocabulary with) takes tokenizer.json as it is;
    # without this it picks the family's class, and Qwen's adds <|endoftext|> past the vocabulary.
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return ref


def _export(model: str, out: Path) -> Path:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", "export", model, "--format", "gguf", "--out", str(out), "--type", "f32"]) == 0
    assert "wrote" in buf.getvalue()
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, HF folder, Sol's GGUF export of it, the transformers model)."""
    folder = tmp_path_factory.mktemp("families") / request.param
    ref = _hf_folder(request.param, folder)
    return request.param, folder, _export(str(folder), folder.parent / f"{request.param}.gguf"), ref


def _logits(model, seed: int = 1, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of `length` ids (past every test model's sliding window of 8 or 12, and Phi-3 longrope's
    original 16 positions) and the logits `model` gives them."""
    x = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x)
    return x, getattr(out, "logits", out)


def _check_against_folder(path: Path, folder: Path, ref, family: str) -> float:
    """`path` loads into the folder's config and state dict and computes transformers' logits; the largest
    logit difference."""
    lm, want = load_model(path, dtype=torch.float32), load_model(folder)
    assert lm.format == "gguf" and gguf_io.inspect_gguf(path)["architecture"] == ARCH[family]
    assert lm.config.to_dict() == want.config.to_dict()
    got_sd, want_sd = lm.model.state_dict(), want.model.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for k, t in want_sd.items():   # Gemma's norms come back from 1 + weight in float32
        assert torch.allclose(got_sd[k], t, rtol=0, atol=1e-6), k
    _, expected = _logits(ref)
    _, got = _logits(lm.model)
    assert expected.std() > 0.1
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"{family}: max logit difference {diff}"
    return diff


def test_sol_export_loads_as_the_folder_and_matches_transformers(family):
    name, folder, path, ref = family
    _check_against_folder(path, folder, ref, name)


def test_gguf_round_trips(family, tmp_path):
    """export -> load -> the folder's logits; written out again, the same tensors and model metadata."""
    name, folder, path, _ = family
    _, from_folder = _logits(load_model(folder).model)
    _, from_gguf = _logits(load_model(path).model)
    assert torch.equal(from_gguf, from_folder)
    again = _export(str(path), tmp_path / "again.gguf")
    first, second = GGUFFile(path), GGUFFile(again)
    assert [t.name for t in first.tensors] == [t.name for t in second.tensors]
    for a, b in zip(first.tensors, second.tensors):
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name
    model_keys = {k: v for k, v in first.metadata.items() if k.startswith(ARCH[name] + ".")}
    assert model_keys == {k: v for k, v in second.metadata.items() if k.startswith(ARCH[name] + ".")}


# ---- llama.cpp's own converter ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(family):
    """The same folder written by llama.cpp's convert_hf_to_gguf.py."""
    if LLAMA_CPP is None or not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not on this machine (SOL_LLAMA_CPP names its folder)")
    name, folder, _, _ = family
    out = folder.parent / f"{name}-llama.cpp.gguf"
    if not out.exists():
        run = subprocess.run([sys.executable, "-c", CONVERT, str(LLAMA_CPP), str(folder), "--outfile", str(out),
                              "--outtype", "f32"], capture_output=True, text=True, timeout=300, check=False)
        if run.returncode and "ModuleNotFoundError" in run.stderr:
            pytest.skip(f"llama.cpp's converter cannot be imported here: {run.stderr.strip().splitlines()[-1]}")
        assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_llama_cpp_converter_output_loads_as_the_folder(family, converted):
    name, folder, _, ref = family
    _check_against_folder(converted, folder, ref, name)
    # The vocabulary the converter wrote (no Sol copy of tokenizer.json in it) encodes as the folder's.
    want = load_model(folder).tokenizer.encode_ids(TEXT)
    assert gguf_io.tokenizer_of_gguf(converted).encode_ids(TEXT) == want


# Keys the converter writes that Sol's config does not keep: Phi-3's original context outside longrope, which
# llama.cpp uses only with the longrope factors.
UNUSED_KEYS = {"phi3": {"phi3.rope.scaling.original_context_length"}}


def test_sol_export_holds_the_converters_tensors_and_keys(family, converted):
    """Tensor for tensor the same bytes (names, types, shapes, values; Gemma's norms +1, Phi-3's fused
    attn_qkv and ffn_up), and every model key the converter writes with its value. Sol writes a few more that
    llama.cpp reads with these same defaults (rope.dimension_count, key_length, gemma2's rope.freq_base)."""
    name, _, path, _ = family
    ours, theirs = GGUFFile(path), GGUFFile(converted)
    mine = {t.name: t for t in ours.tensors}
    assert sorted(mine) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        m = mine[t.name]
        assert (m.tensor_type, m.shape.tolist()) == (t.tensor_type, t.shape.tolist()), t.name
        assert np.array_equal(np.asarray(m.data), np.asarray(t.data)), t.name
    arch = ARCH[name]
    keys = {k: v for k, v in theirs.metadata.items() if k.startswith(arch + ".") and k not in UNUSED_KEYS.get(name, ())}
    assert keys and {k: ours.metadata.get(k) for k in keys} == keys
    assert theirs.metadata["general.architecture"] == ours.metadata["general.architecture"] == arch


# What the converter wrote for these folders, recorded where it ran (tests/data/llama_cpp_converter.json):
# CI has no llama.cpp sources, so there Sol's export is held to the record; where the converter runs, the
# record is held to the converter, so it cannot drift from what the converter writes.
RECORD = Path(__file__).parent / "data" / "llama_cpp_converter.json"


def _description(path: Path, name: str) -> dict:
    """A GGUF file's tensors (name: [type, shape]) and model keys, as JSON holds them."""
    f = GGUFFile(path)
    arch = ARCH[name]
    return {"architecture": f.metadata["general.architecture"],
            "tensors": {t.name: [t.tensor_type.name, t.shape.tolist()] for t in f.tensors},
            "keys": {k: v for k, v in f.metadata.items() if k.startswith(arch + ".") and k not in UNUSED_KEYS.get(name, ())}}


def test_sol_export_holds_the_recorded_converter_tensors_and_keys(family):
    """Every tensor name, type and shape and every model key the converter wrote for this folder (recorded),
    in Sol's export: the check that runs where llama.cpp's sources are not."""
    name, _, path, _ = family
    want = json.loads(RECORD.read_text())[name]
    got = _description(path, name)
    assert got["architecture"] == want["architecture"] and got["tensors"] == want["tensors"]
    assert want["keys"] and {k: got["keys"].get(k) for k in want["keys"]} == want["keys"]


def test_the_record_is_what_the_converter_writes(family, converted):
    name = family[0]
    assert json.loads(RECORD.read_text())[name] == json.loads(json.dumps(_description(converted, name)))


# ---- what only some files hold ---------------------------------------------------------------------
def test_a_gemma3_sliding_pattern_other_than_llama_cpps_travels_per_layer(tmp_path):
    """convert_hf_to_gguf.py writes no pattern for Gemma 3 and llama.cpp assumes 1 global layer in 6; a model
    with another (here 1 in 2) gets llama.cpp's per-layer flags, and loads back with its own layer_types."""
    folder = tmp_path / "gemma3-2"
    _hf_folder("gemma3-tied", folder)
    cfg = json.loads((folder / "config.json").read_text())
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])]
    cfg.update(layer_types=types, sliding_window_pattern=2, _sliding_window_pattern=2)
    (folder / "config.json").write_text(json.dumps(cfg))
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert ref.config.layer_types == types
    path = _export(str(folder), tmp_path / "gemma3-2.gguf")
    assert GGUFFile(path).metadata["gemma3.attention.sliding_window_pattern"] == [t == "sliding_attention"
                                                                                 for t in types]
    _check_against_folder(path, folder, ref, "gemma3-tied")


@pytest.mark.parametrize("family, change, named", [
    ("gemma2", {}, r"query_pre_attn_scalar 24.*1/sqrt\(16\).*tie_word_embeddings"),
    ("gemma2-tied", {"attn_softcap": None}, "attn_logit_softcapping"),
    ("gemma3", {}, r"query_pre_attn_scalar 24.*gemma3 takes 1/sqrt\(32\)"),
    ("gemma3-tied", {"attn_softcap": 3.0}, "attn_logit_softcapping"),
    ("qwen3", {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window"),
    ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_scaling 'yarn'"),
    ("phi3", {"proj_bias": True}, "proj_bias"),
])
def test_export_refuses_what_llama_cpp_would_compute_otherwise(tmp_path, family, change, named):
    folder = tmp_path / family
    make_hf_model(family, folder)
    lm = load_model(folder)
    lm.config = replace(lm.config, **change)
    out = tmp_path / "out.gguf"
    with pytest.raises(SolError, match=f"{re.escape(str(folder))}: this .* model cannot be written as GGUF: .*{named}"):
        gguf_io.export_gguf(lm, out)
    assert not out.exists()


def _meta_and_shapes(path: Path) -> tuple[dict, dict]:
    f = GGUFFile(path)
    return dict(f.metadata), {t.name: tuple(int(s) for s in reversed(t.shape)) for t in f.tensors}


def test_family_metadata_errors_name_the_file_and_key(family):
    name, _, path, _ = family
    meta, shapes = _meta_and_shapes(path)
    arch = ARCH[name]
    if arch in ("gemma2", "gemma3"):
        meta[f"{arch}.attention.sliding_window_pattern"] = [True, False]
        with pytest.raises(SolError, match=f"{path}: {arch}.attention.sliding_window_pattern lists 2 layers"):
            gguf_io.config_from_gguf(meta, shapes, path)
    if arch == "phi3":
        half = meta["phi3.rope.dimension_count"] // 2
        with pytest.raises(SolError, match=f"{path}: tensor 'rope_factors_short.weight' is missing"):
            gguf_io.config_from_gguf(meta, shapes, path, None, {"rope_factors_long.weight": [1.0] * half})
        with pytest.raises(SolError, match=f"{path}: tensor 'rope_factors_long.weight' holds 3 numbers"):
            gguf_io.config_from_gguf(meta, shapes, path, None, {f"rope_factors_{k}.weight": [1.0] * 3
                                                                for k in ("long", "short")})
    with pytest.raises(SolError, match=f"{path}: tensor 'rope_freqs.weight' has no place in a {arch} model"):
        gguf_io.config_from_gguf(meta, shapes, path, [1.0] * 8)


# ---- found by name in Ollama's and LM Studio's stores ----------------------------------------------
@pytest.mark.parametrize("family", ["gemma3-tied"], indirect=True)
def test_a_family_gguf_opens_by_store_name(family, tmp_path, monkeypatch):
    import hashlib

    from sol.core.formats.registry import resolve
    *_, path, ref = family
    home = tmp_path / "user"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("OLLAMA_MODELS")   # the default: ~/.ollama/models
    store = home / ".ollama" / "models"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True)
    shutil.copy(path, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "gemma3" / "tiny"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": path.stat().st_size}]}))
    lms = home / ".lmstudio" / "models" / "google" / "gemma-3-tiny-GGUF"
    lms.mkdir(parents=True)
    shutil.copy(path, lms / "gemma-3-tiny-F32.gguf")

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", "list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(buf.getvalue())}
    _, want = _logits(ref)
    for store_name in ("ollama:gemma3:tiny", "lmstudio:google/gemma-3-tiny-GGUF/gemma-3-tiny-F32.gguf"):
        assert listed[store_name]["architecture"] == "gemma3" and listed[store_name]["format"] == "gguf"
        _, got = _logits(load_model(resolve(store_name)).model)
        assert (got - want).abs().max().item() <= 1e-4
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["generate", "--model", store_name, "--prompt", "It is", "--max-tokens", "4",
                         "--temperature", "0", "--device", "cpu", "--json"]) == 0
        assert len(json.loads(buf.getvalue().splitlines()[-1])["token_ids"]) == 4
