"""Arguments and loading shared by several subcommands."""
from __future__ import annotations

import json
import sys


def add_model_args(p, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="model directory, or a name from `sol models list`")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto|float32|float16|bfloat16 (default auto)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: keep linear weights as int8 with per-row scales (a quarter of float32's bytes); "
                        "quantized GGUF files run in their own blocks unless --dtype is given")


def load(args):
    """Resolve --model, pick device and dtype, load. Returns a LoadedModel."""
    from ..devices import pick_device, pick_dtype
    from ..formats.checkpoint import load_model
    from ..formats.registry import resolve
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    return load_model(resolve(args.model), device=device, dtype=dtype, quantize=quantize_arg(args))


def quantize_arg(args) -> str | None:
    """--quantize, else "auto" (a quantized GGUF runs in its own blocks) when --dtype was left to Sol."""
    q = getattr(args, "quantize", None)
    return q or ("auto" if getattr(args, "dtype", "auto") == "auto" else None)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
