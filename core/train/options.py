"""Command-line flags every stage shares, and turning them into a TrainConfig.

Nothing here imports torch: `sol --help` and `sol plugins list` build every command's flags, and should not
wait ~2 s for torch to load. The loop (core/train/loop.py) is imported only when a run is configured.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loop import TrainConfig

# torch.compile's modes (core/train/compiled.py passes the chosen one on).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_common(p, defaults: dict | None = None) -> None:
    d = {"max_steps": 1000, "batch_size": 16, "lr": 1e-3, "warmup": 100, "eval_every": 250,
         "sample_every": 500, "checkpoint_every": 500, **(defaults or {})}
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine (default lr/10)")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 turns clipping off")
    p.add_argument("--max-steps", type=int, default=d["max_steps"])
    p.add_argument("--eval-every", type=int, default=d["eval_every"], help="0: never")
    p.add_argument("--sample-every", type=int, default=d["sample_every"], help="0: never")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"], help="0: only at the end")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on GPUs)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="with --compile: torch.compile's mode; reduce-overhead also captures each step in CUDA "
                        "graphs (CUDA, one process, pretraining's fixed shapes; elsewhere it is default)")
    p.add_argument("--log-every", type=int, default=0, metavar="N",
                   help="read loss and gradient norm from the device every N steps (a read waits for the GPU); "
                        "every step still gets its event. 0: 1 on the CPU, 10 on a GPU")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="build the next step's batches in a background thread while this one trains "
                        "(default: on a GPU, not on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for training (default: torch's choice)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="the matrix products' precision: bf16 autocast (weights and optimizer stay float32) or "
                        "fp32. auto: bf16 on CUDA GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--events", default=None, metavar="PATH|-", help="JSON lines to a file, or - for stdout")


def train_config(args) -> TrainConfig:
    from ..errors import SolError
    from .loop import TrainConfig
    for name in ("max_steps", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise SolError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not 0 < args.lr < float("inf"):   # NaN fails too
        raise SolError(f"--lr {args.lr}: must be more than 0")
    if not 0 <= args.seed < 2**63 - 64:      # each process adds its rank
        raise SolError(f"--seed {args.seed}: must be from 0 to 2**63-65")
    return TrainConfig(out=args.out, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr, min_lr=args.min_lr, warmup=min(args.warmup, args.max_steps),
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
                       sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                       keep_checkpoints=args.keep_checkpoints, resume=args.resume, seed=args.seed,
                       device=args.device, compile=args.compile,
                       compile_mode=getattr(args, "compile_mode", "default"),
                       threads=getattr(args, "threads", 0), log_every=getattr(args, "log_every", 0),
                       prefetch=getattr(args, "prefetch", None), precision=getattr(args, "precision", "auto"))
