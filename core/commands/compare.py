"""`sol compare`: 2 to 4 models answer one prompt side by side, each as `sol generate` (or, with --chat,
`sol chat`) would answer with the same seed and sampling. With --json one line per model, in the order
of --model: {"model", "text", "tokens", "ids", "tokens_per_s"}."""
from __future__ import annotations

import sys

from .common import add_model_args, load, print_json
from .generate import add_sampling_args, sampling_from


def register(sub) -> None:
    p = sub.add_parser("compare", help="several models answer one prompt side by side")
    add_model_args(p, many="2 to 4")
    p.add_argument("--prompt", required=True, help="raw text to continue, as `sol generate` (see --chat)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through each model's "
                   "chat template, tools included, as `sol chat --message`")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="one JSON line per model")
    p.set_defaults(func=run)


def run(args) -> int:
    from argparse import Namespace

    from ..errors import SolError
    from ..evaluate.compare import MAX_MODELS, compare
    from ..generation.engine import GenerationParams
    if not 2 <= len(args.model) <= MAX_MODELS:
        raise SolError(f"--model: given {len(args.model)} times; compare takes 2 to {MAX_MODELS} models")
    sampling = sampling_from(args)
    params = GenerationParams(max_tokens=args.max_tokens, sampling=sampling, stop_strings=tuple(args.stop),
                              explain=args.chat and args.json)   # as `sol chat --json` samples (no effect on draws)
    models = [(m, load(Namespace(**{**vars(args), "model": m}))) for m in args.model]
    plugins = store = None
    if args.chat:
        from ..chat.store import Store
        from ..plugins.manager import PluginManager
        plugins, store = PluginManager(), Store()
        plugins.load()
    answers: dict[int, dict] = {}
    for ev in compare(models, args.prompt, params, chat=args.chat, plugins=plugins, store=store):
        if ev["type"] == "error":
            raise SolError(f"{ev['name']}: {ev['message']}")
        if ev["type"] == "done":
            answers[ev["model"]] = ev
    for i, (name, _) in enumerate(models):
        a = answers[i]
        if args.json:
            print_json({"model": name, "text": a["text"], "tokens": a["tokens"], "ids": a["ids"],
                        "tokens_per_s": a["tokens_per_s"]})
        else:
            sys.stdout.write(f"=== {name} ===\n{a['text']}\n")
            sys.stderr.write(f"[{name}: {a['tokens']} tokens, {a['tokens_per_s']:.1f} tokens/s, {a['stop_reason']}]\n")
    return 0
