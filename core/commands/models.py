"""`sol models list/info/export/merge`: the models on this disk; `sol models search/get`: models from the
Hugging Face Hub (core/hub)."""
from __future__ import annotations

import sys

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("models", help="models on this disk, and getting them from the Hugging Face Hub")
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
    mp = msub.add_parser("merge", help="fold a LoRA adapter into its base and write the merged model")
    mp.add_argument("adapter", help="the adapter folder (or its name in `sol models list`)")
    mp.add_argument("--model", default=None, help="the base (default: the one the adapter names)")
    mp.add_argument("--out", required=True, help="the folder to write: a Hugging Face folder for a Hugging Face "
                    "base, else a Sol model folder")
    mp.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="the merged weights' type (auto: the base file's own float type, float32 for GGUF bases)")
    mp.set_defaults(func=run_merge)
    sp = msub.add_parser("search", help="search the Hugging Face Hub for models Sol can run")
    sp.add_argument("query", help="words of the repository's name (e.g. qwen2.5 0.5b instruct)")
    kind = sp.add_mutually_exclusive_group()
    kind.add_argument("--gguf", action="store_true", help="only repositories of GGUF files")
    kind.add_argument("--safetensors", action="store_true", help="only repositories of safetensors weights")
    sp.add_argument("--limit", type=int, default=20, help="at most this many repositories (default 20)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=run_search)
    gp = msub.add_parser("get", help="download a model from the Hugging Face Hub into its cache")
    gp.add_argument("repo", help="OWNER/REPO")
    which = gp.add_mutually_exclusive_group()
    which.add_argument("--file", default=None, metavar="NAME", help="the GGUF file to download")
    which.add_argument("--quant", default=None, metavar="Q", help="the GGUF quantization to download (Q4_K_M, "
                       "Q8_0, ...; default Q4_K_M where there is one, else the smallest file Sol reads)")
    gp.add_argument("--revision", default=None, help="branch, tag or commit (default main)")
    gp.add_argument("--dtype", default="auto", help="auto|float32|float16|bfloat16: the weights' type the memory "
                    "check counts (default auto: as Sol would load it)")
    gp.add_argument("--context", type=int, default=None, metavar="N", help="tokens of KV cache the memory check "
                    "counts (default: the model's context, at most 4096)")
    gp.add_argument("--device", default="auto", help="auto|cpu|cuda|mps: whose memory the check counts")
    gp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    gp.set_defaults(func=run_get)


def run_list(args) -> int:
    from ..formats.registry import list_models
    models = list_models(include_broken=True)
    if args.json:
        print_json(models)
        return 0
    if not models:
        sys.stdout.write("no models found\n")
    adapters = [m for m in models if m.get("format") == "lora"]
    bases = [m for m in models if m.get("format") != "lora"]
    for m in bases:
        if "broken" in m:
            sys.stdout.write(f"{m['name']:<32} broken: {m['broken']}\n")
        else:
            fmt = f"{m['format']} {m['quantization']}" if m.get("quantization") else m["format"]
            sys.stdout.write(f"{m['name']:<32} {fmt:<4} {m['architecture']:<12} "
                             f"{m['parameters'] / 1e6:>9.2f}M  {m['path']}\n")
        for a in adapters:   # a model's adapters under it
            if a.get("base") == m["name"]:
                _adapter_line(a, "  ")
    for a in adapters:
        if not any(a.get("base") == m["name"] for m in bases):
            _adapter_line(a, "", f" (base {a.get('base') or 'unknown'})")
    return 0


def _adapter_line(a: dict, indent: str, note: str = "") -> None:
    if "broken" in a:
        sys.stdout.write(f"{indent}{a['name']:<30} lora broken: {a['broken']}\n")
        return
    size = f"{a['parameters'] / 1e6:>9.2f}M" if a.get("parameters") is not None else " " * 10
    sys.stdout.write(f"{indent}{a['name']:<{32 - len(indent)}} lora r={a.get('r')!s:<7} {size}  {a['path']}{note}\n")


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


def run_merge(args) -> int:
    """Base + adapter -> one model in the base's layout, loadable by transformers where the base was."""
    from pathlib import Path

    import torch

    from ..errors import SolError
    from ..formats.adapter import base_of, is_adapter, load_adapter
    from ..formats.checkpoint import load_model, save_model
    from ..formats.hf_write import stored_float_dtype, write_hf_folder
    from ..formats.registry import resolve
    from ..model import lora
    ad = Path(args.adapter).expanduser()
    if not is_adapter(ad):
        ad = resolve(args.adapter)
        if not is_adapter(ad):
            raise SolError(f"{args.adapter}: not a LoRA adapter folder (no adapter_config.json)")
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):   # never replace what the user has without asking
        raise SolError(f"--out {args.out}: exists and is not empty; choose a new folder")
    base = resolve(args.model) if args.model else Path(base_of(ad))
    lm = load_model(base, dtype=torch.float32)
    load_adapter(lm, ad)
    lora.merge(lm.model)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    if lm.format == "hf":
        write_hf_folder(lm.model, lm.path, out, dtype or stored_float_dtype(lm.path))
    else:
        if dtype is not None:
            lm.model.to(dtype)
        save_model(out, lm.model, lm.tokenizer, {"name": out.name, "stage": lm.meta.get("stage", "base"),
                                                  "merged": {"base": str(lm.path), "adapter": str(ad.resolve())}})
    sys.stdout.write(f"wrote {out} ({lm.format if lm.format == 'hf' else 'sol'} layout, base {lm.path.name} + "
                     f"adapter {ad.name})\n")
    return 0


def run_search(args) -> int:
    from ..hub.catalog import public, search
    from ..hub.fit import size_text
    if args.limit < 1:
        from ..errors import SolError
        raise SolError(f"--limit {args.limit}: must be at least 1")
    fmt = "gguf" if args.gguf else "safetensors" if args.safetensors else None
    _quiet_library()
    found = search(args.query, fmt, args.limit)
    if args.json:
        print_json([public(e) for e in found])
        return 0
    if not found:
        sys.stdout.write(f"no repositories match {args.query!r}\n")
    for e in found:
        params = f"{e['parameters'] / 1e9:.2f}B" if e["parameters"] and e["parameters"] >= 1e8 else \
            f"{e['parameters'] / 1e6:.1f}M" if e["parameters"] else "?"
        gated = "  gated" if e["gated"] else ""
        sys.stdout.write(f"{e['repo']}  {e['format'] or '-'}  {e['family'] or '?'}  {params} params  "
                         f"{e['downloads'] or 0:,} downloads  {e['likes'] or 0:,} likes{gated}\n")
        if not e["loadable"]:
            sys.stdout.write(f"    not loadable: {e['why_not']}\n")
        if e["format"] == "gguf":
            for f in e["files"]:
                note = f"  not loadable: {f['why_not']}" if f["why_not"] else ""
                sys.stdout.write(f"    {f['quant'] or '?':<9} {size_text(f['size']):>10}  {f['name']}{note}\n")
        elif e["files"]:
            weights = ", ".join(f"{f['name']} {size_text(f['size'])}" for f in e["files"]
                                if f["name"].endswith(".safetensors"))
            sys.stdout.write(f"    {len(e['files'])} files, {size_text(sum(f['size'] or 0 for f in e['files']))} "
                             f"({weights})\n")
    return 0


def run_get(args) -> int:
    from ..hub.download import get
    say = (lambda line: None) if args.json else (lambda line: sys.stderr.write(line + "\n"))
    _quiet_library()
    got = get(args.repo, file=args.file, quant=args.quant, revision=args.revision, dtype=args.dtype,
              context=args.context, device=args.device, say=say)
    if args.json:
        print_json(got)
        return 0
    if got.get("cached"):
        sys.stderr.write(f"{got['cached']}; using the cached copy\n")
    sys.stdout.write(f"{got['name']}  {got['path']}\n")
    sys.stderr.write(f"run it: sol chat --model {got['name']}   (sol models list shows it)\n")
    return 0


def _quiet_library() -> None:
    """huggingface_hub's own warnings (a retry, a dropped connection) would add lines to Sol's one-line errors;
    its progress bars stay."""
    from huggingface_hub.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
