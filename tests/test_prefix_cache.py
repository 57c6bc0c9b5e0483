"""The prefix cache: KV rows of recent sequences reused by prompts that begin the same way, within a
memory budget, least recently used first out, never shared between models."""
from __future__ import annotations

import torch

from sol.core.generation.batch import BatchEngine
from sol.core.generation.engine import GenerationParams
from sol.core.generation.prefix_cache import PrefixCache
from sol.core.generation.sampling import SamplingParams


def rows(n: int, fill: float = 1.0, layers: int = 2):
    """One (kv_heads 2, n positions, head_dim 4) float32 tensor per layer: 32 bytes a position a layer."""
    return [torch.full((2, n, 4), fill) for _ in range(layers)], [torch.full((2, n, 4), -fill) for _ in range(layers)]


def test_common_prefix_agrees_with_a_plain_loop():
    import random

    from sol.core.generation.prefix_cache import common_prefix
    rng = random.Random(0)
    for _ in range(3000):
        a = tuple(rng.randrange(3) for _ in range(rng.randrange(40)))
        b = a[:rng.randrange(len(a) + 1)] + tuple(rng.randrange(3) for _ in range(rng.randrange(40)))
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == common_prefix(b, a) == want


def test_lookup_finds_the_longest_stored_prefix_of_the_same_model_only():
    cache = PrefixCache(1 << 20)
    cache.store("a", list(range(10)), *rows(10, 1.0))
    cache.store("a", [0, 1, 2, 3, 4, 5, 99, 98], *rows(8, 2.0))
    cache.store("b", list(range(20)), *rows(20, 3.0))
    n, k, v = cache.lookup("a", list(range(15)))
    assert n == 10 and float(k[0][0, 0, 0]) == 1.0 and float(v[1][0, 0, 0]) == -1.0
    assert cache.lookup("a", [0, 1, 2, 3, 4, 5, 99, 7])[0] == 7
    assert cache.lookup("a", list(range(15)), limit=6)[0] == 6   # the caller feeds at least one token
    assert cache.lookup("c", list(range(15))) is None            # another model (or adapter): nothing
    assert cache.lookup("a", [0, 1, 2, 50]) is None              # 3 shared tokens: under min_tokens, no copy


def test_an_extension_replaces_its_prefix_and_a_covered_sequence_is_not_stored_again():
    cache = PrefixCache(1 << 20)
    cache.store("a", list(range(10)), *rows(10))
    assert cache.store("a", list(range(16)), *rows(16))
    assert len(cache.entries) == 1 and cache.nbytes == 16 * 2 * 2 * 32
    assert not cache.store("a", list(range(12)), *rows(12))      # covered by the 16
    assert len(cache.entries) == 1


def test_the_budget_drops_the_least_recently_used_first():
    per = 10 * 2 * 2 * 32                                          # bytes of a 10-token entry
    cache = PrefixCache(3 * per)
    for first in (100, 200, 300):
        cache.store("a", [first + i for i in range(10)], *rows(10))
    cache.lookup("a", [100 + i for i in range(10)])               # 100 is now the most recent
    cache.store("a", [400 + i for i in range(10)], *rows(10))
    assert cache.nbytes <= 3 * per
    assert cache.lookup("a", [200 + i for i in range(10)]) is None
    assert all(cache.lookup("a", [f + i for i in range(10)]) for f in (100, 300, 400))
    assert not cache.store("a", list(range(40)), *rows(40))        # larger than the whole budget
    assert not PrefixCache(0).enabled and PrefixCache(0).lookup("a", [1, 2, 3, 4, 5]) is None


def answer(engine, prompt, params):
    """The engine's request for one prompt, stepped until it is done, and its events."""
    req = engine.submit(prompt, params)
    while not req.finished:
        engine.step()
    return req, list(req)


def test_a_conversation_through_the_engine_reuses_its_rows_and_answers_the_same(tiny_model):
    from sol.core.formats.checkpoint import load_model
    lm = load_model(tiny_model)
    params = GenerationParams(max_tokens=6, sampling=SamplingParams(temperature=0), explain=False)

    def turns(prefix):
        engine = BatchEngine(lm.model, lm.tokenizer, max_batch=2, prefix_cache=prefix, cache_key="tiny")
        prompt = lm.tokenizer.encode_ids("the quick brown fox jumps over the lazy dog and")
        out = []
        for turn in range(4):
            req, events = answer(engine, prompt, params)
            out.append((events[-1].token_ids, req.cached_tokens))
            prompt = prompt + events[-1].token_ids + lm.tokenizer.encode_ids(f" then {turn}")
        return out
    without = turns(None)
    with_cache = turns(PrefixCache(64 << 20))
    assert [ids for ids, _ in with_cache] == [ids for ids, _ in without]
    assert [c for _, c in without] == [0, 0, 0, 0]
    assert with_cache[0][1] == 0 and all(c > 10 for _, c in with_cache[1:])


def test_a_hit_that_leaves_one_token_runs_it_through_the_decode_step_and_answers_the_same(tiny_model):
    """The same prompt again (a client retrying, or a turn whose new text is one token): the prefix cache
    leaves its last token, which an idle engine runs through the decode step's one-row path
    (BatchEngine._one_row) instead of the model's forward; the answer and its log-probabilities agree."""
    from sol.core.formats.checkpoint import load_model
    lm = load_model(tiny_model)
    params = GenerationParams(max_tokens=6, sampling=SamplingParams(temperature=0), explain=False)
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=2, prefix_cache=PrefixCache(64 << 20), cache_key="t")
    prompt = lm.tokenizer.encode_ids("the quick brown fox jumps over the lazy dog and")
    one_row, calls = engine._one_row, []
    engine._one_row = lambda token, position: calls.append(position) or one_row(token, position)
    runs = []
    for _ in range(2):
        req, events = answer(engine, prompt, params)
        runs.append((events[-1].token_ids, [e.logprob for e in events[:-1]], req.cached_tokens))
    assert runs[0][2] == 0 and runs[1][2] == len(prompt) - 1 and calls == [len(prompt) - 1]
    assert runs[1][0] == runs[0][0]
    assert max(abs(a - b) for a, b in zip(runs[0][1], runs[1][1])) < 1e-4
