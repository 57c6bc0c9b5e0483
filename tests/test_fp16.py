"""Half precision on the CPU, and the one-token decode path.

fp16 weights must pick the same next token as fp32 almost everywhere; the
decode step (one token after a cache) must compute what the general path
computes. No timings here: benchmarks/decode.py measures speed."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_TEXT, make_tiny_model

from sol.core.formats.checkpoint import load_model
from sol.core.generation.engine import Engine, GenerationParams
from sol.core.generation.sampling import SamplingParams
from sol.core.model.layers import KVCache, cache_dtype


def _train_a_little(model, ids, steps=80, seq=64):
    """A few steps on the tiny text, so the logits have a clear winner as a trained model's do."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(ids)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (8,))
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from sol.core.formats.checkpoint import save_model
    d = make_tiny_model(tmp_path_factory.mktemp("fp16") / "tiny", seed=5, n_layer=2, n_head=4, d_model=64,
                        dropout=0.0)
    lm = load_model(d)
    ids = lm.tokenizer.encode_ids(TINY_TEXT, add_special_tokens=False)
    _train_a_little(lm.model, ids)
    save_model(d, lm.model, lm.tokenizer, {"name": "tiny", "stage": "base"})
    return d, ids


def test_fp16_top1_matches_fp32_on_most_positions(trained):
    d, ids = trained
    m32 = load_model(d, dtype=torch.float32).model
    m16 = load_model(d, dtype=torch.float16).model
    x = torch.tensor([ids[:120]])
    with torch.inference_mode():
        a = m32(x).argmax(-1)
        b = m16(x).argmax(-1)
    assert (a == b).float().mean() >= 0.9


def test_fp16_greedy_decoding_follows_fp32_until_a_near_tie(trained):
    # Once two greedy runs pick different tokens they read different texts, so counting equal
    # positions after that measures nothing. What fp16 must do: pick fp32's token at every step,
    # unless fp32 itself had two tokens within rounding of each other there.
    d, ids = trained
    out = {}
    for dtype in (torch.float32, torch.float16):
        lm = load_model(d, dtype=dtype)
        engine = Engine(lm.model, lm.tokenizer)
        params = GenerationParams(max_tokens=40, sampling=SamplingParams(temperature=0), explain=False)
        events = list(engine.generate(engine.session(ids[:8]), params))
        out[dtype] = events[-1].token_ids
    a, b = out[torch.float32], out[torch.float16]
    assert len(a) == len(b) == 40
    split = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), None)
    if split is None:
        return
    m32 = load_model(d, dtype=torch.float32).model
    with torch.inference_mode():
        logits = m32(torch.tensor([ids[:8] + a[:split]]))[0, -1]
    gap = (logits[a[split]] - logits[b[split]]).item()
    assert 0 <= gap < 0.05, f"fp16 left fp32's path at token {split} where fp32's margin was {gap:.4f}"


def test_half_precision_cache_on_the_cpu_is_float32(trained):
    d, _ = trained
    m16 = load_model(d, dtype=torch.float16).model
    cache = m16.new_cache(1, 32)
    assert isinstance(cache, KVCache) and cache.k[0].dtype == torch.float32
    assert cache_dtype("cpu", torch.float32) == torch.float32
    assert cache_dtype("cuda", torch.float16) == torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_token_steps_equal_the_general_path(tmp_path, dtype, family):
    cfg = dict(n_layer=2, n_head=4, d_model=64, dropout=0.0)
    if family == "llama":
        cfg.update(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, n_kv_head=2)
    m = load_model(make_tiny_model(tmp_path / family, seed=6, **cfg), dtype=dtype).model
    ids = torch.randint(0, m.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # General path: the whole sequence at once (batch of 2, as rollouts decode).
        full = m(ids).float()
        # Decode path: a prefix, then one token per call.
        cache = m.new_cache(2, 16)
        steps = [m(ids[:, :4], cache=cache)[:, -1]]
        for t in range(4, 12):
            steps.append(m(ids[:, t:t + 1], cache=cache)[:, -1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(torch.stack(steps[1:], 1).float(), full[:, 4:], atol=tol, rtol=0)
    assert cache.pos == 12


# ---- float16 weights through fbgemm's packed product (core/model/half.py) ----------------------------------
needs_fbgemm = pytest.mark.skipif(not __import__("sol.core.model.half", fromlist=["x"]).available(),
                                  reason="this torch build has no fbgemm (x86 only)")


@needs_fbgemm
def test_packed_half_linear_is_the_float32_product_of_the_float16_weights():
    from sol.core.model.half import HalfLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200).half()
    m = HalfLinear(lin)
    x = torch.randn(5, 96)
    exact = x @ lin.weight.float().T + lin.bias.float()   # float32 sums of the float16 weights
    assert m._packed is None
    torch.testing.assert_close(m(x), exact, rtol=1e-5, atol=1e-5)
    assert m._packed is not None and m.weight.numel() == 0   # the packed copy is the only one
    torch.testing.assert_close(m(x[0]), exact[0], rtol=1e-5, atol=1e-5)   # a lone vector, as nn.Linear takes
    torch.testing.assert_close(m(x.view(5, 1, 96)), exact.view(5, 1, 200), rtol=1e-5, atol=1e-5)
    y16 = m(x.half())   # float16 in, float16 out, float32 sums between
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16, exact.half(), rtol=1e-3, atol=1e-3)


@needs_fbgemm
def test_packed_half_weights_come_back_unchanged():
    from sol.core.model.half import HalfLinear
    lin = torch.nn.Linear(64, 48).half()
    m = HalfLinear(lin)
    m.pack()
    sd = m.state_dict()
    assert torch.equal(sd["weight"], lin.weight.detach()) and sd["weight"].dtype == torch.float16
    m.to(torch.float32)   # a move unpacks: plain arithmetic on the same values
    assert m._packed is None and torch.equal(m.weight, lin.weight.detach().float())
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, lin.weight.float(), lin.bias.float()))


@needs_fbgemm
def test_float16_load_packs_every_linear_and_decodes_like_the_plain_float16_model(trained, monkeypatch):
    from sol.core.model import half
    from sol.core.model.half import HalfLinear
    from sol.core.model.quant import memory_bytes
    d, ids = trained
    lm = load_model(d, dtype=torch.float16)
    packed = [n for n, m in lm.model.named_modules() if type(m) is HalfLinear]
    assert len(packed) == 4 * lm.config.n_layer + 1 and "lm_head" in packed
    assert not any(type(m) is torch.nn.Linear for m in lm.model.modules())
    assert lm.model.num_parameters() == load_model(d).model.num_parameters()
    assert memory_bytes(lm.model) > 2 * lm.model.num_parameters()   # the tied head's own packed copy
    monkeypatch.setattr(half, "pack_half", lambda m: m)
    plain = load_model(d, dtype=torch.float16)
    assert not any(type(m) is HalfLinear for m in plain.model.modules())
    params = GenerationParams(max_tokens=40, sampling=SamplingParams(temperature=0), explain=False)
    prompt = ids[:30]

    def greedy(m):
        e = Engine(m.model, m.tokenizer)
        return [ev.id for ev in e.generate(e.session(prompt), params) if hasattr(ev, "logprob")]
    a, b = greedy(lm), greedy(plain)
    # Both are float16 weights; the packed product sums in float32, aten's rounds to float16 on the way,
    # so they may part at a near-tie, but not early on a trained model.
    assert a[:20] == b[:20]
    with torch.inference_mode():
        x = torch.tensor([ids[:64]])
        ref = load_model(d).model(x)
        assert (lm.model(x) - ref).abs().max() <= (plain.model(x) - ref).abs().max() + 1e-3


@needs_fbgemm
def test_packed_float16_model_computes_in_float32_until_it_is_moved(trained):
    d, ids = trained
    lm = load_model(d, dtype=torch.float16)
    m = lm.model
    assert m.act_dtype == torch.float32 and m.dtype == torch.float16   # float16 weights, float32 between them
    assert m.embed.weight.dtype == torch.float16 and m.norm.weight.dtype == torch.float32
    x = torch.tensor([ids[:40]])
    with torch.inference_mode():
        packed = m(x)
        assert packed.dtype == torch.float32
        m.to(torch.float16)   # any cast or move: the plain float16 model again, packed anew on the next call
        assert m.act_dtype is None and m.norm.weight.dtype == torch.float16
        again = m(x)
        assert again.dtype == torch.float16
        assert (again.argmax(-1) == packed.argmax(-1)).float().mean() >= 0.95
        m.to(torch.float32)
        torch.testing.assert_close(m(x), load_model(d).model(x), rtol=1e-2, atol=1e-2)
