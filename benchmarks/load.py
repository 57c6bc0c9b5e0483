"""Load time and memory: Sol's `load_model` against transformers' `from_pretrained`, same folder.

A Hugging Face folder of the Qwen2.5-0.5B shape (24 layers, d_model 896, GQA 14/2, vocab 151,936, tied
embeddings) with random weights, written by transformers in float32 and in bfloat16 (cached outside the
repository, in ~/.cache/sol-bench). Each load runs in its own child process with torch already imported,
so the figures are the load's own: seconds from the call to a model ready to run, then 8 greedy tokens
(prompt of 4), and peak RSS over the process's RSS right after `import torch` (torch itself is ~220 MB that any engine
in Python carries). Runs alternate between the two loaders; medians over `--reps`.

    python benchmarks/load.py [--reps 3] [--dtypes float32 bfloat16] [--gguf q8_0 ...] [--json]

`--gguf TYPE`: also the same weights as a GGUF file of that type (written by `sol models export`, so
f32, f16 or q8_0; Q8_0 loads int8), Sol's side only (llama.cpp's is issue 26's benchmarks/llamacpp.py).

With --json the last line is {DTYPE: {"sol_load_s", "hf_load_s", "sol_rss_over_torch_mb",
"hf_rss_over_torch_mb", "weights_mb", "sol_8_tokens_s", "hf_8_tokens_s"}}.
Peak RSS is read after the 8 tokens on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("SOL_BENCH_CACHE", Path.home() / ".cache" / "sol-bench"))
SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
             rope_theta=1000000.0, rms_norm_eps=1e-6)
THREADS = 2

CHILD = r'''
import json, resource, sys, time
import torch
torch.set_num_threads(%(threads)d)
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
base = rss_mb()
side, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if side == "sol":
    from sol.core.formats.checkpoint import load_model
    lm = load_model(path, quantize="auto")   # what `sol` does with --dtype auto: a Q8_0 file stays int8
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.no_grad():   # 8 greedy tokens from the KV cache: the model is really usable
        ids = torch.tensor([[1, 2, 3, 4]])
        cache = lm.model.new_cache(1, 64)
        logits = lm.model(ids, cache, last_only=True)
        for _ in range(8):
            nxt = logits[0, -1].argmax().view(1, 1)
            logits = lm.model(nxt, cache, last_only=True)
    gen_s = time.perf_counter() - t1
else:
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()   # the same 8 greedy tokens: until a model runs, its weights may be unread
    with torch.no_grad():
        m.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    gen_s = time.perf_counter() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": load_s, "rss_over_torch_mb": peak - base, "gen_s": gen_s}))
'''


def write_model(dtype: str) -> Path:
    out = CACHE / f"qwen2.5-0.5b-shape-{dtype}"
    if (out / "config.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, torch_dtype=dtype)).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # A byte-level tokenizer well inside the vocabulary: the weights are what this benchmark loads.
    tok = Tokenizer(models.BPE(vocab={chr(i): i for i in range(33, 127)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(out / "tokenizer.json"))
    return out


def write_gguf(kind: str) -> Path:
    out = CACHE / f"qwen2.5-0.5b-shape-{kind}.gguf"
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "sol.core.cli", "models", "export", str(write_model("float32")),
                        "--format", "gguf", "--out", str(out), "--type", kind], check=True, timeout=900)
    return out


def run(side: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD % {"threads": THREADS}, side, str(path)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--gguf", nargs="*", default=[], metavar="TYPE", help="f32 | f16 | q8_0 (Sol's side only)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = {}
    for dtype in args.dtypes:
        path = write_model(dtype)
        weights_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        runs = {"sol": [], "hf": []}
        for r in range(args.reps):
            for side in (("sol", "hf") if r % 2 == 0 else ("hf", "sol")):
                runs[side].append(run(side, path))
        med = {side: {k: statistics.median(x[k] for x in rs) for k in ("load_s", "rss_over_torch_mb")}
               for side, rs in runs.items()}
        results[dtype] = {"sol_load_s": round(med["sol"]["load_s"], 2), "hf_load_s": round(med["hf"]["load_s"], 2),
                          "sol_rss_over_torch_mb": round(med["sol"]["rss_over_torch_mb"]),
                          "hf_rss_over_torch_mb": round(med["hf"]["rss_over_torch_mb"]),
                          "weights_mb": round(weights_mb),
                          "sol_8_tokens_s": round(statistics.median(x["gen_s"] for x in runs["sol"]), 2),
                          "hf_8_tokens_s": round(statistics.median(x["gen_s"] for x in runs["hf"]), 2)}
        print(dtype, results[dtype], flush=True)
    for kind in args.gguf:
        path = write_gguf(kind)
        rs = [run("sol", path) for _ in range(args.reps)]
        results[f"gguf_{kind}"] = {"sol_load_s": round(statistics.median(x["load_s"] for x in rs), 2),
                                   "sol_rss_over_torch_mb": round(statistics.median(x["rss_over_torch_mb"] for x in rs)),
                                   "file_mb": round(path.stat().st_size / 2**20),
                                   "sol_8_tokens_s": round(statistics.median(x["gen_s"] for x in rs), 2)}
        print(f"gguf {kind}", results[f"gguf_{kind}"], flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
