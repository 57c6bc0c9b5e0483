"""Arguments and loading shared by several subcommands."""
from __future__ import annotations

import json
import sys


def add_model_args(p, required: bool = True, adapter: bool = False, many: str | None = None) -> None:
    """`many`: --model is repeatable (a list), and this says how many, for its help (`sol compare`)."""
    p.add_argument("--model", required=required, action="append" if many else "store",
                   help="model directory, or a name from `sol models list` (an adapter folder loads on the base "
                   "it names)" + (f"; give {many}" if many else ""))
    if adapter:
        p.add_argument("--adapter", default=None, metavar="DIR",
                       help="a LoRA adapter folder (PEFT's format: Sol's or one trained elsewhere) on the model")
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
    from ..formats.adapter import load_adapter, load_with_adapter
    from ..model import lora
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    lm = load_with_adapter(args.model, lambda name: load_model(resolve(name), device=device, dtype=dtype,
                                                                   quantize=quantize_arg(args)))
    if getattr(args, "adapter", None):
        if lora.adapter_names(lm.model):
            from ..errors import SolError
            raise SolError(f"--adapter {args.adapter}: --model {args.model} is an adapter already; give its base "
                           "with --model")
        load_adapter(lm, args.adapter)
        lora.use(lm.model, lora.DEFAULT)
    return lm


def quantize_arg(args) -> str | None:
    """--quantize, else "auto" (a quantized GGUF runs in its own blocks) when --dtype was left to Sol."""
    q = getattr(args, "quantize", None)
    return q or ("auto" if getattr(args, "dtype", "auto") == "auto" else None)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
