"""`sol score`: each token's probability given the ones before it, and the sentence's total (§2.9)."""
from __future__ import annotations

import sys

from .common import add_model_args, load, print_json


def register(sub) -> None:
    p = sub.add_parser("score", help="score a sentence token by token (the chain rule)")
    add_model_args(p, adapter=True)
    p.add_argument("--text", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..introspect.score import score
    out = score(load(args), args.text)
    if args.json:
        print_json(out)
        return 0
    w = sys.stdout.write
    w(f"conditioned on: {out['conditioned_on']!r}\n" if out["conditioned_on"] is not None
      else "conditioned on nothing: the first token is not scored\n")
    for t in out["tokens"]:
        if t["logprob"] is None:
            w(f"{t['text']!r:<16}  (not scored)\n")
            continue
        alts = ", ".join(f"{a['text']!r}" for a in t["top"])
        w(f"{t['text']!r:<16} p={t['prob']:.4f}  log p={t['logprob']:8.3f}  rank {t['rank']:<6} top: {alts}\n")
    w(f"total log p = {out['total_logprob']:.3f} over {out['n_scored']} tokens; perplexity {out['perplexity']:.2f}\n"
      if out["n_scored"] else "no token scored\n")
    return 0
