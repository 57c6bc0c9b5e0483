"""LoRA fine-tuning: Sol against transformers + peft on the same model shape, batch and adapter.

The model is Qwen2.5-0.5B's shape with random weights (benchmarks/load.py writes the folder, float32), the
batch 4 sequences x 256 tokens, the adapter rank 16, alpha 32, dropout 0.05 on q, k, v, o, gate, up and down.
Each side runs in its own child process with 2 threads, one after the other (nothing else may run beside a
timing):
- peft: the loop its documentation shows -- AutoModelForCausalLM.from_pretrained (float32),
  get_peft_model(LoraConfig(...)), torch.optim.AdamW over the trainable parameters, then per step
  `model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()`;
- Sol: the product's own path, `sol train pretrain --model DIR --lora ... --context 256 --batch-size 4` on
  a slice of ../shared/data/tinyshakespeare.txt (its float32 base), and again with `--quantize int8`.
  Sol's `--precision auto` takes bf16 matrix products on a CPU with native bf16 (AVX512-BF16, AMX), float32
  elsewhere; so that a ratio compares like with like there, `peft_bf16` runs peft's loop under
  torch.autocast("cpu", torch.bfloat16) and `sol_fp32` runs Sol with `--precision fp32`.
Tokens/s is the median over the steps after the first (which pays for warm-up); peak memory is the child's
peak RSS (VmHWM), torch's own ~200 MB included on both sides. Goals on the 2-core machine: Sol's tokens/s
>= 1.5x peft's, Sol's float32 peak <= 0.6x peft's, Sol's int8 peak <= 2 GB.

    python benchmarks/lora.py [--steps 4] [--json] [--only peft|sol|sol_int8|peft_bf16|sol_fp32 ...] [--shape small]

`--shape small` runs a 4-layer model of the same widths (a quick check of the script). With --json the last
line is {"peft": {"tokens_per_s", "peak_rss_mb", "step_s": [...]}, "sol": {...}, "sol_int8": {...},
"ratios": {"tokens_per_s", "peak_rss", "int8_peak_gb"}, "shape", "cpu"}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
THREADS, BATCH, SEQ, RANK, ALPHA, DROPOUT = 2, 4, 256, 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_CHILD = r'''
import json, sys, time
import torch
torch.set_num_threads(%(threads)d)
import peft, transformers
folder, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
model = peft.get_peft_model(model, peft.LoraConfig(r=%(rank)d, lora_alpha=%(alpha)d, lora_dropout=%(dropout)s,
                                                  target_modules=%(targets)r, task_type="CAUSAL_LM"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
g = torch.Generator().manual_seed(0)
times = []
for step in range(steps):
    x = torch.randint(33, 127, (%(batch)d, %(seq)d), generator=g)
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=%(bf16)s):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
    print(json.dumps({"step": step + 1, "loss": float(loss), "s": times[-1]}), file=sys.stderr, flush=True)
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024
print(json.dumps({"step_s": times, "peak_rss_mb": peak}))
'''

SOL_CHILD = r'''
import json, sys, time
from sol.core.cli import main
events = sys.argv[1]
rc = main(sys.argv[2:])
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024
steps = [json.loads(l) for l in open(events) if '"type": "step"' in l]
start = next((json.loads(l) for l in open(events) if '"type": "start"' in l), {})
print(json.dumps({"rc": rc, "tokens_per_s": [s["tokens_per_s"] for s in steps], "peak_rss_mb": peak,
                  "precision": start.get("precision")}))
'''


def folder(shape: str) -> Path:
    import load   # benchmarks/load.py: the Qwen2.5-0.5B-shaped folder and its byte-level tokenizer
    return load.write_model("float32") if shape == "full" else _write_small(dict(load.SHAPE, num_hidden_layers=4))


def _write_small(cfg: dict) -> Path:
    import load
    out = load.CACHE / "qwen2.5-0.5b-shape-4-layers-float32"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).float()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    full = load.write_model("float32")
    (out / "tokenizer.json").write_bytes((full / "tokenizer.json").read_bytes())
    return out


def run_peft(model: Path, steps: int, bf16: bool = False) -> dict:
    code = PEFT_CHILD % {"threads": THREADS, "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT,
                         "targets": TARGETS, "batch": BATCH, "seq": SEQ, "bf16": bf16}
    r = subprocess.run([sys.executable, "-c", code, str(model), str(steps)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peft child exited {r.returncode}:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    tail = out["step_s"][1:] or out["step_s"]
    return {"tokens_per_s": BATCH * SEQ / statistics.median(tail), "peak_rss_mb": out["peak_rss_mb"],
            "step_s": out["step_s"]}


def run_sol(model: Path, steps: int, int8: bool, precision: str = "auto") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        text = DATA.read_text(encoding="utf-8") if DATA.is_file() else "To be, or not to be. " * 20000
        corpus.write_text(text[:200_000], encoding="utf-8")
        events = Path(tmp) / "events.jsonl"
        argv = ["train", "pretrain", "--model", str(model), "--corpus", str(corpus), "--out", str(Path(tmp) / "out"),
                "--lora", "--lora-r", str(RANK), "--lora-alpha", str(ALPHA), "--lora-dropout", str(DROPOUT),
                "--lora-targets", ",".join(TARGETS), "--context", str(SEQ), "--batch-size", str(BATCH),
                "--max-steps", str(steps), "--lr", "2e-4", "--warmup", "0", "--eval-every", "0",
                "--sample-every", "0", "--checkpoint-every", "0", "--threads", str(THREADS),
                "--events", str(events), "--precision", precision, *(["--quantize", "int8"] if int8 else [])]
        env = {**os.environ, "SOL_HOME": tmp}
        r = subprocess.run([sys.executable, "-c", SOL_CHILD, str(events), *argv], capture_output=True, text=True,
                           env=env)
        if r.returncode != 0:
            raise RuntimeError(f"Sol child exited {r.returncode}:\n{r.stderr[-3000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        if out["rc"] != 0:
            raise RuntimeError(f"sol train failed:\n{r.stderr[-3000:]}")
    rates = out["tokens_per_s"][1:] or out["tokens_per_s"]
    return {"tokens_per_s": statistics.median(rates), "peak_rss_mb": out["peak_rss_mb"],
            "step_tokens_per_s": out["tokens_per_s"], "precision": out.get("precision")}


def cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps a side (the first is not counted)")
    p.add_argument("--shape", choices=["full", "small"], default="full")
    p.add_argument("--only", nargs="+", choices=["peft", "sol", "sol_int8", "peft_bf16", "sol_fp32"],
                   default=["peft", "sol", "sol_int8", "peft_bf16", "sol_fp32"])
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    model = folder(a.shape)
    print(f"model {model}; {cpu()}; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    res: dict = {"shape": a.shape, "cpu": cpu(), "batch": BATCH, "seq": SEQ, "rank": RANK, "targets": TARGETS}
    for side in a.only:
        try:
            res[side] = (run_peft(model, a.steps, side == "peft_bf16") if side.startswith("peft") else
                         run_sol(model, a.steps, side == "sol_int8", "fp32" if side == "sol_fp32" else "auto"))
        except Exception as e:   # a failed side gets nulls and its error, the others still run
            print(f"{side}: {e}", file=sys.stderr)
            res[side] = {"tokens_per_s": None, "peak_rss_mb": None, "error": str(e)[-500:]}
        print(f"{side}: {res[side]}", file=sys.stderr)
    peft, sol, q8, peft16, sol32 = (res.get(k) or {} for k in ("peft", "sol", "sol_int8", "peft_bf16", "sol_fp32"))
    ratio = (lambda a_, b_: round(a_ / b_, 3) if a_ and b_ else None)
    res["ratios"] = {"tokens_per_s": ratio(sol.get("tokens_per_s"), peft.get("tokens_per_s")),
                     "peak_rss": ratio(sol.get("peak_rss_mb"), peft.get("peak_rss_mb")),
                     "int8_tokens_per_s": ratio(q8.get("tokens_per_s"), peft.get("tokens_per_s")),
                     "int8_peak_gb": round(q8["peak_rss_mb"] / 1024, 3) if q8.get("peak_rss_mb") else None,
                     # like with like: both in float32, and both with bf16 products
                     "fp32_tokens_per_s": ratio(sol32.get("tokens_per_s"), peft.get("tokens_per_s")),
                     "bf16_tokens_per_s": ratio(sol.get("tokens_per_s"), peft16.get("tokens_per_s"))
                     if sol.get("precision") == "bf16" else None}
    if a.json:
        print(json.dumps(res))
    else:
        for side in a.only:
            r = res[side]
            print(f"{side:9} {r.get('tokens_per_s') or 0:8.1f} tokens/s  peak {r.get('peak_rss_mb') or 0:8.0f} MB")
        print(f"ratios {res['ratios']}")


if __name__ == "__main__":
    main()
