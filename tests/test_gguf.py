"""GGUF: tiny random transformers models written to GGUF (llama.cpp's conventions) load in Sol and compute
what transformers computes; tokenizers rebuilt from GGUF metadata encode like the original tokenizer.json;
corrupt files give one error line naming the file."""
import io
import json
from contextlib import redirect_stdout

import gguf  # noqa: E402  (a dependency of Sol; transformers is in the test extra)
import numpy as np
import pytest
import torch
from hf_models import VOCAB, make_hf_model

from sol.core.cli import main
from sol.core.errors import SolError
from sol.core.formats import gguf_io  # noqa: E402
from sol.core.formats.checkpoint import load_model

TEXT = "  Olá, café naïve! 世界 🌍🎉 It is   the east.\n\tJuliet <|endoftext|> is the sun <|end|>."


@pytest.fixture(scope="module", params=["llama-gqa-tied", "qwen2", "gpt2", "llama3-rope"])
def gguf_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf") / request.param
    ref = make_hf_model(request.param, folder)
    out = gguf_io.export_gguf(load_model(folder), folder.parent / f"{request.param}.gguf", "f32")
    return request.param, folder, out, ref


def test_gguf_logits_match_transformers(gguf_pair):
    family, folder, path, ref = gguf_pair
    lm = load_model(path)
    assert lm.format == "gguf" and lm.config.architecture == family.split("-")[0].replace("llama3", "llama")
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x).logits
        got = lm.model(x)
    assert expected.std() > 0.1
    assert (got - expected).abs().max().item() <= 1e-4


def test_gguf_greedy_matches_transformers_generate(gguf_pair):
    family, folder, path, ref = gguf_pair
    tok = load_model(path).tokenizer
    ids = tok.encode_ids("It is the east, and")
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    expected = out[0, len(ids):].tolist()
    assert len(set(expected)) > 3
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["generate", "--model", str(path), "--prompt", "It is the east, and", "--max-tokens", "24",
                   "--temperature", "0", "--device", "cpu", "--json"])
    assert rc == 0
    assert json.loads(buf.getvalue().splitlines()[-1])["token_ids"] == expected


@pytest.mark.parametrize("gguf_pair", ["llama-gqa-tied"], indirect=True)   # only llama-arch files are permuted
def test_llama_q_k_are_stored_permuted_as_llama_cpp_does(gguf_pair):
    """convert_hf_to_gguf.py's permute, written out here on its own: GGUF's attn_q/attn_k are the HF
    weights with each head's rows reordered from (2, half) to (half, 2)."""
    family, folder, path, ref = gguf_pair
    cfg = ref.config

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    attn = ref.model.layers[1].self_attn
    q = np.asarray(tensors["blk.1.attn_q.weight"].data)
    k = np.asarray(tensors["blk.1.attn_k.weight"].data)
    assert np.array_equal(q, permute(attn.q_proj.weight.detach().numpy(), cfg.num_attention_heads))
    assert np.array_equal(k, permute(attn.k_proj.weight.detach().numpy(), cfg.num_key_value_heads))
    assert not np.array_equal(q, attn.q_proj.weight.detach().numpy())


def _llama_cpp_rope_factors(folder):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, written out on its own: the rope_freqs.weight
    it derives from config.json for rope_type "llama3" (the original context read at the top level, 8192 if
    absent, as llama.cpp does)."""
    import math
    hp = json.loads((folder / "config.json").read_text())
    rp = hp.get("rope_parameters") or hp["rope_scaling"]
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (rp.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = hp.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


@pytest.mark.parametrize("gguf_pair", ["llama3-rope"], indirect=True)
def test_llama3_rope_is_written_as_llama_cpp_rope_freqs(gguf_pair):
    """Llama 3.1's scaling travels as llama.cpp's rope_freqs.weight (no rope.scaling.type key), with the
    values convert_hf_to_gguf.py writes; all three bands occur in this model."""
    family, folder, path, ref = gguf_pair
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    got = np.asarray(tensors["rope_freqs.weight"].data)
    want = _llama_cpp_rope_factors(folder)
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert np.allclose(got, want, rtol=1e-6, atol=0)
    assert want[0] == 1 and want[-1] == 4.0 and 1 < want[1] < 4   # kept, smoothed, divided
    assert "llama.rope.scaling.type" not in gguf_io.metadata(reader)


@pytest.mark.parametrize("gguf_pair", ["llama3-rope"], indirect=True)
def test_rope_freqs_are_used_as_llama_cpp_uses_them(gguf_pair, tmp_path):
    """Sol reads rope_freqs.weight as per-frequency divisors (so a Llama 3.x GGUF loads): ignoring them would
    change the logits; a GGUF model written out again keeps them, in every --type."""
    family, folder, path, ref = gguf_pair
    lm = load_model(path)
    assert lm.config.rope_scaling["rope_type"] == "freq_factors"
    x = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    plain = gguf_io.load_gguf(path)
    plain.model.cfg.rope_scaling = None
    plain.model._rope_tables.clear()
    with torch.no_grad():
        assert (plain.model(x) - ref(x).logits).abs().max().item() > 1e-2
    want = np.asarray({t.name: t for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"].data)
    for kind in ("f32", "q8_0"):
        again = gguf_io.export_gguf(lm, tmp_path / f"again-{kind}.gguf", kind)
        got = {t.name: t for t in gguf.GGUFReader(again).tensors}["rope_freqs.weight"]
        assert got.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(got.data), want)


# ---- tokenizers from metadata ------------------------------------------------
def _round_trip(tok, tmp_path, cfg_vocab):
    """The tokenizer written to GGUF metadata and rebuilt from the llama.cpp fields alone."""
    from sol.core.model.config import ModelConfig
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    gguf_io._write_tokenizer(w, tok, ModelConfig(vocab_size=cfg_vocab), tmp_path)
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = gguf_io.metadata(gguf.GGUFReader(tmp_path / "t.gguf"))
    return meta, gguf_io.tokenizer_from_gguf(meta, tmp_path, prefer_sol=False)


def _corpus(tmp_path):
    from hf_models import CORPUS
    f = tmp_path / "corpus.txt"
    f.write_text(CORPUS + "The sun sets; Romeo's lines aren't 1234 numbers.\n" * 20, encoding="utf-8")
    return f


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_byte_level_bpe_tokenizer_round_trips(tmp_path, pre):
    from tokenizers import Regex, pre_tokenizers

    from sol.core.formats.tokenizer import train_bpe
    tok = train_bpe([_corpus(tmp_path)], 400)
    if pre != "gpt-2":   # the Split + ByteLevel form transformers writes for Qwen2 and Llama 3
        tok.hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(gguf_io.PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    meta, rebuilt = _round_trip(tok, tmp_path, tok.vocab_size + 7)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == pre
    assert len(meta["tokenizer.ggml.tokens"]) == tok.vocab_size + 7   # padded to the embedding's rows
    want = tok.encode_ids(TEXT)
    assert want.count(tok.token_to_id("<|endoftext|>")) == 1
    assert rebuilt.encode_ids(TEXT) == want
    assert rebuilt.decode(want) == TEXT
    assert rebuilt.eos_id == tok.eos_id and rebuilt.chat_template == tok.chat_template


def _spm_tokenizer(tmp_path):
    """A Llama-2-style tokenizer.json: <unk> <s> </s>, 256 <0xNN> byte tokens, then BPE pieces over ▁-spaced
    text; byte fallback for what the pieces lack; <s> prepended."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, normalizers, processors, trainers

    from sol.core.formats.tokenizer import Tokenizer
    hf = HF(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.train([str(_corpus(tmp_path))], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    spec = json.loads(hf.to_str())
    specials = ["<unk>", "<s>", "</s>"]
    pieces = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    spec["model"]["vocab"] = vocab
    spec["model"]["fuse_unk"] = True
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(specials)]
    hf = HF.from_str(json.dumps(spec))
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>"})


def test_sentencepiece_tokenizer_round_trips(tmp_path):
    tok = _spm_tokenizer(tmp_path)
    meta, rebuilt = _round_trip(tok, tmp_path, tok.vocab_size)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.token_type"][3] == gguf_io.BYTE
    text = TEXT.replace("<|endoftext|>", "</s>").replace("<|end|>", "<s>")
    want = tok.encode_ids(text)
    assert want[0] == 1 and any(3 <= i < 259 for i in want)   # bos, and byte fallback for 🌍 at least
    assert rebuilt.encode_ids(text) == want
    assert rebuilt.decode(want, skip_special_tokens=True) == tok.decode(want, skip_special_tokens=True)
    assert rebuilt.bos_id == 1 and rebuilt.eos_id == 2


# ---- tensor types --------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"])
def test_quantized_tensors_dequantize_as_gguf_does(tmp_path, qtype):
    """A (48, 256) tensor of each type: Sol's float32 equals gguf.quants.dequantize's, in torch's (out, in) order."""
    Q = gguf.GGMLQuantizationType
    t = getattr(Q, qtype)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(48, 256)).astype(np.float32)
    block, nbytes = gguf.GGML_QUANT_SIZES[t]
    try:
        raw = gguf.quants.quantize(a, t)
    except NotImplementedError:   # K-quants: gguf-py only dequantizes; random blocks with sane f16 scales
        raw = rng.integers(0, 256, size=(48, 256 // block * nbytes), dtype=np.uint8)
        scales = np.array([0.01], np.float16).view(np.uint8)
        blocks = raw.reshape(48, -1, nbytes)
        blocks[..., -2:] = scales if qtype == "Q6_K" else blocks[..., -2:]   # Q6_K: d is last
        if qtype != "Q6_K":
            blocks[..., 0:2] = scales   # d
            blocks[..., 2:4] = scales   # dmin
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("w", raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tensor,) = gguf.GGUFReader(tmp_path / "q.gguf").tensors
    got = gguf_io.tensor_to_torch(tensor, tmp_path)
    want = gguf.quants.dequantize(raw, t).reshape(48, 256)
    assert got.shape == (48, 256) and got.dtype == torch.float32
    assert np.isfinite(want).all() and np.array_equal(got.numpy(), want)
    if qtype in ("F16", "BF16", "Q8_0"):
        assert np.abs(got.numpy() - a).max() < 0.05 * np.abs(a).max()


# ---- corrupt files --------------------------------------------------------------
def _error(path):
    err = io.StringIO()
    from contextlib import redirect_stderr
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        rc = main(["generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "1", "--device", "cpu"])
    lines = err.getvalue().strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt") / "llama"
    make_hf_model("llama-gqa-tied", folder)
    return gguf_io.export_gguf(load_model(folder), folder.parent / "good.gguf")


def test_bad_magic(good_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + good_gguf.read_bytes()[4:])
    assert "not a GGUF file" in _error(bad)


def test_truncated_tensor_data(good_gguf, tmp_path):
    bad = tmp_path / "short.gguf"
    bad.write_bytes(good_gguf.read_bytes()[:-1000])
    assert "truncated" in _error(bad)


def test_unknown_tensor_type(good_gguf, tmp_path):
    reader = gguf.GGUFReader(good_gguf)
    field = reader.tensors[0].field    # name, n_dims, dims, type, offset: the type's 4 bytes
    offset = field.offset + sum(p.nbytes for p in field.parts[:-2])
    data = bytearray(good_gguf.read_bytes())
    data[offset:offset + 4] = (250).to_bytes(4, "little")
    bad = tmp_path / "type.gguf"
    bad.write_bytes(bytes(data))
    assert "unknown tensor type" in _error(bad)


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "architecture 'mamba' is not supported" in _error(tmp_path / "mamba.gguf")
    with pytest.raises(SolError, match="mamba"):
        gguf_io.inspect_gguf(tmp_path / "mamba.gguf")


def test_bad_rope_freqs_are_one_error(good_gguf):
    reader = gguf.GGUFReader(good_gguf)
    meta = gguf_io.metadata(reader)
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
    half = gguf_io.config_from_gguf(meta, shapes, good_gguf).head_dim // 2
    with pytest.raises(SolError, match=f"good.gguf: rope_freqs.weight holds 3 numbers; .* need {half}"):
        gguf_io.config_from_gguf(meta, shapes, good_gguf, [1.0] * 3)
    with pytest.raises(SolError, match="not a positive number"):
        gguf_io.config_from_gguf(meta, shapes, good_gguf, [1.0] * (half - 1) + [float("nan")])
    cfg = gguf_io.config_from_gguf(meta, shapes, good_gguf, [2.0] * half)
    assert cfg.rope_scaling == {"rope_type": "freq_factors", "freq_factors": [2.0] * half}


# ---- finding GGUF files: Sol's folder, the HF cache, Ollama, LM Studio ----------
def test_ollama_and_lmstudio_stores_are_listed_and_load_by_name(good_gguf, tmp_path, monkeypatch, isolated_home):
    import hashlib
    import shutil
    home = tmp_path / "user"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("OLLAMA_MODELS")   # the default: ~/.ollama/models
    q8 = gguf_io.export_gguf(load_model(good_gguf), tmp_path / "q8.gguf", "q8_0")
    # Ollama: a manifest per model and tag; its model layer names the blob by digest.
    store = home / ".ollama" / "models"
    digest = hashlib.sha256(q8.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True)
    shutil.copy(q8, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                               "digest": "sha256:" + "0" * 64, "size": 10},
                                    "layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": f"sha256:{digest}", "size": q8.stat().st_size},
                                               {"mediaType": "application/vnd.ollama.image.template",
                                                "digest": "sha256:" + "1" * 64, "size": 5}]}))
    # LM Studio: publisher/repo/file.gguf, in the current and the older folder.
    lms = home / ".lmstudio" / "models" / "pub" / "tiny-GGUF"
    lms.mkdir(parents=True)
    shutil.copy(good_gguf, lms / "tiny-F32.gguf")
    old = home / ".cache" / "lm-studio" / "models" / "pub" / "old-GGUF"
    old.mkdir(parents=True)
    (old / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    # Sol's own models folder and the HF cache.
    (isolated_home / "models").mkdir(exist_ok=True)
    shutil.copy(q8, isolated_home / "models" / "mine.gguf")
    snap = isolated_home / "hf" / "hub" / "models--org--tiny-GGUF" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    shutil.copy(good_gguf, snap / "tiny.f32.gguf")

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", "list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(buf.getvalue())}
    for name, quant in (("ollama:tiny:1b", "Q8_0"), ("lmstudio:pub/tiny-GGUF/tiny-F32.gguf", "F32"),
                        ("mine.gguf", "Q8_0"), ("org/tiny-GGUF/tiny.f32.gguf", "F32")):
        m = listed[name]
        assert m["format"] == "gguf" and m["quantization"] == quant and m["architecture"] == "llama", m
        assert m["parameters"] > 0 and "broken" not in m
    assert listed["ollama:tiny:1b"]["path"] == str(store / "blobs" / f"sha256-{digest}")   # read in place
    assert "truncated or corrupt" in listed["lmstudio:pub/old-GGUF/broken.gguf"]["broken"]
    for name in ("ollama:tiny:1b", "lmstudio:pub/tiny-GGUF/tiny-F32.gguf", "mine.gguf"):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["generate", "--model", name, "--prompt", "It is", "--max-tokens", "4",
                         "--temperature", "0", "--device", "cpu", "--json"]) == 0
        assert len(json.loads(buf.getvalue().splitlines()[-1])["token_ids"]) == 4
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", "info", "ollama:tiny:1b", "--json"]) == 0
    assert json.loads(buf.getvalue())["format"] == "gguf"


# ---- export ------------------------------------------------------------------------
def _ask_12_times_7(lm):
    from sol.core.chat.session import ChatSession
    from sol.core.generation.engine import GenerationParams
    from sol.core.generation.sampling import SamplingParams
    from sol.core.plugins.manager import PluginManager
    chat = ChatSession(lm, plugins=PluginManager())
    events = list(chat.send("what is 12 times 7?", GenerationParams(max_tokens=64,
                                                                    sampling=SamplingParams(temperature=0))))
    calls = [(e["name"], e.get("arguments")) for e in events if e.get("type") == "tool_call"]
    return calls, [m["content"] for m in chat.messages if m["role"] == "assistant"]


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_starter_exported_to_gguf_answers_the_same(tmp_path, kind):
    from sol.core.formats.registry import builtin_models_dir
    starter = builtin_models_dir() / "starter"
    assert (starter / "sol.json").is_file(), f"{starter}: the shipped starter model is missing"
    out = tmp_path / f"starter-{kind}.gguf"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", "export", "starter", "--format", "gguf", "--out", str(out), "--type", kind]) == 0
    assert out.is_file() and "wrote" in buf.getvalue()
    meta = gguf_io.metadata(gguf.GGUFReader(out))
    assert meta["general.architecture"] == "gpt2" and "<|assistant|>" in meta["tokenizer.chat_template"]
    # llama.cpp refuses a gpt2 vocabulary without merges ("cannot find tokenizer merges"): the character
    # vocabulary carries one that changes nothing, and the vocabulary read back without Sol's copy encodes alike.
    assert len(meta["tokenizer.ggml.merges"]) == 1
    text = "what is 12 times 7? <|end|>"
    want = load_model(starter).tokenizer.encode_ids(text)
    assert gguf_io.tokenizer_from_gguf(meta, out, prefer_sol=False).encode_ids(text) == want
    calls, answer = _ask_12_times_7(load_model(out))
    want_calls, want_answer = _ask_12_times_7(load_model(starter))
    assert want_calls and want_calls[0][0] == "calculator" and "84" in want_answer[-1]
    assert (calls, answer) == (want_calls, want_answer)
    # An existing file is never overwritten.
    assert main(["models", "export", "starter", "--format", "gguf", "--out", str(out)]) == 1


def test_export_refuses_an_architecture_gguf_lacks(tmp_path):
    folder = tmp_path / "mistral"   # llama.cpp's llama has no sliding window (the families': test_gguf_families.py)
    make_hf_model("mistral-sliding", folder)
    with pytest.raises(SolError, match="sliding_window.*no GGUF architecture"):
        gguf_io.export_gguf(load_model(folder), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---- int8 weights ----------------------------------------------------------------
def test_int8_linear_matches_float_and_takes_the_decode_fast_path():
    from sol.core.model import layers as model_mod
    from sol.core.model.quant import Int8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 70)
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (70,)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        want = lin(x)
        assert (q(x) - want).abs().max().item() < 0.02 * want.abs().max().item()
        assert torch.equal(model_mod._linear(q, x), q(x))
        # Whichever CPU product runs computes the dequantized one (up to how its activations go in).
        deq = torch.nn.functional.linear(x, q.int8_weight().float() * q.scales[:, None], q.bias)
        assert (q(x) - deq).abs().max().item() < 0.01 * deq.abs().max().item()


def _starter():
    from sol.core.formats.registry import builtin_models_dir
    starter = builtin_models_dir() / "starter"
    assert (starter / "sol.json").is_file(), f"{starter}: the shipped starter model is missing"
    return starter


def test_q8_0_gguf_loads_int8_and_agrees_with_float32(tmp_path):
    """A trained Sol model (the starter) exported as Q8_0 and re-imported: its own Q8_0 blocks where Sol's
    kernels run (int8 rows with --quantize int8, or without the kernels), a fraction of float32's memory,
    and the same top-1 next token on >= 99% of held-out text's positions."""
    from conftest import SHARED_DATA

    from sol.core.kernels import blocks
    from sol.core.model.blockquant import block_types
    from sol.core.model.quant import is_quantized, memory_bytes, weight_bytes
    ref = load_model(_starter())
    path = gguf_io.export_gguf(ref, tmp_path / "s.gguf", "q8_0")
    q8 = load_model(path, quantize="auto")
    assert q8.meta["quantization"] == "Q8_0"
    assert block_types(q8.model) == ["Q8_0"] if blocks.available() else is_quantized(q8.model)
    rows8 = load_model(path, quantize="int8")
    assert is_quantized(rows8.model) and block_types(rows8.model) in ([], ["Q8_0"])   # the table may stay Q8_0
    f32 = load_model(path, dtype=torch.float32)
    assert not is_quantized(f32.model) and block_types(f32.model) == []   # an explicit float load
    assert q8.model.num_parameters() == ref.model.num_parameters()
    if not blocks.available():
        for lm, kind in ((ref, "float32"), (q8, "int8")):
            assert abs(memory_bytes(lm.model) - weight_bytes(lm.config, kind)) < 0.02 * memory_bytes(lm.model)
    assert memory_bytes(q8.model) < 0.45 * memory_bytes(ref.model)
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[-20000:]
    ids = ref.tokenizer.encode_ids(text, add_special_tokens=False)
    ctx = ref.config.context
    rows = torch.tensor([ids[i:i + ctx] for i in range(0, len(ids) - ctx, ctx)][:24])
    with torch.no_grad():
        a = ref.model(rows).argmax(-1)
        blocks_agree = (q8.model(rows).argmax(-1) == a).float().mean().item()
        rows_agree = (rows8.model(rows).argmax(-1) == a).float().mean().item()
    # Sol's int8 rows take 15-bit activations; the Q8_0 blocks llama.cpp's 8-bit ones (as llama.cpp agrees)
    assert rows.numel() >= 3000 and rows_agree >= 0.99 and blocks_agree >= 0.98, (rows_agree, blocks_agree)


def test_quantize_int8_flag_for_any_model(gguf_pair):
    """--quantize int8 on a safetensors folder: generation runs through the int8 kernels and stays close."""
    family, folder, path, ref = gguf_pair
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["generate", "--model", str(folder), "--prompt", "It is the east", "--max-tokens", "8",
                     "--temperature", "0", "--device", "cpu", "--quantize", "int8", "--json"]) == 0
    assert len(json.loads(buf.getvalue().splitlines()[-1])["token_ids"]) == 8
    from sol.core.model.quant import is_quantized
    lm = load_model(folder, quantize="int8")
    assert is_quantized(lm.model)
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(x).logits
        got = lm.model(x)
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", "info", str(path), "--json"]) == 0
    info = json.loads(buf.getvalue())
    assert info["format"] == "gguf" and info["quantization"] == "F32"
    assert info["weights_mb"]["int8"] < 0.5 * info["weights_mb"]["float32"]


def test_a_tokenizer_the_metadata_cannot_build_is_one_error(tmp_path):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.token_type": [1, 1], "tokenizer.ggml.merges": ["x y"]}
    with pytest.raises(SolError, match="m.gguf: the tokenizer in the metadata cannot be built"):
        gguf_io.tokenizer_from_gguf(meta, tmp_path / "m.gguf")
    with pytest.raises(SolError, match="token_type has 1 entries for 2 tokens"):
        gguf_io.tokenizer_from_gguf({**meta, "tokenizer.ggml.token_type": [1]}, tmp_path / "m.gguf")
    with pytest.raises(SolError, match="tokenizer.ggml.pre 'deepseek-llm' is not supported"):
        gguf_io.tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "deepseek-llm"}, tmp_path / "m.gguf")


def test_tokenize_reads_a_gguf_files_tokenizer(good_gguf, capsys):
    """`sol tokenize --model X.gguf --json` is the `tokenizers` encoding of the tokenizer the file carries."""
    import json

    from sol.core.cli import main
    text = "Hear me speak, o Sol!"
    assert main(["tokenize", "--model", str(good_gguf), "--text", text, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = gguf_io.tokenizer_of_gguf(good_gguf).hf.encode(text)
    assert got == {"ids": want.ids, "tokens": want.tokens, "offsets": [list(o) for o in want.offsets]}


@pytest.mark.parametrize("argv", [
    ["tokenize", "--model", "M", "--text", "hi there"],
    ["generate", "--model", "M", "--prompt", "hi", "--max-tokens", "2", "--temperature", "0"],
    ["score", "--model", "M", "--text", "hi there"],
    ["lens", "--model", "M", "--text", "hi there"],
    ["embed", "neighbours", "--model", "M", "--text", "hi", "--k", "3"],
    ["embed", "positions", "--model", "M"],
    ["models", "info", "M"],
])
def test_every_command_that_takes_a_model_takes_a_gguf_file(good_gguf, argv, capsys):
    from sol.core.cli import main
    rc = main([str(good_gguf) if a == "M" else a for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip()


def test_chat_takes_a_gguf_file(tmp_path, capsys, isolated_home):
    """`sol chat --model X.gguf` (the starter exported, so the file carries a chat template)."""
    from sol.core.cli import main
    out = tmp_path / "starter.gguf"
    assert main(["models", "export", "starter", "--format", "gguf", "--out", str(out)]) == 0
    capsys.readouterr()
    rc = main(["chat", "--model", str(out), "--message", "what is 12 times 7?", "--max-tokens", "32",
               "--temperature", "0"])
    text, err = capsys.readouterr()
    assert rc == 0, err
    assert "[calculator -> 84]" in err   # the starter calls its calculator, from the GGUF file as from its folder
    assert "<|" not in text               # the call is that line, not the model's markup


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_the_header_reader_reads_what_gguf_reads(good_gguf, tmp_path, kind):
    """gguf_file.GGUFFile (one pass with struct) against the gguf package's GGUFReader: the same metadata,
    the same tensors, the same bytes."""
    from sol.core.formats.gguf_file import GGUFFile
    path = good_gguf if kind == "f32" else gguf_io.export_gguf(load_model(good_gguf), tmp_path / "q8.gguf", kind)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.metadata == gguf_io.metadata(theirs)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, list(a.shape), a.n_elements, a.n_bytes, a.data_offset) == \
               (b.tensor_type, list(b.shape), b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_int8_from_gguf_equals_quantizing_the_float_model(good_gguf, tmp_path):
    """A Q8_0 file read straight into int8 (one float32 slice at a time) holds exactly the int8 rows and
    scales of the float32 model quantized whole, and gives the same logits; where Sol's kernel runs, the
    token table and tied head stay the file's own Q8_0 blocks (the same logits with those in both)."""
    from sol.core.model.quant import Int8Embedding, Int8Linear, quantize_model
    q8 = gguf_io.export_gguf(load_model(good_gguf), tmp_path / "q8.gguf", "q8_0")
    streamed = load_model(q8, quantize="int8").model
    whole = quantize_model(load_model(q8, dtype=torch.float32).model)
    mods = dict(whole.named_modules())
    checked = 0
    for name, m in streamed.named_modules():
        if type(m) in (Int8Linear, Int8Embedding):
            other = mods[name]
            assert type(other) is type(m), name
            assert torch.equal(m.int8_weight() if hasattr(m, "int8_weight") else m.weight,
                               other.int8_weight() if hasattr(other, "int8_weight") else other.weight), name
            assert torch.equal(m.scales, other.scales), name
            checked += 1
    assert checked >= 3
    from sol.core.kernels import int8_kernel
    from sol.core.model.blockquant import BlockEmbedding
    if int8_kernel.available():
        assert type(streamed.embed) is BlockEmbedding and streamed.embed.type_name in ("Q8_0", "GQ8_0")
        whole.embed, whole.lm_head = streamed.embed, streamed.lm_head
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.allclose(streamed(ids), whole(ids), atol=1e-5)
