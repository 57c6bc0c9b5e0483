"""Time to first token after a pause, and the time per token after it, in the one-sequence engine that `sol chat`
and the GUI use, for the shipped starter and words models: small work on one CPU thread
(core/generation/threads.py) against every thread (SMALL_WORK = 0, as before it), in the same run, taking turns.

A person reads the answer and types before the next turn, so each answer here begins after --pause seconds
idle: OpenMP's extra thread has gone to sleep by then, and the first parallel product waits for it.

    python benchmarks/first_token.py [--json] [--pause 0.3] [--reps 15]

The last line with --json is
{"starter": {"prompt_tokens", "one_thread": {"first_token_ms", "per_token_ms"}, "all_threads": {...},
             "first_token_ratio", "per_token_ratio"}, "words": {...}}
(ratios: one thread over all threads; below 1 is faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def answer(engine, ids, params) -> tuple[float, float]:
    """(seconds to the first token, seconds per token after it) for one greedy answer."""
    t0 = time.perf_counter()
    events = engine.generate(engine.session(ids), params)
    next(events)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = sum(1 for _ in events) - 1   # the DoneEvent is not a token
    return first, (time.perf_counter() - t1) / max(n, 1)


def bench(name: str, pause: float, reps: int, log) -> dict:
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation import threads
    from sol.core.generation.engine import Engine, GenerationParams
    from sol.core.generation.sampling import SamplingParams
    lm = load_model(ROOT / "resources" / "models" / name, device=torch.device("cpu"))
    engine = Engine(lm.model, lm.tokenizer)
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "what is 12 times 7?"}])
    ids = lm.tokenizer.encode_ids(prompt, add_special_tokens=False)
    params = GenerationParams(max_tokens=16, sampling=SamplingParams(temperature=0), explain=False)
    settings = {"one_thread": threads.SMALL_WORK, "all_threads": 0}
    runs = {label: [] for label in settings}
    try:
        answer(engine, ids, params)   # one-time costs
        for _ in range(reps):
            for label, small in settings.items():
                threads.SMALL_WORK = small
                time.sleep(pause)   # the person reads and types
                runs[label].append(answer(engine, ids, params))
    finally:
        threads.SMALL_WORK = settings["one_thread"]
    out = {"prompt_tokens": len(ids)}
    for label, r in runs.items():
        out[label] = {"first_token_ms": round(statistics.median(f for f, _ in r) * 1e3, 2),
                      "per_token_ms": round(statistics.median(p for _, p in r) * 1e3, 3)}
    for key in ("first_token", "per_token"):
        out[f"{key}_ratio"] = round(out["one_thread"][f"{key}_ms"] / out["all_threads"][f"{key}_ms"], 3)
    log(f"{name} ({len(ids)} prompt tokens, {pause} s pause): first token {out['one_thread']['first_token_ms']} ms "
        f"on one thread, {out['all_threads']['first_token_ms']} ms on all (ratio {out['first_token_ratio']}); "
        f"then {out['one_thread']['per_token_ms']} against {out['all_threads']['per_token_ms']} ms a token")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds idle before each answer")
    ap.add_argument("--reps", type=int, default=15, help="answers per setting and model")
    args = ap.parse_args()
    log = (lambda s: None) if args.json else print
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = {name: bench(name, args.pause, args.reps, log) for name in ("starter", "words")}
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
