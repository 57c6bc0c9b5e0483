"""`sol embed neighbours|analogy|context|map|positions`: the embeddings of the book's §2.6 and Box 7."""
from __future__ import annotations

import sys

from .common import add_model_args, load, print_json

BANCO = ["Fui ao banco levantar dinheiro.", "Sentei-me num banco do jardim."]


def register(sub) -> None:
    p = sub.add_parser("embed", help="embedding neighbours, analogies, maps, contexts, positions")
    what = p.add_subparsers(dest="embed_command", metavar="WHAT", required=True)
    n = what.add_parser("neighbours", help="the tokens nearest to a word (cosine)")
    add_model_args(n)
    n.add_argument("--text", required=True)
    n.add_argument("--k", type=int, default=10)
    a = what.add_parser("analogy", help="nearest tokens to a - b + c")
    add_model_args(a)
    a.add_argument("--a", required=True)
    a.add_argument("--b", required=True)
    a.add_argument("--c", required=True)
    a.add_argument("--k", type=int, default=10)
    c = what.add_parser("context", help="a word's hidden state in two sentences, cosine per layer")
    add_model_args(c)
    c.add_argument("--word", default="banco")
    c.add_argument("--sentence", action="append", help="give twice (default: the book's two 'banco')")
    m = what.add_parser("map", help="2-D projection of words (PCA, or UMAP)")
    add_model_args(m)
    m.add_argument("--words", required=True, help="comma-separated words")
    m.add_argument("--method", default="pca", help="pca|umap (default pca)")
    s = what.add_parser("positions", help="position embeddings' cosine matrix, or RoPE frequencies")
    add_model_args(s)
    s.add_argument("--n", type=int, default=64, help="positions shown (learned positions)")
    for q in (n, a, c, m, s):
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=run)


def compute(args) -> dict:
    from ..introspect import embeddings as E
    loaded = load(args)
    cmd = args.embed_command
    if cmd == "neighbours":
        return E.neighbours(loaded, args.text, args.k)
    if cmd == "analogy":
        return E.analogy(loaded, args.a, args.b, args.c, args.k)
    if cmd == "context":
        return E.in_context(loaded, args.word, args.sentence or BANCO)
    if cmd == "map":
        return E.word_map(loaded, [w.strip() for w in args.words.split(",")], args.method)
    return E.positions(loaded, args.n)


def run(args) -> int:
    out = compute(args)
    if args.json:
        print_json(out)
        return 0
    w = sys.stdout.write
    if "neighbours" in out:
        for x in out["neighbours"]:
            w(f"{x['cosine']:7.3f}  {x['text']!r}\n")
    elif "cosine" in out and "layers" in out:
        for layer, c in zip(out["layers"], out["cosine"]):
            w(f"layer {layer:>3}  cosine {c:.4f}\n")
    elif "xy" in out:
        for word, (x, y) in zip(out["words"], out["xy"]):
            w(f"{word!r:<16} {x:8.3f} {y:8.3f}\n")
        if out["explained_variance"]:
            a, b = out["explained_variance"]
            w(f"the two axes keep {100 * (a + b):.1f}% of the variance ({100 * a:.1f}% + {100 * b:.1f}%)\n")
    elif out["kind"] == "rope":
        for i, (f, wl) in enumerate(zip(out["frequencies"], out["wavelengths"])):
            w(f"pair {i:>3}  {f:.5f} rad/position  wavelength {wl:10.1f} positions\n")
    else:
        w(f"{len(out['vectors'])} learned position vectors of {len(out['vectors'][0])} dimensions; "
          f"cosine of position 0 with 1..5: {', '.join(f'{c:.3f}' for c in out['cosine'][0][1:6])}\n")
    return 0
