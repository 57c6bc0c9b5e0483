"""The batched engine: many requests in one forward pass, each getting what it would get alone."""
import functools
import threading

import pytest
import torch
from conftest import make_tiny_model
from test_generation import sharpen

import sol.core.generation.engine as engine_module
import sol.core.model.transformer as model_module
from sol.core.errors import SolError
from sol.core.formats.checkpoint import load_model
from sol.core.generation.batch import BatchEngine, QueueFull
from sol.core.generation.decode_step import DecodeStep, buckets
from sol.core.generation.engine import DoneEvent, Engine, GenerationParams, TokenEvent
from sol.core.generation import threads
from sol.core.generation.sampling import SamplingParams


@pytest.fixture(scope="module", params=["gpt2", "rope_gqa"])
def lm(request, tmp_path_factory):
    cfg = dict(n_layer=2, n_head=4, d_model=64, context=128)
    if request.param == "rope_gqa":
        cfg.update(n_kv_head=2, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)
    d = make_tiny_model(tmp_path_factory.mktemp("m") / request.param, seed=5, **cfg)
    return sharpen(load_model(d))


def prompts(lm, n):
    """n prompts of different lengths (3 to 3 + 4(n-1) tokens)."""
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, lm.config.vocab_size, (3 + 4 * i,), generator=g).tolist() for i in range(n)]


def params(max_tokens, temperature=0.0, seed=None):
    return GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=temperature, top_k=40,
                                                                           seed=seed))


def solo(lm, prompt, p):
    engine = Engine(lm.model, lm.tokenizer)
    events = list(engine.generate(engine.session(prompt), p))
    return [e.id for e in events[:-1]], events[-1]


def drain(req):
    events = []
    while True:
        ev = req.get(timeout=0)
        if ev is None:
            return events
        events.append(ev)


def test_batched_greedy_equals_each_request_alone(lm):
    ps = prompts(lm, 8)
    max_tokens = [20, 7, 31, 12, 25, 3, 18, 40]
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=8)
    reqs, events = [], {}
    # Requests join at different steps: two at once, then one every few steps.
    joins = {0: 2, 2: 1, 3: 1, 7: 1, 8: 1, 15: 1, 16: 1}
    for step in range(200):
        for _ in range(joins.get(step, 0)):
            i = len(reqs)
            reqs.append(engine.submit(ps[i], params(max_tokens[i])))
        engine.step()
        for i, r in enumerate(reqs):
            events.setdefault(i, []).extend(drain(r))
        if len(reqs) == 8 and all(r.finished for r in reqs) and not engine.active:
            break
    assert engine.active == 0 and engine.queued == 0
    for i in range(8):
        ids, done = solo(lm, ps[i], params(max_tokens[i]))
        got = [e.id for e in events[i] if isinstance(e, TokenEvent)]
        assert got == ids, f"request {i}"
        last = events[i][-1]
        assert isinstance(last, DoneEvent) and last.token_ids == ids and last.stop_reason == "max_tokens"
        assert last.text == done.text and last.prompt_tokens == len(ps[i])


def test_cancelling_one_request_leaves_the_others_unchanged(lm):
    ps = prompts(lm, 4)
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=4)
    reqs = [engine.submit(p, params(30)) for p in ps]
    for _ in range(5):
        engine.step()
    reqs[1].cancel()
    while any(not r.finished for r in reqs):
        engine.step()
    out = [list(r) for r in reqs]
    assert out[1][-1].stop_reason == "cancelled" and len(out[1][-1].token_ids) < 30
    for i in (0, 2, 3):
        assert [e.id for e in out[i][:-1]] == solo(lm, ps[i], params(30))[0]


def test_seeded_sampling_does_not_depend_on_the_companions(lm):
    ps = prompts(lm, 6)
    alone = solo(lm, ps[0], params(25, temperature=1.0, seed=42))[0]
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=6)
    reqs = [engine.submit(p, params(25, temperature=1.0, seed=42 if i == 0 else i)) for i, p in enumerate(ps)]
    while any(not r.finished for r in reqs):
        engine.step()
    assert [e.id for e in list(reqs[0])[:-1]] == alone


def test_more_requests_than_rows_wait_their_turn_on_the_thread(lm):
    ps = prompts(lm, 10)
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=3, max_queue=16)
    engine.start()
    try:
        reqs = [engine.submit(p, params(9)) for p in ps]
        results = {}

        def read(i):
            results[i] = list(reqs[i])

        threads = [threading.Thread(target=read, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.close()
    for i in range(10):
        assert [e.id for e in results[i][:-1]] == solo(lm, ps[i], params(9))[0]
    assert engine.active == 0


def test_stop_ids_and_strings_end_a_request_like_generate(lm):
    p = prompts(lm, 1)[0]
    ids, _ = solo(lm, p, params(30))
    stop = GenerationParams(max_tokens=30, sampling=SamplingParams(temperature=0), stop_ids=(ids[5],))
    engine = BatchEngine(lm.model, lm.tokenizer)
    req = engine.submit(p, stop)
    while not req.finished:
        engine.step()
    done = list(req)[-1]
    assert done.stop_reason == "eos" and done.token_ids == solo(lm, p, stop)[0]


def test_a_request_that_cannot_fit_is_refused_with_the_numbers(lm):
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=1, max_queue=1)
    with pytest.raises(SolError, match=r"100 tokens plus max_tokens 40 = 140 .* context window of 128"):
        engine.submit([1] * 100, params(40))
    engine.submit([1, 2], params(4))
    with pytest.raises(QueueFull, match="try again later"):
        engine.submit([1, 2], params(4))
    assert "KV cache up to" in engine.describe()


def test_the_decode_step_sees_the_same_shapes_token_after_token(lm, monkeypatch):
    seen = []
    real = model_module.decode_attention

    def spy(q, k, v, mask, *rest):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(mask.shape)))
        return real(q, k, v, mask, *rest)

    monkeypatch.setattr(model_module, "decode_attention", spy)
    # The Python loop's attention is spied on; the scripted one (core/model/cpu_step.py) is bitwise the same.
    monkeypatch.setattr(model_module.Transformer, "_cpu_plan", lambda self: None)
    # One sequence through the static step (the one CUDA captures): 60 tokens, one shape.
    monkeypatch.setattr(engine_module, "DecodeStep", functools.partial(DecodeStep, pad=True))
    ids, _ = solo(lm, prompts(lm, 1)[0], params(60))
    assert len(ids) == 60 and len(set(seen)) == 1
    seen.clear()
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=4)
    reqs = [engine.submit(p, params(50)) for p in prompts(lm, 4)]
    while any(not r.finished for r in reqs):
        engine.step()
    assert len(set(seen)) == 1   # four rows, the same capacity, every step


def test_one_row_on_the_cpu_reads_only_the_filled_cache_and_never_reallocates_it(lm, monkeypatch):
    """The CPU's eager one-row step slices the cache to the filled positions (nothing is captured on
    the CPU, so a changing length costs nothing) and gives the static step's tokens."""
    lengths = []
    real = model_module.decode_attention

    def spy(q, k, v, mask, *rest):
        lengths.append(k.shape[2])
        return real(q, k, v, mask, *rest)

    prompt = prompts(lm, 2)[1]
    engine = Engine(lm.model, lm.tokenizer)

    def one_row():
        session = engine.session(prompt)
        storage = [t.data_ptr() for t in session.cache.k]
        ids = [e.id for e in engine.generate(session, params(30)) if isinstance(e, TokenEvent)]
        assert [t.data_ptr() for t in session.cache.k] == storage
        return ids

    # The scripted loop (core/model/cpu_step.py) runs the same slices; the Python loop's are spied on.
    scripted = one_row()
    monkeypatch.setattr(model_module.Transformer, "_cpu_plan", lambda self: None)
    monkeypatch.setattr(model_module, "decode_attention", spy)
    ids = one_row()
    n = lm.config.n_layer
    # Each step reads positions 0..pos: the prompt and one more per token (every chosen token is fed).
    assert lengths == [len(prompt) + 1 + t for t in range(30) for _ in range(n)]
    monkeypatch.setattr(model_module, "decode_attention", real)
    monkeypatch.setattr(engine_module, "DecodeStep", functools.partial(DecodeStep, pad=True))
    static, _ = solo(lm, prompt, params(30))
    assert ids == static == scripted


def test_kv_memory_is_stated_and_matches_what_is_allocated(lm):
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=4)
    cfg = lm.config
    per_row = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * cfg.context * 4
    assert engine.kv_memory() == 4 * per_row and engine.kv_memory(1) == per_row
    engine.cache.reserve(cfg.context)
    assert engine.cache.nbytes() == engine.kv_memory()


def test_decode_step_buckets():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(6) == [1, 2, 4, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_captured_step_equals_the_eager_one(lm):
    from sol.core.formats.checkpoint import load_model as load
    gpu = load(lm.path, device="cuda", dtype=torch.float32)
    cache = gpu.model.new_cache(4, 64)
    eager = DecodeStep(gpu.model, cache, capture=False)
    captured = DecodeStep(gpu.model, cache, capture=True)
    tokens, positions = [3, 5, 7], [0, 0, 0]
    for step in range(10):
        a = eager(tokens, positions).clone()
        b = captured(tokens, positions)
        assert (a - b).abs().max() < 1e-4
        positions = [p + 1 for p in positions]


def test_models_info_states_the_kv_memory_of_concurrent_sequences(tiny_model, capsys):
    import json

    from sol.core.cli import main
    assert main(["models", "info", str(tiny_model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # 2 layers x 2 heads x 16 dims x 128 positions x (k, v) x 4 bytes = 65536 bytes per sequence
    assert info["kv_cache_mb_per_sequence"] == {"float32": 0.06, "bfloat16": 0.03}
    assert info["kv_cache_mb_8_sequences"]["float32"] == 0.5


def test_rows_padded_to_a_bucket_as_the_captured_step_pads_them_change_nothing(lm):
    """The CUDA graph path runs a bucket of rows (1, 2, 4, 8...) and lets the extra rows decode into free
    cache rows; here the same padding runs eagerly, so the CPU checks what the GPU relies on."""
    ps = prompts(lm, 5)
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=8)
    engine.step_fn = DecodeStep(lm.model, engine.cache, capture=False, pad=True)
    reqs = [engine.submit(p, params(12 + 3 * i)) for i, p in enumerate(ps)]   # 5 rows -> a bucket of 8
    while any(not r.finished for r in reqs):
        engine.step()
    for i, r in enumerate(reqs):
        assert [e.id for e in list(r)[:-1]] == solo(lm, ps[i], params(12 + 3 * i))[0]


def test_cpu_decode_layout_changes_strides_not_values(lm, tmp_path):
    """Widening float32 weights are stored column-major for the CPU's matrix-vector product; values,
    shapes, outputs and what is saved stay the same."""
    from sol.core.formats.checkpoint import save_model
    from sol.core.generation.decode_step import cpu_decode_layout
    model = load_model(lm.path).model   # a copy of its own: the fixture's model stays as it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, lm.config.vocab_size, (1, 9))
    with torch.no_grad():
        logits = model(x)
    cpu_decode_layout(model)
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.shape[0] > qkv.shape[1] and not qkv.is_contiguous() and qkv.t().is_contiguous()
    assert model.blocks[0].mlp.proj.weight.is_contiguous()   # narrowing: rows stay contiguous
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    save_model(tmp_path / "saved", model, lm.tokenizer)
    again = load_model(tmp_path / "saved").model.state_dict()
    assert all(torch.equal(again[k], before[k]) for k in before)


def test_a_listener_gets_every_event_in_order_those_made_before_it_first(lm):
    """sol serve hands events to its event loop through Request.listen, on the engine's thread."""
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=2)
    p = params(6)
    ids, done = solo(lm, prompts(lm, 1)[0], p)
    req = engine.submit(prompts(lm, 1)[0], p)
    engine.step()
    engine.step()                       # two events wait on the queue
    got = []
    req.listen(got.append)
    while not req.finished:
        engine.step()
    assert [e.id for e in got[:-1]] == ids and isinstance(got[-1], DoneEvent) and got[-1].token_ids == done.token_ids
    assert req.get(timeout=0) is None   # nothing went to the queue once someone listened


@pytest.fixture
def two_threads():
    """At least two torch threads, even on a one-core machine, so that one thread is a change to see."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, 2))
    yield
    torch.set_num_threads(before)


def test_a_small_prefill_runs_on_one_thread_and_decode_steps_keep_every_thread(lm, monkeypatch, two_threads):
    """The prefill that begins a small model's answer runs on one CPU thread (generation/threads.py: no
    sleeping OpenMP worker to wake after a pause), in the batched engine and in the one-sequence engine of
    sol chat and the GUI, whose steps of a float32 model do too; the batched engine's steps keep every
    thread; a model too big for one thread keeps them all. The count is restored after each."""
    threads_before = torch.get_num_threads()
    seen = []
    model_forward = type(lm.model).forward
    step_call = DecodeStep.__call__
    monkeypatch.setattr(type(lm.model), "forward",
                        lambda self, *a, **k: seen.append(("prefill", torch.get_num_threads())) or
                        model_forward(self, *a, **k))
    monkeypatch.setattr(DecodeStep, "__call__",
                        lambda self, tokens, positions: seen.append((len(tokens), torch.get_num_threads())) or
                        step_call(self, tokens, positions))
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=2)
    one = engine.submit(prompts(lm, 1)[0], params(8))
    engine.step()
    engine.step()
    assert seen[:2] == [("prefill", 1), (1, threads_before)] and torch.get_num_threads() == threads_before
    two = engine.submit(prompts(lm, 2)[1], params(3))
    while not (one.finished and two.finished):
        engine.step()
    assert ("prefill", 1) in seen[2:] and (2, threads_before) in seen

    seen.clear()   # the one-sequence engine: its float32 model's steps too (its first token waits for one)
    solo_engine = Engine(lm.model, lm.tokenizer)
    list(solo_engine.generate(solo_engine.session(prompts(lm, 1)[0]), params(3)))
    assert seen[0] == ("prefill", 1) and {n for _, n in seen[1:]} == {1}

    seen.clear()
    monkeypatch.setattr(threads, "SMALL_WORK", 0)   # as if the model were too big for one thread
    big = BatchEngine(lm.model, lm.tokenizer, max_batch=1)
    r = big.submit(prompts(lm, 1)[0], params(2))
    while not r.finished:
        big.step()
    assert {n for _, n in seen} == {threads_before} and torch.get_num_threads() == threads_before


def test_only_plain_float32_layers_decode_on_one_thread(lm):
    """An int8 (or float16, or GGUF) model's decode steps keep every thread: two decode a small one 1.5x faster."""
    from sol.core.model.quant import quantize_model
    assert threads.float32_layers(lm.model)
    int8 = quantize_model(load_model(lm.path).model)
    assert not threads.float32_layers(int8)


def test_a_thread_that_starts_beside_a_one_thread_window_still_gets_every_thread(two_threads):
    """torch's thread count is process-wide and each thread reads it once: one that first asks while another
    holds it at one keeps one, unless it settles first (generation/threads.py), which waits for the window."""
    import time
    full = torch.get_num_threads()
    inside, release, seen = threading.Event(), threading.Event(), {}

    def window():
        with threads.one_thread():
            inside.set()
            release.wait(10)

    def unsettled():
        inside.wait(10)
        seen["unsettled"] = torch.get_num_threads()

    def settled():
        inside.wait(10)
        threads.settle()
        seen["settled"] = torch.get_num_threads()
    workers = [threading.Thread(target=f) for f in (window, unsettled, settled)]
    for t in workers:
        t.start()
    inside.wait(10)
    time.sleep(0.2)
    release.set()
    for t in workers:
        t.join(10)
    assert seen == {"unsettled": 1, "settled": full} and torch.get_num_threads() == full
