"""The training loop's speed work changes nothing it computes: batches built ahead in a thread, loss and
gradient norm read from the device only every N steps, the tokenized corpus cached, the chunked
cross-entropy. CPU, tiny models."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import run_stage

from sol.core.data import corpus
from sol.core.formats.tokenizer import train_char

MODEL = ["--layers", 2, "--heads", 2, "--d-model", 32, "--context", 32]


def pretrain(corpus_file, out, steps, *extra):
    return run_stage("pretrain", ["--corpus", corpus_file, "--out", out, *MODEL, "--batch-size", 8,
                                  "--max-steps", steps, "--lr", 3e-3, "--warmup", 3, "--eval-every", 0,
                                  "--sample-every", 0, "--checkpoint-every", 0, *extra])


def steps_of(events):
    return [(e["step"], e["loss"], e["grad_norm"], e["lr"]) for e in events if e["type"] == "step"]


@pytest.fixture
def seen_rows(monkeypatch):
    """Every micro-batch the model trains on, in order (the rows of token ids)."""
    from sol.core.train.pretrain import Pretrain
    seen = []
    loss = Pretrain.loss

    def spy(self, module, batch):
        if module.training:
            seen.append(batch["rows"].clone())
        return loss(self, module, batch)
    monkeypatch.setattr(Pretrain, "loss", spy)
    return seen


@pytest.mark.parametrize("accum", [1, 2])
def test_prefetch_and_deferred_reads_change_no_step(tmp_path, tiny_text_file, seen_rows, monkeypatch, accum):
    from sol.core.train.pretrain import Pretrain
    threads = []
    make = Pretrain.micro_batches
    monkeypatch.setattr(Pretrain, "micro_batches",
                        lambda self, *a: threads.append(threading.current_thread().name) or make(self, *a))
    _, ref = pretrain(tiny_text_file, tmp_path / "ref", 12, "--no-prefetch", "--log-every", 1, "--grad-accum", accum)
    assert threads == ["MainThread"] * 12
    ref_rows = list(seen_rows)
    seen_rows.clear()
    threads.clear()
    _, fast = pretrain(tiny_text_file, tmp_path / "fast", 12, "--prefetch", "--log-every", 5, "--grad-accum", accum)
    # step 0 is built when asked for, every later step in the background while the one before trains
    assert threads[0] == "MainThread" and all(t.startswith("sol-batches") for t in threads[1:])
    assert len(threads) == 12
    assert steps_of(fast) == steps_of(ref)          # every step's loss and grad norm, bit for bit
    assert [s for s, *_ in steps_of(fast)] == list(range(1, 13))
    assert all(torch.equal(a, b) for a, b in zip(seen_rows, ref_rows)) and len(seen_rows) == 12 * accum
    # read every 5 steps: steps 1-5 were emitted together, over one interval, and so were 6-10
    rates = [e["tokens_per_s"] for e in fast if e["type"] == "step"]
    assert len(set(rates[:5])) == 1 and len(set(rates[5:10])) == 1 and rates[0] != rates[5]
    assert all(r > 0 for r in rates)
    etas = [e["eta_s"] for e in fast if e["type"] == "step"]
    assert etas[-1] == 0 and all(a > b for a, b in zip(etas, etas[1:]))
    from sol.core.formats.checkpoint import load_model
    w_ref, w_fast = load_model(tmp_path / "ref").model.state_dict(), load_model(tmp_path / "fast").model.state_dict()
    assert all(torch.equal(w_ref[k], w_fast[k]) for k in w_ref)


def test_resume_with_prefetch_lands_on_the_same_step_lr_and_batches(tmp_path, tiny_text_file, seen_rows):
    steps = 16
    _, full = pretrain(tiny_text_file, tmp_path / "full", steps, "--log-every", 4, "--no-prefetch")
    full_rows = list(seen_rows)
    seen_rows.clear()

    def interrupt(events):
        def emit(e):
            events.append(e)
            if e["type"] == "step" and e["step"] == 5:   # Ctrl-C while step 5's event is out
                os.kill(os.getpid(), signal.SIGINT)
        return emit

    from test_train import stage_args
    spec, args = stage_args("pretrain", ["--corpus", tiny_text_file, "--out", tmp_path / "cut", *MODEL,
                                         "--batch-size", 8, "--max-steps", steps, "--lr", 3e-3, "--warmup", 3,
                                         "--eval-every", 0, "--sample-every", 0, "--checkpoint-every", 0,
                                         "--log-every", 4, "--prefetch", "--threads", 1])
    cut = []
    done = spec.run(args, interrupt(cut))
    assert done["stopped"] is True
    stopped_at = done["step"]
    assert 5 < stopped_at < steps   # stopped at the next read (step 8), never at once mid-interval
    assert [e["step"] for e in cut if e["type"] == "step"] == list(range(1, stopped_at + 1))
    n_cut = len(seen_rows)
    _, resumed = pretrain(tiny_text_file, tmp_path / "cut", steps, "--resume", "--log-every", 4, "--prefetch")
    start = resumed[0]
    assert start["type"] == "start" and start["step"] == stopped_at
    assert all(torch.equal(a, b) for a, b in zip(seen_rows, full_rows)) and len(seen_rows) == steps
    assert n_cut == stopped_at
    by_step = {s: (loss, lr) for s, loss, _, lr in steps_of(full)}
    got = steps_of(resumed)
    assert got[0][0] == stopped_at + 1 and [s for s, *_ in got] == list(range(stopped_at + 1, steps + 1))
    for s, loss, _, lr in got:
        assert lr == by_step[s][1]
        assert loss == pytest.approx(by_step[s][0], abs=1e-5)


def test_second_run_on_the_same_data_skips_tokenizing(tmp_path, tiny_text_file, monkeypatch, isolated_home):
    calls = []
    encode = corpus.encode_file
    monkeypatch.setattr(corpus, "encode_file", lambda tok, f, *a, **k: calls.append(f) or encode(tok, f, *a, **k))
    _, first = pretrain(tiny_text_file, tmp_path / "one", 2)
    assert len(calls) == 1
    _, second = pretrain(tiny_text_file, tmp_path / "two", 2)
    assert len(calls) == 1                             # the cached ids were used
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / "data" / name).read_bytes() == (tmp_path / "two" / "data" / name).read_bytes()
    meta = (tmp_path / "two" / "data" / "meta.json")
    assert meta.is_file() and any((isolated_home / "cache" / "corpus").iterdir())
    assert steps_of(first) == steps_of(second)


def test_corpus_cache_misses_on_a_changed_file_tokenizer_or_split(tmp_path, monkeypatch):
    calls = []
    encode = corpus.encode_file
    monkeypatch.setattr(corpus, "encode_file", lambda tok, f, *a, **k: calls.append(f) or encode(tok, f, *a, **k))
    cache = tmp_path / "cache"
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    tok = train_char([text])

    def build(out, tok=tok, val=0.1):
        return corpus.build([text], tok, tmp_path / out, 16, val, cache=cache)

    m1 = build("r1")
    m2 = build("r2")
    assert len(calls) == 1 and m1 == m2
    build("r3", val=0.2)                               # another split
    assert len(calls) == 2
    other = tmp_path / "b.txt"
    other.write_text("the quick brown fox jumps over the lazy dog!?\n", encoding="utf-8")
    build("r4", tok=train_char([text, other]))         # another vocabulary (two more characters)
    assert len(calls) == 3
    text.write_text("the quick brown fox jumps over the lazy cat\n" * 40, encoding="utf-8")
    m5 = build("r5")                                   # the file changed
    assert len(calls) == 4 and m5["files"][0]["sha256"] != m1["files"][0]["sha256"]
    train, _, _ = corpus.load(tmp_path / "r5")
    assert tok.decode(train[:44].tolist()) == "the quick brown fox jumps over the lazy cat\n"
    # an entry cut short is not used: the corpus is tokenized again and the entry repaired
    entry = cache / corpus.cache_key(corpus.describe_files([text]), tok, 0.1)
    assert corpus._cached(entry) is not None
    (entry / "train.bin").unlink()
    (entry / "train.bin").write_bytes(b"\0\0")
    build("r6")
    assert len(calls) == 5 and corpus._cached(entry) is not None
    assert (tmp_path / "r6" / "train.bin").read_bytes() == (tmp_path / "r5" / "train.bin").read_bytes()


def test_startup_s_counts_from_the_process_start_under_the_cli(tmp_path, tiny_text_file):
    from sol.core.train import loop
    _, events = pretrain(tiny_text_file, tmp_path / "a", 1)
    assert 0 < events[0]["startup_s"] < 60                 # in-process: from train()'s entry
    age = loop.process_age()
    assert age is not None and age > 0
    loop.mark_command_start()                          # what `sol train` does first
    _, events = pretrain(tiny_text_file, tmp_path / "b", 1)
    assert events[0]["startup_s"] >= age               # this test process's whole life so far
    _, events = pretrain(tiny_text_file, tmp_path / "c", 1)
    assert events[0]["startup_s"] < age                # a second run in the process: from its own entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_f_cross_entropy(dtype):
    from sol.core.train.losses import ChunkedCrossEntropy, cross_entropy_sum
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=g) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (2, 7), generator=g)
    targets[0, 2] = targets[1, 5] = -100
    ref_in = logits.detach().float().requires_grad_(True)
    ref = F.cross_entropy(ref_in.view(-1, 50), targets.view(-1), ignore_index=-100, reduction="sum")
    ref.backward()
    got = ChunkedCrossEntropy.apply(logits.view(-1, 50), targets.view(-1), -100, 3)   # 3 rows a chunk
    got.backward()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2   # the gradient is stored in the logits' dtype
    assert logits.grad.dtype == dtype
    assert torch.allclose(logits.grad.float(), ref_in.grad, atol=tol)
    assert logits.grad[0, 2].abs().sum() == 0           # an ignored position has no gradient
    # the dispatcher: float32 is F.cross_entropy itself, half precision the chunked one
    x = logits.detach()
    assert cross_entropy_sum(x, targets).item() == pytest.approx(ref.item(), rel=1e-5)


def test_bf16_pretrain_loss_never_casts_all_logits_to_float32(monkeypatch):
    from sol.core.train import losses
    seen = []
    real = torch.Tensor.float

    def spy(t):
        seen.append(t.numel())
        return real(t)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 200)
    logits = torch.randn(4, 8, 50).to(torch.bfloat16)
    targets = torch.randint(0, 50, (4, 8))
    monkeypatch.setattr(torch.Tensor, "float", spy)
    loss = losses.cross_entropy_sum(logits, targets)
    monkeypatch.setattr(torch.Tensor, "float", real)
    assert max(seen) <= 200 < logits.numel()
    ref = F.cross_entropy(logits.float().view(-1, 50), targets.view(-1), reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_vectorised_rows_equal_slices_of_the_stream():
    from sol.core.train.pretrain import rows
    data = np.arange(1000, dtype=np.uint16)
    offs = np.array([0, 5, 990 - 9, 17])
    r = rows(data, offs, 9)
    assert r.dtype == torch.int64 and r.shape == (4, 10)
    assert all(r[i].tolist() == list(range(o, o + 10)) for i, o in enumerate(offs))


def test_compile_uses_sols_cache_folder_and_reduce_overhead_only_where_it_is_safe(monkeypatch, isolated_home):
    from sol.core.train import compiled, ddp
    from sol.core.train.pretrain import Pretrain
    from sol.core.train.sft import SFT
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])   # sets torch's default folder, as training does
    compiled.use_caches()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == isolated_home / "cache" / "inductor"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    one, two = ddp.Dist(), ddp.Dist(0, 0, 2)
    assert compiled.effective_mode("reduce-overhead", Pretrain, cuda, one) == "reduce-overhead"
    assert compiled.effective_mode("reduce-overhead", Pretrain, cpu, one) == "default"
    assert compiled.effective_mode("reduce-overhead", SFT, cuda, one) == "default"     # shapes vary
    assert compiled.effective_mode("reduce-overhead", Pretrain, cuda, two) == "default"
    assert compiled.effective_mode("reduce-overhead", Pretrain, cuda, one, grad_accum=2) == "default"
    assert compiled.effective_mode("max-autotune", Pretrain, cpu, one) == "max-autotune"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    compiled.use_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"   # the user's choice stays


def test_log_every_must_not_be_negative(tmp_path, tiny_text_file):
    from sol.core.errors import SolError
    with pytest.raises(SolError, match="--log-every -1"):
        pretrain(tiny_text_file, tmp_path / "x", 2, "--log-every", -1)


def test_a_vocabulary_trained_on_the_same_files_is_reused(tmp_path, tiny_text_file, monkeypatch, isolated_home):
    trained = []
    train_bpe = corpus.train_bpe
    monkeypatch.setattr(corpus, "train_bpe", lambda files, n: trained.append(n) or train_bpe(files, n))
    pretrain(tiny_text_file, tmp_path / "one", 1, "--tokenizer", "bpe:320")
    pretrain(tiny_text_file, tmp_path / "two", 1, "--tokenizer", "bpe:320")
    assert trained == [320]
    assert (tmp_path / "one" / "tokenizer.json").read_text() == (tmp_path / "two" / "tokenizer.json").read_text()
    pretrain(tiny_text_file, tmp_path / "three", 1, "--tokenizer", "bpe:330")    # another size: trained
    assert trained == [320, 330]
    tiny_text_file.write_text(tiny_text_file.read_text(encoding="utf-8") + "more words\n", encoding="utf-8")
    pretrain(tiny_text_file, tmp_path / "four", 1, "--tokenizer", "bpe:320")     # other contents: trained
    assert trained == [320, 330, 320]


def test_compiled_pretraining_takes_the_same_steps(tmp_path, tiny_text_file, monkeypatch, isolated_home):
    """--compile traces forward, head and cross-entropy as one graph. aot_eager runs what dynamo and
    autograd traced without building kernels (no compiler needed, seconds not minutes); inductor's own
    numerics are torch's business."""
    compiled_what = []
    real = torch.compile

    def compile_(fn, mode=None, **kw):
        compiled_what.append((fn, mode))
        return real(fn, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    # float32: under bf16 autocast a traced graph may round in another order than eager (not a compile bug)
    _, eager = pretrain(tiny_text_file, tmp_path / "eager", 4, "--precision", "fp32")
    _, comp = pretrain(tiny_text_file, tmp_path / "comp", 4, "--compile", "--compile-mode", "reduce-overhead",
                       "--precision", "fp32")
    assert comp[0]["compile"] == "default"             # no CUDA graphs on the CPU
    assert len(compiled_what) == 1 and not isinstance(compiled_what[0][0], torch.nn.Module)
    for (s1, l1, g1, lr1), (s2, l2, g2, lr2) in zip(steps_of(eager), steps_of(comp), strict=True):
        assert (s1, lr1) == (s2, lr2) and l2 == pytest.approx(l1, abs=1e-5) and g2 == pytest.approx(g1, rel=1e-4)
    torch._dynamo.reset()


def test_prefetch_is_off_on_the_cpu_unless_asked(tmp_path, tiny_text_file, monkeypatch):
    from sol.core.train import loop
    made = []
    real = loop.Prefetcher
    monkeypatch.setattr(loop, "Prefetcher", lambda *a, ahead: made.append(ahead) or real(*a, ahead=ahead))
    pretrain(tiny_text_file, tmp_path / "a", 1)
    pretrain(tiny_text_file, tmp_path / "b", 1, "--prefetch")
    assert made == [False, True]


def test_precision_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    from sol.core import devices
    from sol.core.errors import SolError
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.training_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.training_precision("auto", cpu) == "fp32"
    assert devices.training_precision("auto", cuda) == "bf16"
    assert devices.training_precision("auto", mps) == "fp32"
    assert devices.training_precision("bf16", cpu) == "bf16" and devices.training_precision("fp32", cuda) == "fp32"
    with pytest.raises(SolError, match="--precision fp16: choose auto, fp32 or bf16"):
        devices.training_precision("fp16", cpu)


def test_cpu_attention_under_bf16_autocast_runs_in_float32(monkeypatch):
    """torch's CPU flash attention is slow in bf16: under CPU autocast q, k, v reach SDPA as float32, the
    matrix products stay bf16, and the result is what float32 attention gives on the same q, k, v."""
    from sol.core.model import layers as model_mod
    from sol.core.model.config import ModelConfig
    from sol.core.model.transformer import Transformer
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, context=16))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 50, (3, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(ids)
    assert logits.dtype == torch.bfloat16                     # the products did run in bf16
    assert seen == [(torch.float32,) * 3 + (False,)] * 2      # attention did not
    seen.clear()
    ref = m(ids)
    assert seen == [(torch.float32,) * 3 + (False,)] * 2 and ref.dtype == torch.float32
    assert (logits.float() - ref).abs().max() < 0.1           # bf16 rounding, not another function


def test_bf16_training_on_the_cpu_follows_float32(tmp_path, tiny_text_file):
    """--precision bf16 on the CPU (autocast; native or emulated) trains the same model as fp32 within
    bf16's rounding, says so in its start event, and keeps float32 weights."""
    _, b = pretrain(tiny_text_file, tmp_path / "bf16", 8, "--precision", "bf16")
    _, f = pretrain(tiny_text_file, tmp_path / "fp32", 8, "--precision", "fp32")
    assert b[0]["precision"] == "bf16" and f[0]["precision"] == "fp32"
    lb, lf = [s[1] for s in steps_of(b)], [s[1] for s in steps_of(f)]
    assert len(lb) == len(lf) == 8
    assert lb != lf                                            # bf16 did change the arithmetic
    assert all(abs(x - y) < 0.02 * y for x, y in zip(lb, lf))  # ...by rounding only
    assert lb[-1] < lb[0]
    from sol.core.formats.checkpoint import load_model
    assert all(p.dtype == torch.float32 for p in load_model(tmp_path / "bf16").model.parameters())


def test_rl_reference_logprobs_take_the_loops_precision():
    """Under bf16 autocast a policy equal to its reference has no KL: the reference's log-probs are computed
    in the loss, under the same autocast, not beside the batch in float32 (whose rounding would read as KL)."""
    import copy
    from types import SimpleNamespace

    from sol.core.model.config import ModelConfig
    from sol.core.model.transformer import Transformer
    from sol.core.train.rl import RL
    torch.manual_seed(0)
    policy = Transformer(ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, context=16))
    stage = RL.__new__(RL)
    stage.ref, stage.args = copy.deepcopy(policy).eval(), SimpleNamespace(beta=1.0)
    x = torch.randint(0, 40, (3, 12))
    batch = {"x": x, "mask": torch.ones(3, 11, dtype=torch.bool), "adv": torch.zeros(3, 1)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = stage.loss(policy.eval(), batch)
    assert float(kl.detach()) == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):   # and the penalty does see a policy that moved
        with torch.no_grad():
            policy.blocks[0].mlp.fc.weight.mul_(1.5)
        assert float(stage.loss(policy, batch).detach()) > 0.0
