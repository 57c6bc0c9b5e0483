"""`sol data synth {sft,prefs,rl}`: synthetic calculator data for the SFT, reward and RL stages."""
from __future__ import annotations

import sys


def register(sub) -> None:
    from ..data.synthetic import KINDS
    p = sub.add_parser("data", help="make training data")
    kinds = p.add_subparsers(dest="data_command", metavar="COMMAND")
    s = kinds.add_parser("synth", help="synthetic arithmetic conversations that use the calculator tool")
    s.add_argument("kind", choices=KINDS, help="sft: chat JSONL; prefs: preference pairs; rl: prompts + answers")
    s.add_argument("--n", type=int, default=1000, help="how many records")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="JSONL file to write")
    s.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    from ..data.synthetic import write
    from ..errors import SolError
    if args.n < 1:
        raise SolError(f"--n {args.n}: must be at least 1")
    path = write(args.kind, args.n, args.seed, args.out)
    sys.stderr.write(f"wrote {args.n} {args.kind} records to {path}\n")
    return 0
