"""`sol lens`: what each layer would predict (the logit lens)."""
from __future__ import annotations

import sys

from .common import add_model_args, load, print_json


def register(sub) -> None:
    p = sub.add_parser("lens", help="each layer's prediction for every position (logit lens)")
    add_model_args(p, adapter=True)
    p.add_argument("--text", required=True)
    p.add_argument("--top", type=int, default=1, help="candidates per layer and position (default 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..introspect.lens import lens
    out = lens(load(args), args.text, args.top)
    if args.json:
        print_json(out)
        return 0
    for pos in out["positions"]:
        cells = "  ".join(f"{e['text']!r} {e['prob']:.2f}" for e in pos["per_layer"])
        sys.stdout.write(f"{pos['token']!r:<14} {cells}\n")
    sys.stdout.write(f"columns: layers {out['layers'][0]} (embedding) .. {out['layers'][-1]} (the model's prediction)\n")
    return 0
