"""Aggregate decode speed of the batched engine with 1, 4, 8 and 16 concurrent requests.

Each request is greedy, 128 new tokens after its own 32-token prompt; all are submitted at once to a
`BatchEngine` with as many rows as requests, and the clock runs from the first submit to the last
DoneEvent (prefills included). Random GPT-2 weights of two shapes, as in decode.py. The batched
tokens are checked against each request decoded alone.

    python benchmarks/batch_decode.py [--device cpu|cuda] [--dtype auto] [--only small] [--json]

Last line with --json:
{"small": {"streams": [1, 4, 8, 16], "tok_s": [...], "scaling_8": x, ...}, "gpt2_124m": {...}}
where scaling_8 = tokens/s with 8 streams / tokens/s with 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SHAPES, THREADS, write_hf_model  # noqa: E402

STREAMS = [1, 4, 8, 16]
PROMPT_LEN = 32


def run_batch(lm, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from sol.core.generation.batch import BatchEngine
    from sol.core.generation.engine import GenerationParams
    from sol.core.generation.sampling import SamplingParams
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=len(prompts), max_len=PROMPT_LEN + new_tokens + 1)
    params = GenerationParams(max_tokens=new_tokens, sampling=SamplingParams(temperature=0), explain=False)
    sync = torch.cuda.synchronize if lm.model.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    reqs = [engine.submit(p, params) for p in prompts]
    while engine.step():
        pass
    sync()
    elapsed = time.perf_counter() - t
    return elapsed, [list(r)[-1].token_ids for r in reqs]


def bench_shape(name: str, device: str, dtype: torch.dtype, new_tokens: int, streams: list[int], log) -> dict:
    from sol.core.formats.checkpoint import load_model
    shape = SHAPES[name]
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_model(Path(tmp), shape)
        lm = load_model(tmp, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, shape["vocab_size"], (PROMPT_LEN,), generator=g).tolist() for _ in range(max(streams))]
    run_batch(lm, prompts[:2], 8)                       # warm-up (and CUDA graph capture)
    alone = {}
    tok_s = []
    for n in streams:
        run_batch(lm, prompts[:n], 4)                   # warm-up of this batch size
        elapsed, ids = run_batch(lm, prompts[:n], new_tokens)
        for i in range(n):
            if i not in alone:
                alone[i] = run_batch(lm, prompts[i:i + 1], new_tokens)[1][0]
        same = sum(ids[i] == alone[i] for i in range(n))
        tok_s.append(round(n * new_tokens / elapsed, 1))
        log(f"{name}: {n:>2} streams {tok_s[-1]:>8.1f} tok/s ({elapsed:.2f} s), same tokens as alone: {same}/{n}")
    res = {"streams": streams, "tok_s": tok_s, "new_tokens": new_tokens, "dtype": str(dtype).replace("torch.", "")}
    if 1 in streams and 8 in streams:
        res["scaling_8"] = round(tok_s[streams.index(8)] / tok_s[streams.index(1)], 2)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto (float32 on the CPU, bfloat16 on a GPU), float32, ...")
    p.add_argument("--only", choices=list(SHAPES), action="append")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--streams", type=int, nargs="+", default=STREAMS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from sol.core.devices import pick_device, pick_dtype
    torch.set_num_threads(THREADS)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    log(f"torch {torch.__version__}, {device}, {dtype}, {THREADS} threads, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {name: bench_shape(name, device, dtype, args.new_tokens, args.streams, log)
               for name in (args.only or SHAPES)}
    log(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
