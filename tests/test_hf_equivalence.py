"""Sol's Transformer computes what Hugging Face transformers computes, for every family it imports."""
import io
import json
from contextlib import redirect_stdout

import pytest
import torch
from hf_models import FAMILIES, VOCAB, make_hf_model

from sol.core.cli import main
from sol.core.formats.checkpoint import load_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / request.param
    ref = make_hf_model(request.param, folder)
    return request.param, folder, ref


def test_logits_match_transformers_fp32(hf_pair):
    family, folder, ref = hf_pair
    sol = load_model(folder).model
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x).logits
        got = sol(x)
    assert expected.std() > 0.1, "reference logits are degenerate; the comparison would prove nothing"
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_cli_matches_transformers_generate(hf_pair):
    family, folder, ref = hf_pair
    tok = load_model(folder).tokenizer
    prompt = "It is the east, and"
    ids = tok.encode_ids(prompt)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    expected = out[0, len(ids):].tolist()
    assert len(expected) == 32 and len(set(expected)) > 3, "reference output too repetitive to compare"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["generate", "--model", str(folder), "--prompt", prompt, "--max-tokens", "32",
                   "--temperature", "0", "--device", "cpu", "--json"])
    assert rc == 0
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    done = lines[-1]
    assert done["type"] == "done" and done["prompt_tokens"] == len(ids)
    assert done["token_ids"] == expected
    assert [e["id"] for e in lines[:-1]] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_logits_match_transformers_on_cuda(hf_pair, dtype, tol):
    family, folder, ref = hf_pair
    sol = load_model(folder, device="cuda", dtype=dtype).model
    ref = ref.to("cuda", dtype)
    x = torch.randint(0, VOCAB, (2, 24), device="cuda")
    with torch.no_grad():
        diff = (sol(x).float() - ref(x).logits.float()).abs().max().item()
    ref.to("cpu", torch.float32)
    assert diff <= tol


def test_cached_feeds_match_full_forward_past_the_window(hf_pair):
    """Prefill, one-token decode steps and forced multi-token feeds after a cache compute what one
    full forward does, 40 tokens in: well past the sliding windows (8 and 12) of the windowed families."""
    family, folder, ref = hf_pair
    model = load_model(folder).model
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        assert (full - ref(ids).logits).abs().max().item() <= 1e-4
        if model.rope_switch is not None:   # longrope: the cache cannot cross the switch (Session recomputes)
            cache = model.new_cache()
            model(ids[:, :10], cache=cache)
            with pytest.raises(ValueError, match="factors change"):
                model(ids[:, 10:20], cache=cache)
            return
        cache = model.new_cache()
        parts = [model(ids[:, :10], cache=cache)]                        # prefill
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(10, 13)]   # decode steps
        parts.append(model(ids[:, 13:15], cache=cache))                   # two forced tokens
        parts.append(model(ids[:, 15:40], cache=cache))                   # many: the masked path
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-4


def test_session_recomputes_at_the_longrope_switch():
    """transformers' Phi-3 generate drops the cache once the sequence outgrows original_max_position_embeddings
    (every position then takes the long factors); Sol's Session does the same, feeding past 16 tokens."""
    import tempfile
    from pathlib import Path

    from sol.core.generation.engine import Session
    folder = Path(tempfile.mkdtemp()) / "phi3-longrope"
    ref = make_hf_model("phi3-longrope", folder)
    model = load_model(folder).model
    assert model.rope_switch == 16
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5)).tolist()[0]
    s = Session(model)
    with torch.no_grad():
        for a, b in ((0, 12), (12, 16), (16, 17), (17, 18), (18, 30)):
            s.feed(ids[a:b])
            expected = ref(torch.tensor([ids[:b]])).logits[0, -1]
            assert (s.logits - expected).abs().max().item() <= 1e-4, (a, b)
        s.rewind(10)          # back within the switch (an edited message): the short factors again
        for a, b in ((10, 13), (13, 14)):
            s.feed(ids[a:b])
            expected = ref(torch.tensor([ids[:b]])).logits[0, -1]
            assert (s.logits - expected).abs().max().item() <= 1e-4, (a, b)


def test_attention_visualiser_path_matches_the_model(hf_pair):
    """forward_with_attention (the visualiser's slow path) gives the fast path's logits, and its step by
    step recomputation reproduces the model's weights: windows, Gemma's scale and soft-caps included."""
    from sol.plugins.attention_visualizer.compute import layer_attention, step_by_step
    family, folder, ref = hf_pair
    model = load_model(folder).model
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, caps = model.forward_with_attention(ids)
        assert (logits - model(ids)).abs().max().item() <= 1e-4
    for layer in range(model.cfg.n_layer):
        window = model.cfg.window(layer)
        w = caps[layer].weights[0]
        if window is not None:   # nothing further back than the window
            assert w.tril(-window).abs().max().item() == 0
        att = layer_attention(model, ids[0].tolist(), layer)
        for query in (5, 29):
            s = step_by_step(att, 1, query)
            assert abs(s["weights"] - s["model_weights"]).max() <= 1e-5


def test_batched_engine_greedy_matches_transformers(hf_pair):
    """The batched engine (static-shape decode over per-row positions) gives each of three prompts of
    different lengths transformers' greedy tokens: windows, soft-caps, per-layer RoPE and, for
    longrope, the recompute where a row passes the switch (16 tokens) all hold there too."""
    from sol.core.generation.batch import BatchEngine
    from sol.core.generation.engine import GenerationParams
    from sol.core.generation.sampling import SamplingParams
    family, folder, ref = hf_pair
    lm = load_model(folder)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 14)]
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=4)
    reqs = [engine.submit(p, GenerationParams(max_tokens=24, sampling=SamplingParams(temperature=0)))
            for p in prompts]
    while any(not r.finished for r in reqs):
        engine.step()
    for p, r in zip(prompts, reqs):
        events = []
        while (ev := r.get(timeout=0)) is not None:
            events.append(ev)
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert events[-1].token_ids == out[0, len(p):].tolist()
