"""`sol tokenize`: ids, tokens and offsets of a text, exactly as `tokenizers` encodes by default."""
from __future__ import annotations

import sys

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("tokenize", help="show how a tokenizer splits a text")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory, GGUF file or name (uses its tokenizer)")
    src.add_argument("--tokenizer", help="a tokenizer.json file")
    p.add_argument("--text", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats.checkpoint import load_tokenizer
    from ..formats.registry import resolve
    tok = load_tokenizer(args.tokenizer if args.tokenizer else resolve(args.model))
    enc = tok.encode(args.text)
    if args.json:
        print_json(enc.to_json())
    else:
        for i, t, (a, b) in zip(enc.ids, enc.tokens, enc.offsets):
            sys.stdout.write(f"{i:>8}  {t!r:<24} {args.text[a:b]!r}\n")
        sys.stdout.write(f"{len(enc.ids)} tokens, {len(args.text)} characters\n")
    return 0
