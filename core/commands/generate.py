"""`sol generate`: raw completion of a prompt, no chat template."""
from __future__ import annotations

import sys

from .common import add_model_args, load, print_json


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt (raw, no chat template)")
    add_model_args(p, adapter=True)
    p.add_argument("--prompt", required=True, help="text to continue")
    add_sampling_args(p)
    p.add_argument("--explain", action="store_true", help="with --json, add each token's sampling explanation")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def add_sampling_args(p) -> None:
    """The sampling flags `sol generate` takes; `sol compare` takes the same, with the same defaults."""
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from(args):
    """SamplingParams from add_sampling_args' flags, checked (a bad flag fails before any model loads)."""
    from ..errors import SolError
    from ..generation.sampling import SamplingParams
    if args.max_tokens < 1:
        raise SolError(f"--max-tokens {args.max_tokens}: must be at least 1")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)
    sampling.validate()
    return sampling


def run(args) -> int:
    from ..generation.engine import Engine, GenerationParams, stop_ids_for
    sampling = sampling_from(args)
    lm = load(args)
    engine = Engine(lm.model, lm.tokenizer)
    ids = lm.tokenizer.encode_ids(args.prompt)   # as tokenizer.json does by default, special tokens included
    session = engine.session(ids)
    params = GenerationParams(max_tokens=args.max_tokens, sampling=sampling,
                              stop_ids=stop_ids_for(lm.tokenizer, lm.config.extra), stop_strings=tuple(args.stop))
    for ev in engine.generate(session, params):
        if args.json:
            d = ev.to_dict()
            if args.explain and getattr(ev, "explanation", None) is not None:
                d["explanation"] = ev.explanation.to_dict()
            d.pop("forced", None)
            print_json(d)
        elif ev.__class__.__name__ == "TokenEvent":
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        else:
            sys.stdout.write("\n")
            sys.stderr.write(f"[{ev.completion_tokens} tokens, {ev.tokens_per_s:.1f} tokens/s, {ev.stop_reason}]\n")
    return 0
