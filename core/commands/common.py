"""Arguments and loading shared by several subcommands."""
from __future__ import annotations

import json
import sys


def add_model_args(p, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="model directory, or a name from `sol models list`")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto|float32|float16|bfloat16 (default auto)")


def load(args):
    """Resolve --model, pick device and dtype, load. Returns a LoadedModel."""
    from ..checkpoint import load_model
    from ..devices import pick_device, pick_dtype
    from ..registry import resolve
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    return load_model(resolve(args.model), device=device, dtype=dtype)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
