"""The benchmarks' side of nanoGPT: reading what its train.py and bench.py print, writing its data as
its prepare.py does, and timing a child process's lines from its launch (benchmarks/side_by_side.py)."""
from __future__ import annotations

import pickle
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import side_by_side as sbs  # noqa: E402

# Lines exactly as nanoGPT's train.py (CPU recipe, log_interval=1) and bench.py print them.
TRAIN_LOG = """\
tokens per iteration will be: 768
found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)
Initializing a new model from scratch
number of parameters: 0.80M
num decayed parameter tensors: 18, with 802,944 parameters
num non-decayed parameter tensors: 9, with 1,152 parameters
using fused AdamW: False
step 0: train loss 4.1650, val loss 4.1649
iter 0: loss 4.1781, time 2413.57ms, mfu -100.00%
iter 1: loss 4.1659, time 36.94ms, mfu -100.00%
iter 2: loss 4.1857, time 40.00ms, mfu -100.00%
iter 249: loss 2.4851, time 38.06ms, mfu 0.03%
step 250: train loss 2.4153, val loss 2.4230
saving checkpoint to out-shakespeare-char
iter 250: loss 2.4251, time 1658.20ms, mfu 0.03%
iter 251: loss 2.4102, time 44.00ms, mfu 0.03%
step 500: train loss 1.8800, val loss 1.8850
iter 500: loss 1.9001, time 1700.00ms, mfu 0.03%
iter 501: loss 1.8951, time 41.00ms, mfu 0.03%
"""
BENCH_LOG = """\
Compiling model...
19/20 loss: 10.9671
time per iteration: 135.2541ms, MFU: 31.07%
"""


def test_parser_reads_nanogpts_lines():
    parsed = [sbs.parse_line(line) for line in TRAIN_LOG.splitlines()]
    iters = [p for p in parsed if p and p["kind"] == "iter"]
    evals = [p for p in parsed if p and p["kind"] == "eval"]
    assert [p["iter"] for p in iters] == [0, 1, 2, 249, 250, 251, 500, 501]
    assert iters[0] == {"kind": "iter", "iter": 0, "loss": 4.1781, "ms": 2413.57}
    assert evals == [{"kind": "eval", "step": 0, "train_loss": 4.165, "val_loss": 4.1649},
                     {"kind": "eval", "step": 250, "train_loss": 2.4153, "val_loss": 2.423},
                     {"kind": "eval", "step": 500, "train_loss": 1.88, "val_loss": 1.885}]
    assert sum(p is None for p in parsed) == 8   # the other lines
    bench = [sbs.parse_line(line) for line in BENCH_LOG.splitlines()]
    assert bench == [None, None, {"kind": "bench", "ms": 135.2541}]


def test_tokens_per_s_leaves_out_the_iterations_that_evaluated():
    iters = [p for p in map(sbs.parse_line, TRAIN_LOG.splitlines()) if p and p["kind"] == "iter"]
    ms = [36.94, 40.00, 38.06, 44.00, 41.00]   # iterations 0, 250 and 500 also evaluated
    assert sbs.nanogpt_tokens_per_s(iters, 250, 768) == pytest.approx(768 * 5 / (sum(ms) / 1000))


def test_child_lines_are_timed_from_launch_and_the_run_ends_at_the_target(tmp_path):
    # A stand-in for train.py: prints the log above, then would run for a minute more.
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        for line in {TRAIN_LOG!r}.splitlines():
            print(line)
            if line.startswith("step 250"):
                time.sleep(0.5)
        time.sleep(60)
    """))
    run = sbs.run_nanogpt_train(tmp_path, [], timeout=30, target=1.886, stop_at_target=True)
    assert run["step_at_target"] == 500
    assert 0.5 <= run["seconds_to_target"] < run["wall_s"] < 20   # ended at the target, not after 60 s
    assert run["stopped"] and not run["timed_out"] and sbs.error_of(run, "x") is None
    assert [e["step"] for e in run["evals"]] == [0, 250, 500]
    assert run["evals"][1]["t"] < 0.5 <= run["evals"][2]["t"]


def test_a_child_that_overruns_is_ended_with_an_error(tmp_path):
    (tmp_path / "train.py").write_text("import time\nprint('step 0: train loss 4.0, val loss 4.0')\ntime.sleep(60)\n")
    run = sbs.run_nanogpt_train(tmp_path, [], timeout=2, target=1.0)
    assert run["timed_out"] and run["seconds_to_target"] is None and run["wall_s"] < 20
    assert "timed out" in sbs.error_of(run, "nanoGPT train.py")


def test_char_data_is_written_as_nanogpts_prepare_writes_it(tmp_path):
    text = "hello world\nsecond line!\n" * 7
    (tmp_path / "input.txt").write_text(text)
    vocab = sbs.prepare_char(tmp_path / "input.txt", tmp_path)
    d = tmp_path / "data" / "shakespeare_char"
    chars = sorted(set(text))
    assert vocab == len(chars)
    train, val = np.fromfile(d / "train.bin", dtype=np.uint16), np.fromfile(d / "val.bin", dtype=np.uint16)
    n = int(len(text) * 0.9)
    assert "".join(chars[i] for i in train) == text[:n] and "".join(chars[i] for i in val) == text[n:]
    meta = pickle.loads((d / "meta.pkl").read_bytes())
    assert meta["vocab_size"] == vocab and meta["stoi"] == {c: i for i, c in enumerate(chars)}


def test_nanogpt_workdir_copies_the_reference_unchanged():
    work = sbs.nanogpt_workdir()
    try:
        ref = sbs.reference_dir()
        for f in sbs.NANOGPT_FILES + ("config/train_shakespeare_char.py",):
            assert (work / f).read_bytes() == (ref / f).read_bytes()
    finally:
        shutil.rmtree(work)


def test_train_gpu_counts_parameters_as_nanogpt_and_mfu_as_the_issue():
    import importlib.util
    import train_gpu
    spec = importlib.util.spec_from_file_location("nanogpt_model", sbs.reference_dir() / "model.py")
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)   # a test's reference only; the product never imports it
    m = nanogpt.GPT(nanogpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50304, bias=False))
    assert train_gpu.nanogpt_params(2, 32) == m.get_num_params()
    assert train_gpu.nanogpt_params(12, 768) == 123_587_328   # GPT-2 124M without biases (nanoGPT: 123.59M)
    # (6 N + 12 L d T) x tokens/s / 989e12
    assert train_gpu.mfu(100, 2, 8, 16, 1e9) == pytest.approx((600 + 12 * 2 * 8 * 16) * 1e9 / 989e12)
    assert train_gpu.mfu(100, 2, 8, 16, None) is None


def test_train_gpu_times_sols_steady_steps():
    import train_gpu
    steps = [{"step": s, "t": 10.0 + (s - 1) * 0.5} for s in range(1, 11)]
    steps[0]["t"] = 5.0   # compilation in the first step
    assert train_gpu.steady_tokens_per_s(steps, 100) == pytest.approx(100 / 0.5)
    assert train_gpu.steady_tokens_per_s(steps[:2], 100) is None
    # read every 5 steps (--log-every 5): five events at once, the last of them when its step ended
    bursts = [{"step": s, "t": 2.0 * ((s + 4) // 5) + s * 1e-5} for s in range(1, 41)]
    assert train_gpu.steady_tokens_per_s(bursts, 100) == pytest.approx(100 / 0.4, rel=1e-3)
