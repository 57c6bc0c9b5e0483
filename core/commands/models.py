"""`sol models list`: Sol models and loadable Hugging Face models on this disk."""
from __future__ import annotations

import sys

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("models", help="models on this disk")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    lp = msub.add_parser("list", help="list Sol models and Hugging Face models Sol can load")
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=run_list)
    ip = msub.add_parser("info", help="details of one model: layers, d_model, heads, parameters")
    ip.add_argument("model")
    ip.add_argument("--json", action="store_true")
    ip.set_defaults(func=run_info)
    ep = msub.add_parser("export", help="write a model as a GGUF file (llama.cpp, Ollama, LM Studio)")
    ep.add_argument("model", help="model directory, .gguf file, or a name from `sol models list`")
    ep.add_argument("--format", required=True, choices=["gguf"])
    ep.add_argument("--out", required=True, help="the .gguf file to write")
    ep.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0"],
                    help="weight type: f32 (exact), f16, or q8_0 (a quarter of f32's bytes); default f32")
    ep.set_defaults(func=run_export)


def run_list(args) -> int:
    from ..formats.registry import list_models
    models = list_models(include_broken=True)
    if args.json:
        print_json(models)
        return 0
    if not models:
        sys.stdout.write("no models found\n")
    for m in models:
        if "broken" in m:
            sys.stdout.write(f"{m['name']:<32} broken: {m['broken']}\n")
            continue
        fmt = f"{m['format']} {m['quantization']}" if m.get("quantization") else m["format"]
        sys.stdout.write(f"{m['name']:<32} {fmt:<4} {m['architecture']:<12} "
                         f"{m['parameters'] / 1e6:>9.2f}M  {m['path']}\n")
    return 0


def run_info(args) -> int:
    from ..formats.checkpoint import load_config
    from ..formats.registry import resolve
    from ..model.quant import weight_bytes
    d = resolve(args.model)
    cfg, fmt = load_config(d)
    # What concurrent chats cost beside the weights: float32 is the CPU's cache, bfloat16 a GPU's.
    def kv(n):
        return {name: round(cfg.kv_cache_bytes(n, cfg.context, size) / 2**20, 2) for name, size in (("float32", 4), ("bfloat16", 2))}
    info = {"path": str(d), "format": fmt, "architecture": cfg.architecture, "layers": cfg.n_layer,
            "d_model": cfg.d_model, "heads": cfg.n_head, "kv_heads": cfg.n_kv_head, "d_head": cfg.head_dim,
            "d_ff": cfg.d_ff, "context": cfg.context, "vocab_size": cfg.vocab_size,
            "parameters_estimate": cfg.n_params_estimate,
            "weights_mb": {k: round(weight_bytes(cfg, k) / 2**20, 2) for k in ("float32", "bfloat16", "int8")},
            "kv_cache_mb_per_sequence": kv(1), "kv_cache_mb_8_sequences": kv(8)}
    if fmt == "gguf":   # as stored; a Q8_0 file loads as int8 (weights_mb's int8), others as float
        from ..formats.gguf_io import inspect_gguf
        info["quantization"] = inspect_gguf(d)["quantization"]
        info["file_mb"] = round(d.stat().st_size / 2**20, 2)
    if args.json:
        print_json(info)
    else:
        for k, v in info.items():
            sys.stdout.write(f"{k:<20} {v}\n")
    return 0


def run_export(args) -> int:
    """Sol's own models and imported ones of the gguf-writable families (gpt2, llama, qwen2, qwen3, gemma2,
    gemma3, phi3)."""
    from pathlib import Path

    from ..errors import SolError
    from ..formats.checkpoint import load_model
    from ..formats.gguf_io import export_gguf
    from ..formats.registry import resolve
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise SolError(f"--out {args.out}: name the file *.gguf")
    if out.exists():   # never replace a file the user has without asking
        raise SolError(f"--out {args.out}: already exists; remove it first or choose another name")
    lm = load_model(resolve(args.model))
    export_gguf(lm, out, args.type)
    sys.stdout.write(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})\n")
    return 0
