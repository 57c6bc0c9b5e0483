"""Half precision on the CPU, and the one-token decode path.

fp16 weights must pick the same next token as fp32 almost everywhere; the
decode step (one token after a cache) must compute what the general path
computes. No timings here: benchmarks/decode.py measures speed."""
from __future__ import annotations

import pytest
import torch

from sol.core.checkpoint import load_model
from sol.core.engine import Engine, GenerationParams
from sol.core.model import KVCache, cache_dtype
from sol.core.sampling import SamplingParams

from conftest import TINY_TEXT, make_tiny_model


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
    from sol.core.checkpoint import save_model
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
