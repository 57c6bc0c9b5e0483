"""Training on a GPU: nanoGPT and Sol in the same run, each a child process timed from its launch.

  char       nanoGPT's config/train_shakespeare_char.py as it is (6 layers, 6 heads, d_model 384,
             context 256, batch 64, dropout 0.2, lr 1e-3, compiled) with --eval_iters=20, and Sol
             with the same model, batch, schedule and evaluation (20 batches of 64 every 250 steps),
             compiled: wall seconds from the command's launch until a validation loss <= 1.47 is
             printed. The child is ended there.
  gpt2_124m  the GPT-2 124M shape (12 layers, 12 heads, d_model 768), bf16, compiled, context 1024,
             batch 12: nanoGPT's bench.py on random tokens (vocab 50304) and `sol train pretrain` on
             shakespeare_complete.txt (a 32768-token BPE): tokens/s and MFU, where
             MFU = (6 x parameters + 12 x layers x d_model x context) x tokens/s / 989e12 (the dense
             bf16 peak of an H100/H200) and parameters leave out the learned position table (nanoGPT's
             own count).

Each of the four runs has its own time limit; a run that fails or overruns gives null figures and an
error line, and the others still run. The line before the last holds the details (`details {...}`);
the last line is {"char": {"nanogpt_s", "sol_s", "ratio"}, "gpt2_124m": {"nanogpt_tok_s", "sol_tok_s",
"nanogpt_mfu", "sol_mfu"}}.

    python benchmarks/train_gpu.py --json                       # on a CUDA GPU
    python benchmarks/train_gpu.py --device cpu --tiny --json   # the dry run: same code, tiny sizes

On a GPU machine ../shared does not travel: copy ../shared/reference and ../shared/data into shared/
inside the repository (git ignores it) and carry it. Sol need not be installed: side_by_side.sol_env
puts the repository's folders on PYTHONPATH as the `sol` package.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side as sbs  # noqa: E402

PEAK_FLOPS = 989e12
CHAR_TARGET = 1.47

# The dry run's sizes: the same scripts and flags, models small enough for a CPU in seconds.
TINY_CHAR_NANOGPT = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
                     "--max_iters=200", "--lr_decay_iters=200", "--warmup_iters=5", "--learning_rate=0.01",
                     "--eval_interval=20", "--eval_iters=4", "--log_interval=10", "--dropout=0.0"]
TINY_TARGET = 3.3
TINY_GPT2 = {"layers": 1, "heads": 2, "d_model": 32, "context": 32, "batch": 2}
GPT2 = {"layers": 12, "heads": 12, "d_model": 768, "context": 1024, "batch": 12}


def mfu(params: int, layers: int, d_model: int, context: int, tok_s: float | None) -> float | None:
    if tok_s is None:
        return None
    return (6 * params + 12 * layers * d_model * context) * tok_s / PEAK_FLOPS


def nanogpt_params(layers: int, d_model: int, vocab: int = 50304) -> int:
    """nanoGPT's get_num_params() without biases: per layer c_attn 3d^2, c_proj d^2, the MLP 8d^2 and
    two LayerNorm weights; the tied embedding V*d and the final LayerNorm (position table left out)."""
    return layers * (12 * d_model * d_model + 2 * d_model) + vocab * d_model + d_model


def char_nanogpt(device: str, tiny: bool, timeout: float) -> dict:
    work = sbs.nanogpt_workdir()
    try:
        sbs.prepare_char(sbs.data_file("tinyshakespeare.txt"), work)
        argv = ["config/train_shakespeare_char.py", "--eval_iters=20", f"--device={device}"]
        if tiny:
            argv += ["--compile=False", *TINY_CHAR_NANOGPT]
        run = sbs.run_nanogpt_train(work, argv, timeout, TINY_TARGET if tiny else CHAR_TARGET, stop_at_target=True,
                                    label="char nanoGPT")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"seconds": run["seconds_to_target"], "step": run["step_at_target"],
            "evals": [(e["step"], round(e["t"], 1), e["val_loss"]) for e in run["evals"]],
            "error": None if run["seconds_to_target"] else
            sbs.error_of(run, "nanoGPT train.py") or "nanoGPT train.py: the target was not reached"}


def char_sol(device: str, tiny: bool, timeout: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="sol-gpu-bench-")) / "run"
    if tiny:
        model = ["--layers", "1", "--heads", "2", "--d-model", "32", "--context", "32", "--batch-size", "8",
                 "--max-steps", "200", "--warmup", "5", "--lr", "0.01", "--min-lr", "0.001", "--eval-every", "20",
                 "--eval-batches", "4", "--eval-batch-size", "8"]
    else:
        model = ["--layers", "6", "--heads", "6", "--d-model", "384", "--context", "256", "--batch-size", "64",
                 "--dropout", "0.2", "--max-steps", "5000", "--warmup", "100", "--lr", "1e-3", "--min-lr", "1e-4",
                 "--eval-every", "250", "--eval-batches", "20", "--eval-batch-size", "64", "--compile"]
    argv = ["--corpus", str(sbs.data_file("tinyshakespeare.txt")), "--out", str(out), "--tokenizer", "char",
            "--no-bias", "--device", device, "--sample-every", "0", "--checkpoint-every", "0", *model]
    try:
        run = sbs.run_sol_pretrain(argv, timeout, TINY_TARGET if tiny else CHAR_TARGET, stop_at_target=True,
                                   label="char Sol")
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    info = sbs.sol_summary(run)
    return {"seconds": run["seconds_to_target"], "step": run["step_at_target"], "evals": info["evals"],
            "startup_s": info["startup_s"],
            "error": None if run["seconds_to_target"] else
            info["error"] or sbs.error_of(run, "sol train pretrain") or "sol: the target was not reached"}


# bench.py runs on CUDA only (it calls torch.cuda.synchronize) and fixes the 124M shape in its code; the
# dry run starts it through this prelude, which makes those two fit a CPU and tiny sizes. On a GPU
# bench.py runs as it is.
TINY_BENCH_PRELUDE = """
import runpy, sys, torch, model
torch.cuda.synchronize = lambda *a, **k: None
_config = model.GPTConfig
model.GPTConfig = lambda **kw: _config(**{**kw, "n_layer": %d, "n_head": %d, "n_embd": %d})
runpy.run_path("bench.py", run_name="__main__")
"""


def gpt2_nanogpt(device: str, tiny: bool, timeout: float) -> dict:
    shape = TINY_GPT2 if tiny else GPT2
    work = sbs.nanogpt_workdir()
    argv = ["--real_data=False", f"--device={device}", f"--batch_size={shape['batch']}",
            f"--block_size={shape['context']}"]
    prefix = None
    if tiny:
        argv.append("--compile=False")
        prefix = ["-c", TINY_BENCH_PRELUDE % (shape["layers"], shape["heads"], shape["d_model"])]
    ms = []

    def on_line(t, line):
        e = sbs.parse_line(line)
        if e is not None and e["kind"] == "bench":
            ms.append(e["ms"])
        return False

    try:
        run = sbs.launch([sys.executable, *(prefix or ["bench.py"]), *argv], work, timeout, on_line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tok_s = shape["batch"] * shape["context"] / (ms[0] / 1000) if ms else None
    params = nanogpt_params(shape["layers"], shape["d_model"])
    return {"tok_s": tok_s, "ms_per_step": ms[0] if ms else None, "parameters": params, "vocab": 50304,
            "mfu": mfu(params, shape["layers"], shape["d_model"], shape["context"], tok_s),
            "error": None if ms else sbs.error_of(run, "nanoGPT bench.py") or "nanoGPT bench.py printed no timing"}


def gpt2_sol(device: str, tiny: bool, timeout: float, steps: int) -> dict:
    shape = TINY_GPT2 if tiny else GPT2
    out = Path(tempfile.mkdtemp(prefix="sol-gpu-bench-")) / "run"
    argv = ["--corpus", str(sbs.data_file("shakespeare_complete.txt")), "--out", str(out),
            "--tokenizer", "char" if tiny else "bpe:32768", "--layers", str(shape["layers"]),
            "--heads", str(shape["heads"]), "--d-model", str(shape["d_model"]), "--context", str(shape["context"]),
            "--batch-size", str(shape["batch"]), "--no-bias", "--device", device, "--lr", "6e-4",
            "--warmup", "10", "--max-steps", str(steps + 20), "--eval-every", "0", "--sample-every", "0",
            "--checkpoint-every", "0", *([] if tiny else ["--compile"])]
    events: list[dict] = []
    try:   # ended at step `steps`: the final checkpoint is not what is measured
        run = sbs.launch([sys.executable, "-m", "sol.core.cli", "train", "pretrain", *argv, "--events", "-"],
                         sbs.REPO, timeout, _sol_steps_until(steps, events))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    start = next((e for e in events if e.get("type") == "start"), None)
    tok_s = steady_tokens_per_s([e for e in events if e.get("type") == "step"], shape["batch"] * shape["context"])
    result = {"tok_s": tok_s, "parameters": None, "vocab": None, "mfu": None,
              "startup_s": start["t"] if start else None}
    if start:
        m = start.get("config", {}).get("model", {})
        positions = m.get("context", shape["context"]) * m.get("d_model", shape["d_model"]) \
            if m.get("positions", "learned") == "learned" else 0
        result.update(parameters=start["parameters"] - positions, vocab=m.get("vocab_size"),
                      mfu=mfu(start["parameters"] - positions, shape["layers"], shape["d_model"], shape["context"], tok_s))
    err = next((e["message"] for e in events if e.get("type") == "error"), None)
    result["error"] = None if tok_s else err or sbs.error_of(run, "sol train pretrain") or "sol: too few steps to time"
    return result


def _sol_steps_until(steps: int, events: list):
    def on_line(t, line):
        e = sbs.sol_event(t, line, events)
        return e is not None and e.get("type") == "step" and e.get("step", 0) >= steps
    return on_line


def steady_tokens_per_s(steps: list[dict], tokens_per_step: int, skip: float = 0.4) -> float | None:
    """Tokens/s between the step events after the first `skip` of them (compilation and warm-up) and
    the last one, by the times they were printed. Steps whose numbers are read from the GPU every few
    steps (--log-every) arrive in bursts: only the last event of a burst marks when its step ended."""
    if len(steps) < 3:
        return None
    ends = [e for i, e in enumerate(steps) if i + 1 == len(steps) or steps[i + 1]["t"] - e["t"] > 0.001]
    first = steps[int(len(steps) * skip)]["step"]
    ends = [e for e in ends if e["step"] >= first]
    if len(ends) < 2:
        return None
    a, b = ends[0], ends[-1]
    if b["t"] <= a["t"] or b["step"] <= a["step"]:
        return None
    return (b["step"] - a["step"]) * tokens_per_step / (b["t"] - a["t"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, no compilation: the dry run")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--only", choices=["char", "gpt2_124m"], default=None)
    ap.add_argument("--timeout", type=float, default=150, help="seconds each char run may take")
    ap.add_argument("--timeout-gpt2", type=float, default=200, help="seconds each 124M run may take "
                    "(compiling 124M and training Sol's BPE come first)")
    ap.add_argument("--steps", type=int, default=100, help="Sol's 124M steps to time (the first 40 %% left out)")
    a = ap.parse_args(argv)
    for f in ("tinyshakespeare.txt", "shakespeare_complete.txt"):
        if not sbs.data_file(f).is_file():
            sys.exit(f"error: {sbs.data_file(f)} not found: copy ../shared/data into shared/data")
    sbs.sol_env()
    details = {"load_average": sbs.load_average(), "device": a.device, "tiny": a.tiny}
    steps = 12 if a.tiny else a.steps
    if a.only != "gpt2_124m":
        details["char_nanogpt"] = char_nanogpt(a.device, a.tiny, a.timeout)
        report("char nanoGPT", details["char_nanogpt"])
        details["char_sol"] = char_sol(a.device, a.tiny, a.timeout)
        report("char Sol", details["char_sol"])
    if a.only != "char":
        details["gpt2_nanogpt"] = gpt2_nanogpt(a.device, a.tiny, a.timeout_gpt2)
        report("124M nanoGPT", details["gpt2_nanogpt"])
        details["gpt2_sol"] = gpt2_sol(a.device, a.tiny, a.timeout_gpt2, steps)
        report("124M Sol", details["gpt2_sol"])
    get = lambda run, key: details.get(run, {}).get(key)  # noqa: E731
    n_s, s_s = get("char_nanogpt", "seconds"), get("char_sol", "seconds")
    result = {"char": {"nanogpt_s": n_s, "sol_s": s_s, "ratio": s_s / n_s if n_s and s_s else None},
              "gpt2_124m": {"nanogpt_tok_s": get("gpt2_nanogpt", "tok_s"), "sol_tok_s": get("gpt2_sol", "tok_s"),
                            "nanogpt_mfu": get("gpt2_nanogpt", "mfu"), "sol_mfu": get("gpt2_sol", "mfu")}}
    print("details " + json.dumps(details))
    if a.json:
        print(json.dumps(result))
    else:
        print(result)
    return 0


def report(what: str, r: dict) -> None:
    figures = {k: v for k, v in r.items() if k not in ("evals", "error") and v is not None}
    print(f"{what}: {figures}" + (f"\nerror: {r['error']}" if r.get("error") else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
