"""KV-cached decoding, sampling and its explanation, streaming text."""
import threading

import pytest
import torch
from conftest import make_tiny_model

from sol.core.formats.checkpoint import load_model
from sol.core.formats.tokenizer import StreamDecoder
from sol.core.generation.engine import Engine, GenerationParams
from sol.core.generation.sampling import SamplingParams, choose, filtered_probs, make_generator


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=3, n_layer=2, n_head=4, d_model=64)
    return sharpen(load_model(d))


def sharpen(lm):
    """Wider weights than the init's: decisive, varied greedy output instead of one repeated token."""
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return lm


@pytest.fixture(scope="module")
def lm_rope(tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("r") / "rope", seed=4, n_layer=2, n_head=4, n_kv_head=2,
                        d_model=64, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)
    return sharpen(load_model(d))


def greedy(n):
    return GenerationParams(max_tokens=n, sampling=SamplingParams(temperature=0))


@pytest.mark.parametrize("which", ["lm", "lm_rope"])
def test_kv_cached_decoding_equals_full_recompute(which, request):
    lm = request.getfixturevalue(which)
    engine = Engine(lm.model, lm.tokenizer)
    prompt = lm.tokenizer.encode_ids("First Citizen:\nBefore we")
    events = list(engine.generate(engine.session(prompt), greedy(40)))
    cached = events[-1].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]
    assert len(set(cached)) > 2


def test_forced_tokens_after_a_cached_prefix_match_full_recompute(lm_rope):
    model = lm_rope.model
    ids = torch.randint(0, lm_rope.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :10], cache=cache)
        model(ids[:, 10:12], cache=cache)                   # two tokens
        part = model(ids[:, 12:30], cache=cache)            # many tokens at once: the masked path
        full = model(ids)
    assert cache.pos == 30
    assert (part - full[:, 12:30]).abs().max() < 1e-4


@pytest.mark.parametrize("which", ["lm", "lm_rope"])
def test_the_cache_grows_as_the_text_does_and_keeps_what_it_held(which, request, monkeypatch):
    from sol.core.model.layers import KVCache
    monkeypatch.setattr(KVCache, "GROW", 16)    # grow several times within the tiny model's context
    model = request.getfixturevalue(which).model
    n = model.cfg.context
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache()
    assert cache.capacity == 16 and cache.max_len == n
    with torch.no_grad():
        parts = [model(ids[:, :10], cache=cache)]                # prefill, then one token at a time ...
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(10, 40)]
        parts.append(model(ids[:, 40:n], cache=cache))         # ... then a block to the end
        full = model(ids)
    assert cache.pos == n and cache.capacity == n
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-4
    with pytest.raises(ValueError, match="longer than"):
        cache.reserve(n + 1)


def test_seeded_sampling_is_reproducible(lm):
    engine = Engine(lm.model, lm.tokenizer)
    prompt = lm.tokenizer.encode_ids("Speak")

    def run(seed):
        p = GenerationParams(max_tokens=30, sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        return list(engine.generate(engine.session(prompt), p))[-1].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_each_explanation_sums_to_one_and_picks_the_token_it_reports(lm):
    engine = Engine(lm.model, lm.tokenizer)
    p = GenerationParams(max_tokens=25, sampling=SamplingParams(temperature=1.3, top_k=12, seed=1))
    events = list(engine.generate(engine.session(lm.tokenizer.encode_ids("All:")), p))[:-1]
    for ev in events:
        ex = ev.explanation
        assert ex.candidates <= 12 and ex.rest == 0.0
        assert sum(ex.probs) == pytest.approx(1.0, abs=1e-5)
        assert ex.probs == sorted(ex.probs, reverse=True)
        assert ex.cumulative[-1] == pytest.approx(1.0, abs=1e-5)
        assert ex.ids[ex.index] == ex.token_id == ev.id
        lower = ex.cumulative[ex.index - 1] if ex.index else 0.0
        assert lower <= ex.draw < ex.cumulative[ex.index] + 1e-6
        assert sum(t["prob"] for t in ev.top) <= 1.0 + 1e-6 and len(ev.top) == 10


def test_sampling_frequencies_follow_the_probabilities():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = SamplingParams(temperature=1.0)
    g = make_generator(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[choose(logits, p, g, explain=False)[0]] += 1
    assert torch.allclose(counts / 4000, torch.softmax(logits, 0), atol=0.03)


def test_filters_keep_what_they_should():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (filtered_probs(logits, SamplingParams(top_k=2)) > 0).tolist() == [True, True, False, False]
    assert (filtered_probs(logits, SamplingParams(top_p=0.8)) > 0).tolist() == [True, True, False, False]
    assert (filtered_probs(logits, SamplingParams(top_p=0.81)) > 0).tolist() == [True, True, True, False]
    assert (filtered_probs(logits, SamplingParams(min_p=0.25)) > 0).tolist() == [True, True, True, False]
    probs = filtered_probs(logits, SamplingParams(temperature=0.5))
    assert probs[0] == pytest.approx(0.25 / (0.25 + 0.09 + 0.0225 + 0.0025))


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([2.0, -1.0, 1.0])
    tok, _ = choose(logits, SamplingParams(temperature=0, repetition_penalty=3.0), None, torch.tensor([0]))
    assert tok == 2   # 2.0/3 < 1.0


def test_greedy_explanation_is_certain(lm):
    engine = Engine(lm.model, lm.tokenizer)
    ev = next(iter(engine.generate(engine.session([5]), greedy(1))))
    assert ev.explanation.draw is None and ev.explanation.probs == [1.0]
    assert ev.id == ev.top[0]["id"]


def test_cancel_stops_between_tokens(lm):
    engine = Engine(lm.model, lm.tokenizer)
    cancel = threading.Event()
    seen = []
    for ev in engine.generate(engine.session([5]), greedy(100), cancel):
        seen.append(ev)
        if len(seen) == 3:
            cancel.set()
    assert seen[-1].stop_reason == "cancelled" and seen[-1].completion_tokens == 3


def test_stop_strings_end_generation_and_are_not_returned(lm):
    engine = Engine(lm.model, lm.tokenizer)
    full = list(engine.generate(engine.session(lm.tokenizer.encode_ids("All:")), greedy(30)))[-1].text
    stop = full[5:8]
    assert stop
    done = list(engine.generate(engine.session(lm.tokenizer.encode_ids("All:")),
                                GenerationParams(max_tokens=30, sampling=SamplingParams(temperature=0),
                                                 stop_strings=(stop,))))[-1]
    assert done.stop_reason == "stop_string" and done.text == full[:full.index(stop)]


TEXTS = ["Olá, coração! São Paulo, açaí e pão.", "世界你好，今天天气很好。日本語のテキスト",
         "emoji 🌍🚀👩‍👩‍👧 and flags 🇧🇷 mixed with ascii", "naïve café — “quotes” ∑ x² ≤ ∞"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_streamed_text_equals_decode_of_all_ids(text, kind, tmp_path):
    from sol.core.formats.tokenizer import train_bpe, train_char
    corpus = tmp_path / "c.txt"
    corpus.write_text("plain ascii text only, so non-ascii splits into bytes " * 20 + "\n".join(TEXTS[:1]))
    tok = train_char([corpus]) if kind == "char" else train_bpe([corpus], 300)
    ids = tok.encode_ids(text)
    dec = StreamDecoder(tok)
    pieces = [dec.step(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids)
    if kind == "bpe":
        assert text == tok.decode(ids)
        assert "" in pieces[:-1], "some character should have spanned several tokens"
        assert all("\ufffd" not in p for p in pieces)


def test_engine_stream_equals_decode_even_for_random_bytes(lm):
    engine = Engine(lm.model, lm.tokenizer)
    p = GenerationParams(max_tokens=60, sampling=SamplingParams(temperature=1.5, seed=3))
    events = list(engine.generate(engine.session(lm.tokenizer.encode_ids("Olá")), p))
    done = events[-1]
    assert "".join(e.text for e in events[:-1]) + "" == done.text
    assert done.text == lm.tokenizer.decode(done.token_ids)


def test_after_a_stop_string_forcing_continues_from_a_consistent_cache(lm):
    engine = Engine(lm.model, lm.tokenizer)
    prompt = lm.tokenizer.encode_ids("All:")
    full = list(engine.generate(engine.session(prompt), greedy(30)))[-1]
    stop = full.text[5:8]
    session = engine.session(prompt)
    list(engine.generate(session, GenerationParams(max_tokens=30, sampling=SamplingParams(temperature=0),
                                                   stop_strings=(stop,))))
    assert session.cache.pos == len(session.ids)
    engine.force(session, [7, 8, 9])
    with torch.no_grad():
        expected = lm.model(torch.tensor([session.ids]))[0, -1]
    assert (session.logits - expected).abs().max() < 1e-4


def test_warm_up_builds_the_scripted_step_and_changes_no_answer(tmp_path):
    from sol.core.generation.engine import TokenEvent, warm_up
    from sol.core.model import cpu_step
    folder = make_tiny_model(tmp_path / "w", seed=5, n_layer=2, n_head=4, d_model=64)
    warm, cold = sharpen(load_model(folder)), sharpen(load_model(folder))
    ids = warm.tokenizer.encode_ids("To be, or not", add_special_tokens=False)
    params = GenerationParams(max_tokens=12, sampling=SamplingParams(temperature=0))

    def answer(lm):
        e = Engine(lm.model, lm.tokenizer)
        return [ev.id for ev in e.generate(e.session(ids), params) if isinstance(ev, TokenEvent)]
    assert warm.model.__dict__.get("_plan") is None   # nothing has run the model yet
    warm_up(warm.model)
    if cpu_step.scripted() is not None:   # the first answer then finds the step compiled and planned
        assert type(warm.model.__dict__.get("_plan")) is cpu_step.Plan
    got = answer(warm)
    assert got and got == answer(cold)   # the throwaway sequence left nothing behind
