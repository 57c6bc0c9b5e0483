"""A model wider than its tokenizer: Sol pads new models' vocabularies to a multiple of 64 rows (GPU matrix
kernels run fastest on such widths), and imported models are often padded too (Qwen2: 151,936 rows for
151,665 tokens). Rows no token owns must never be sampled, shown or scored: their logits are -inf."""
from __future__ import annotations

import json

import pytest
import torch

from sol.core.model.config import ModelConfig, padded_vocab
from sol.core.model.transformer import Transformer
from sol.core.train.losses import cross_entropy_sum


def test_padded_vocab_rounds_up_to_the_multiple():
    assert [padded_vocab(n) for n in (1, 64, 65, 50257)] == [64, 64, 128, 50304]
    assert padded_vocab(65, 1) == 65
    from sol.core.errors import SolError
    with pytest.raises(SolError, match="--vocab-multiple"):
        padded_vocab(65, 0)


def _pair(real: int = 70, padded: int = 128):
    """The same network twice: `real` rows, and `padded` rows whose first `real` are the same weights."""
    torch.manual_seed(0)
    small = Transformer(ModelConfig(vocab_size=real, n_layer=2, n_head=2, d_model=32, context=32))
    wide = Transformer(ModelConfig(vocab_size=padded, n_layer=2, n_head=2, d_model=32, context=32))
    with torch.no_grad():
        for name, p in wide.named_parameters():
            q = small.get_parameter(name)
            if p.shape == q.shape:
                p.copy_(q)
            else:   # the embedding (tied head): real rows copied, padded rows random and 50x as large
                p[:real] = q
                p[real:] = torch.randn(padded - real, p.shape[1])
    wide.vocab_limit = real
    return small, wide


def test_padded_rows_take_no_probability_and_no_gradient():
    small, wide = _pair()
    x = torch.randint(0, 70, (3, 17))
    a, b = small(x), wide(x)
    assert torch.isinf(b[..., 70:]).all() and (b[..., 70:] < 0).all()
    torch.testing.assert_close(b[..., :70], a, rtol=1e-5, atol=1e-5)
    loss_small = cross_entropy_sum(a[:, :-1], x[:, 1:])
    loss_wide = cross_entropy_sum(b[:, :-1], x[:, 1:])
    torch.testing.assert_close(loss_wide, loss_small, rtol=1e-5, atol=1e-5)   # the unpadded model's loss
    loss_wide.backward()
    grad = wide.embed.weight.grad
    assert grad[70:].abs().max() == 0 and grad[:70].abs().max() > 0
    # Without the limit the padded rows would win every position.
    wide.vocab_limit = None
    with torch.no_grad():
        assert (wide(x).argmax(-1) >= 70).all()


def _pretrain(tmp_path, corpus, *extra):
    from sol.core.cli import main
    out = tmp_path / "run"
    rc = main(["train", "pretrain", "--corpus", str(corpus), "--out", str(out), "--layers", "1", "--heads", "2",
               "--d-model", "32", "--context", "32", "--batch-size", "4", "--max-steps", "3", "--eval-every", "3",
               "--sample-every", "0", "--threads", "1", *extra])
    assert rc == 0
    return out


def test_pretrain_builds_a_padded_model_that_never_produces_a_padded_id(tmp_path, tiny_text_file, capsys):
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.engine import Engine, GenerationParams, TokenEvent
    from sol.core.generation.sampling import SamplingParams
    out = _pretrain(tmp_path, tiny_text_file)
    config = json.loads((out / "config.json").read_text())
    lm = load_model(out)
    real = lm.tokenizer.id_limit
    assert real % 64 != 0 and config["vocab_size"] == padded_vocab(real) == lm.config.vocab_size
    assert lm.model.vocab_limit == real
    # Make the padded rows the most likely by far: sampling, the explanation's top tokens and the
    # log-probability still see only real tokens.
    with torch.no_grad():
        lm.model.lm_head.weight[real:] = 50 * lm.model.lm_head.weight[:real].abs().max()
    engine = Engine(lm.model, lm.tokenizer)
    params = GenerationParams(max_tokens=20, sampling=SamplingParams(temperature=2.0, seed=1), explain=True)
    events = [e for e in engine.generate(engine.session(lm.tokenizer.encode_ids("First")), params)
              if isinstance(e, TokenEvent)]
    assert len(events) == 20
    assert all(e.id < real and all(t["id"] < real for t in e.top) for e in events)
    assert all(e.logprob > float("-inf") for e in events)


def test_vocab_multiple_one_keeps_the_tokenizers_size(tmp_path, tiny_text_file):
    from sol.core.formats.checkpoint import load_model
    lm = load_model(_pretrain(tmp_path, tiny_text_file, "--vocab-multiple", "1"))
    assert lm.config.vocab_size == lm.tokenizer.id_limit


def test_imported_model_wider_than_its_tokenizer_never_samples_unowned_rows(tmp_path):
    """A Hugging Face model with 20 rows no token owns, set to win every position: transformers' greedy
    picks them; Sol picks what transformers picks when told to suppress those ids."""
    import transformers
    from hf_models import VOCAB, byte_tokenizer

    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.engine import Engine, GenerationParams, TokenEvent
    from sol.core.generation.sampling import SamplingParams
    folder = tmp_path / "qwen2"
    torch.manual_seed(3)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = None
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    tok = byte_tokenizer(folder)
    real = VOCAB - 20
    tok.hf = type(tok.hf).from_str(_truncated(tok.hf.to_str(), real))   # drop the test filler tokens
    assert tok.id_limit == real
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
        ref.lm_head.weight[real:] = 3.0
    folder.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(folder, safe_serialization=True)
    tok.save(folder / "tokenizer.json")
    prompt = tok.encode_ids("It is the east", add_special_tokens=False)
    with torch.no_grad():
        plain = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                            suppress_tokens=list(range(real, VOCAB)))[0, len(prompt):].tolist()
    assert any(i >= real for i in plain)   # the quirk is real: transformers emits ids no token owns
    lm = load_model(folder)
    assert lm.model.vocab_limit == real
    engine = Engine(lm.model, lm.tokenizer)
    params = GenerationParams(max_tokens=12, sampling=SamplingParams(temperature=0), explain=False)
    got = [e.id for e in engine.generate(engine.session(prompt), params) if isinstance(e, TokenEvent)]
    assert got == want


def _truncated(tokenizer_json: str, n: int) -> str:
    spec = json.loads(tokenizer_json)
    spec["added_tokens"] = [a for a in spec.get("added_tokens", []) if a["id"] < n]
    return json.dumps(spec)


@pytest.mark.parametrize("prefer_sol", [True, False])
def test_gguf_export_of_a_padded_model_keeps_the_limit(tmp_path, tiny_text_file, prefer_sol):
    """Sol's export writes padded rows as llama.cpp's converters do ([PADn], type UNUSED); read back through
    Sol's own tokenizer or through the llama.cpp vocabulary alone, they stay unsampled."""
    from sol.core.formats import gguf_io
    from sol.core.formats.checkpoint import load_model
    lm = load_model(_pretrain(tmp_path, tiny_text_file))
    real = lm.tokenizer.id_limit
    f = gguf_io.export_gguf(lm, tmp_path / "m.gguf")
    reader = gguf_io.open_gguf(f)
    meta = gguf_io.metadata(reader)
    if not prefer_sol:
        meta.pop(gguf_io.SOL_TOKENIZER_KEY)
    tok = gguf_io.tokenizer_from_gguf(meta, f, prefer_sol=prefer_sol)
    assert gguf_io.id_limit(meta, tok) == real
    back = load_model(f)
    assert back.model.vocab_limit == real and back.config.vocab_size == lm.config.vocab_size
