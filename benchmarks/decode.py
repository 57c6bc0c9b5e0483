"""Decode speed: Sol against Hugging Face transformers' `generate`, on the CPU or a GPU.

Batch 1, greedy, a 32-token prompt, 128 new tokens, the same random weights
on both sides (a GPT-2 model written with `save_pretrained` and loaded by
Sol from that directory). transformers runs in float32, its default; Sol runs
in float32, with float16 weights, and with int8 weights (`--quantize int8`: Sol's own AVX2 kernel where this
machine can build it, core/kernels/int8_kernel.py, else fbgemm, core/model/quant.py; where the kernel runs, fbgemm's int8
is timed beside it as sol_int8_fbgemm). Tokens per second count the whole call,
prefill included, on both sides. The runs alternate within one process so a
busy machine slows both alike; we report the median.

    python benchmarks/decode.py [--reps 5] [--only small|gpt2_124m] [--json]

The last line with --json is
{"small": {"hf_tok_s", "sol_fp32_tok_s", "sol_fp16_tok_s", "sol_int8_tok_s", "fp32_ratio", "fp16_ratio",
 "int8_ratio", "int8_vs_fp16", "int8_top1_agreement", "int8_top1_agreement_trained", "int8_path",
 "sol_int8_fbgemm_tok_s", "int8_fbgemm_vs_fp16", "int8_codes", ...}, "gpt2_124m": {...}}
int8_path: what ran the int8 column's layers ("sol kernel (AVX2)" or fbgemm); int8_codes: fbgemm's activation
codes on this CPU (8-bit in 2 rows with VNNI, 7-bit in 3 without).
int8_top1_agreement: the share of positions of held-out text (../shared/data's tinyshakespeare, its last
4096 tokens) where int8's next token equals float32's, on the benchmark's RANDOM weights (nearly flat
logits: near-ties everywhere, so this says little). int8_top1_agreement_trained: the same on the shipped
TRAINED words model (BPE 4096, 2.6M parameters) with every layer through the packed path the 124M shape
uses (fbgemm's narrow layers would otherwise be dequantized exactly). int8_top1_agreement_trained_decode: the same
model and text decoded one token at a time from the KV cache, as generation runs (one scale per step's
activations rather than one for a whole 128-token prompt).

With --device cuda (see gpu_mode below) both sides run every dtype on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "small": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=1024),
    "gpt2_124m": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}
PROMPT_LEN = 32
NEW_TOKENS = 128
THREADS = 2


def write_hf_model(out: Path, shape: dict, seed: int = 0):
    """A random GPT-2 in Hugging Face's layout, with a small byte-level BPE tokenizer.json beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sol.core.formats.tokenizer import train_bpe
    torch.manual_seed(seed)
    # No eos: both sides must produce exactly NEW_TOKENS tokens.
    cfg = GPT2Config(**shape, bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(out, safe_serialization=True)
    corpus = out / "corpus.txt"
    corpus.write_text("a small corpus for a byte-level BPE vocabulary, nothing more.\n" * 20)
    tok = train_bpe([corpus], 300)
    # Every row a token, as in GPT-2's own vocabulary: a model wider than its tokenizer gets -inf logits
    # past the last id (Transformer.vocab_limit), which transformers would not give.
    from tokenizers import AddedToken
    tok.hf.add_tokens([AddedToken(f"<unused{i}>", special=False, normalized=False)
                       for i in range(shape["vocab_size"] - tok.id_limit)])
    tok.save(out / "tokenizer.json")
    return hf


def hf_generate(hf, prompt: torch.Tensor, n: int = NEW_TOKENS) -> list[int]:
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def sol_generate(engine, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    from sol.core.generation.engine import DoneEvent, GenerationParams
    from sol.core.generation.sampling import SamplingParams
    params = GenerationParams(max_tokens=n, sampling=SamplingParams(temperature=0), explain=False)
    session = engine.session(prompt)   # prefill, counted in the time like HF's
    for ev in engine.generate(session, params):
        if isinstance(ev, DoneEvent):
            return ev.token_ids
    raise RuntimeError("generate ended without a DoneEvent")


def timed(fn) -> tuple[float, list[int]]:
    t = time.perf_counter()
    ids = fn()
    return time.perf_counter() - t, ids


def max_logit_diff(hf, sol_model, prompt: torch.Tensor) -> float:
    with torch.inference_mode():
        a = hf(prompt).logits
        b = sol_model(prompt)
    return float((a - b).abs().max())


def held_out_ids(tokenizer, n_tokens: int, row: int) -> list[int]:
    """The last n_tokens of tinyshakespeare (../shared/data), cut to whole rows of `row` tokens."""
    text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt").read_text()
    ids = tokenizer.encode_ids(text[-40000:], add_special_tokens=False)[-n_tokens:]
    return ids[:len(ids) // row * row]


def top1_agreement(lm32, lm8, n_tokens: int = 4096, row: int = 512) -> float:
    """Share of held-out text's positions where the int8 model's top-1 next token is float32's."""
    ids = held_out_ids(lm32.tokenizer, n_tokens, row)
    rows = torch.tensor(ids).view(-1, row)
    with torch.inference_mode():
        a, b = lm32.model(rows).argmax(-1), lm8.model(rows).argmax(-1)
    return round(float((a == b).float().mean()), 4)


def _trained_pair():
    """The shipped trained words model in float32 and in int8, every int8 layer packed (the int8 column's
    path)."""
    from sol.core.formats.checkpoint import load_model
    from sol.core.formats.registry import builtin_models_dir
    from sol.core.model.quant import Int8Linear
    lm32 = load_model(builtin_models_dir() / "words")
    lm8 = load_model(builtin_models_dir() / "words", quantize="int8")
    for m in lm8.model.modules():
        if type(m) is Int8Linear:
            m.pack(force=True)
    return lm32, lm8


def trained_top1_agreement(n_tokens: int = 5120) -> float:
    """top1_agreement on the shipped trained words model, every int8 layer packed."""
    lm32, lm8 = _trained_pair()
    return top1_agreement(lm32, lm8, n_tokens, lm32.config.context)


def trained_top1_agreement_decode(n_tokens: int = 4096) -> float:
    """The same, the way generation computes it: int8 decodes held-out text one token at a time from its
    KV cache (each step's activations quantized on their own), against float32's next tokens."""
    lm32, lm8 = _trained_pair()
    row, m, same = lm32.config.context, lm8.model, 0
    ids = held_out_ids(lm32.tokenizer, n_tokens, row)
    with torch.inference_mode():
        for r in range(0, len(ids), row):
            chunk = torch.tensor([ids[r:r + row]])
            want = lm32.model(chunk).argmax(-1)[0].tolist()
            cache = m.new_cache(1, row)
            for p in range(row):
                h = m.decode(chunk[:, p:p + 1], torch.tensor([p]), cache, p)
                same += int(m.logits(h)[0, 0].argmax()) == want[p]
    return round(same / len(ids), 4)


def int8_path() -> str:
    """What runs the int8 column's layers on this machine."""
    from sol.core.kernels import int8_kernel
    return "sol kernel (AVX2)" if int8_kernel.available() else f"fbgemm ({int8_kernel.why_not()})"


def int8_codes() -> str:
    """Which activation codes fbgemm's int8 products used on this CPU (core/model/quant.py fbgemm_codes)."""
    from sol.core.model.quant import _fbgemm, fbgemm_codes
    if not _fbgemm():
        return "no fbgemm (aten._weight_int8pack_mm)"
    c = fbgemm_codes()
    return f"{'8' if c.top == 127 else '7'}-bit codes, {c.rows} rows"


def bench_shape(name: str, reps: int, log) -> dict:
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.engine import Engine
    from sol.core.kernels import int8_kernel
    shape = SHAPES[name]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        hf = write_hf_model(d, shape)
        lm32 = load_model(d, dtype=torch.float32)
        lm16 = load_model(d, dtype=torch.float16)
        lm8 = load_model(d, quantize="int8")
        lm8f = None
        if int8_kernel.available():   # fbgemm's int8 beside the kernel's, in the same run
            int8_kernel.set_enabled(False)
            try:
                lm8f = load_model(d, quantize="int8")
            finally:
                int8_kernel.set_enabled(True)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape["vocab_size"], (1, PROMPT_LEN), generator=g)
    ids = prompt[0].tolist()
    runs = {
        "hf": lambda: hf_generate(hf, prompt),
        "sol_fp32": lambda: sol_generate(Engine(lm32.model, lm32.tokenizer), ids),
        "sol_fp16": lambda: sol_generate(Engine(lm16.model, lm16.tokenizer), ids),
        "sol_int8": lambda: sol_generate(Engine(lm8.model, lm8.tokenizer), ids),
    }
    if lm8f is not None:
        runs["sol_int8_fbgemm"] = lambda: sol_generate(Engine(lm8f.model, lm8f.tokenizer), ids)
    tokens = {k: f() for k, f in runs.items()}   # warm-up, and the tokens to compare
    for k, f in runs.items():
        f()
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(reps):
        for k in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            t, _ = timed(runs[k])
            times[k].append(t)
    tok_s = {k: NEW_TOKENS / statistics.median(v) for k, v in times.items()}
    same16 = sum(a == b for a, b in zip(tokens["sol_fp16"], tokens["sol_fp32"]))
    first_diff16 = next((i for i, (a, b) in enumerate(zip(tokens["sol_fp16"], tokens["sol_fp32"])) if a != b), None)
    res = {
        "hf_tok_s": round(tok_s["hf"], 1),
        "sol_fp32_tok_s": round(tok_s["sol_fp32"], 1),
        "sol_fp16_tok_s": round(tok_s["sol_fp16"], 1),
        "fp32_ratio": round(tok_s["sol_fp32"] / tok_s["hf"], 2),
        "fp16_ratio": round(tok_s["sol_fp16"] / tok_s["hf"], 2),
        "sol_int8_tok_s": round(tok_s["sol_int8"], 1),
        "int8_ratio": round(tok_s["sol_int8"] / tok_s["hf"], 2),
        "int8_vs_fp16": round(tok_s["sol_int8"] / tok_s["sol_fp16"], 2),
        "int8_top1_agreement": top1_agreement(lm32, lm8),
        "int8_top1_agreement_trained": trained_top1_agreement(),
        "int8_top1_agreement_trained_decode": trained_top1_agreement_decode(),
        "int8_path": int8_path(),
        "int8_codes": int8_codes(),
        "greedy_match": tokens["sol_fp32"] == tokens["hf"],
        "fp16_greedy_same_tokens": f"{same16}/{NEW_TOKENS}",
        "fp16_first_divergence": first_diff16,
        "max_logit_diff_fp32": float(f"{max_logit_diff(hf, lm32.model, prompt):.2e}"),
        "reps": reps,
    }
    if lm8f is not None:
        res["sol_int8_fbgemm_tok_s"] = round(tok_s["sol_int8_fbgemm"], 1)
        res["int8_fbgemm_vs_fp16"] = round(tok_s["sol_int8_fbgemm"] / tok_s["sol_fp16"], 2)
    log(f"{name}: " + ", ".join(f"{k}={v}" for k, v in res.items()))
    log(f"  seconds per run: " + ", ".join(f"{k}=" + "/".join(f"{t:.2f}" for t in v) for k, v in times.items()))
    return res


# ---- GPU mode -------------------------------------------------------------------------------------
# Batch 1, greedy, 256 new tokens, the GPT-2 shape 6L/384/vocab 8192 of the table ("issue_small")
# and the 124M shape, each in float32, bfloat16 and float16, Sol and transformers on the same weights
# on the same GPU. Keys per shape: sol_<dt>_tok_s, hf_<dt>_tok_s, <dt>_ratio for dt in fp32/bf16/fp16,
# and best_hf_tok_s / ratio_vs_best_hf (Sol's bf16 against transformers' fastest dtype).
GPU_SHAPES = {"small": SHAPES["small"], "gpt2_124m": SHAPES["gpt2_124m"]}
GPU_NEW_TOKENS = 256
GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync_timed(fn, device) -> tuple[float, list[int]]:
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda d: None)
    sync(device)
    t = time.perf_counter()
    ids = fn()
    sync(device)
    return time.perf_counter() - t, ids


def bench_shape_gpu(name: str, reps: int, device: str, new_tokens: int, log) -> dict:
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.engine import Engine
    shape = GPU_SHAPES[name]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        hf32 = write_hf_model(d, shape)
        prompt = torch.randint(0, shape["vocab_size"], (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
        ids = prompt[0].tolist()
        for key, dt in GPU_DTYPES.items():
            hf = hf32.to(device=device, dtype=dt)
            lm = load_model(d, device=device, dtype=dt)
            engine = Engine(lm.model, lm.tokenizer)
            p = prompt.to(device)
            runs = {"hf": lambda: hf_generate(hf, p, new_tokens), "sol": lambda: sol_generate(engine, ids, new_tokens)}
            tokens = {k: f() for k, f in runs.items()}   # warm-up (and CUDA graph capture)
            times = {k: [] for k in runs}
            for r in range(reps):
                for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    times[k].append(sync_timed(runs[k], device)[0])
            for k in runs:
                res[f"{k}_{key}_tok_s"] = round(new_tokens / statistics.median(times[k]), 1)
            res[f"{key}_ratio"] = round(res[f"sol_{key}_tok_s"] / res[f"hf_{key}_tok_s"], 2)
            res[f"{key}_greedy_match"] = tokens["sol"] == tokens["hf"]
            log(f"{name} {key}: sol {res[f'sol_{key}_tok_s']} tok/s, transformers {res[f'hf_{key}_tok_s']} tok/s, "
                f"ratio {res[f'{key}_ratio']}, same greedy tokens: {res[f'{key}_greedy_match']}")
            del hf, lm, engine
            torch.cuda.empty_cache()
            hf32 = hf32.float()
    res["best_hf_tok_s"] = max(res[f"hf_{k}_tok_s"] for k in GPU_DTYPES)
    res["ratio_vs_best_hf"] = round(res["sol_bf16_tok_s"] / res["best_hf_tok_s"], 2)
    res["new_tokens"] = new_tokens
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", choices=list(SHAPES), action="append")
    p.add_argument("--device", default="cpu", help="cpu (the CPU comparison above) or cuda")
    p.add_argument("--new-tokens", type=int, default=GPU_NEW_TOKENS, help="GPU mode: tokens per run")
    p.add_argument("--all-dtypes", action="store_true",
                   help="the GPU mode's table (every dtype on both sides) on this device; implied by cuda")
    p.add_argument("--json", action="store_true", help="last line: the results as one JSON object")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)   # both sides, the same

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.device != "cpu" or args.all_dtypes:
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
        log(f"torch {torch.__version__}, {where}")
        results = {name: bench_shape_gpu(name, args.reps, args.device, args.new_tokens, log)
                   for name in (args.only or GPU_SHAPES)}
        if args.json:
            print(json.dumps(results))
        return 0

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    log(f"torch {torch.__version__}, {THREADS} threads, load average {os.getloadavg()[0]:.2f} "
        f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    results = {name: bench_shape(name, args.reps, log) for name in (args.only or SHAPES)}
    log(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
