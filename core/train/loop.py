"""The training loop every stage shares.

A stage (pretrain, sft, reward, rl, or a plugin's) says only what its data
is and what its loss is; this loop does the rest: device and precision,
AdamW with warmup + cosine, gradient accumulation, clipping, evaluation,
samples, atomic checkpoints, resume, stopping on SIGINT/SIGTERM, DDP.

Losses are sums over what the stage counts (target tokens, preference pairs)
divided by the count over the whole global batch. That makes the update the
same whether the batch is split into micro-batches, across processes, or
neither -- and uneven masks (SFT) weigh every token equally.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..devices import describe, pick_device, training_precision
from ..errors import SolError
from . import checkpointing, compiled, ddp
from .prefetch import Prefetcher


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr
    (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


@dataclass
class TrainConfig:
    out: str
    max_steps: int = 1000
    batch_size: int = 16            # global batch per optimizer step (sequences, pairs or prompts)
    grad_accum: int = 1             # micro-batches per step (each batch_size / grad_accum / world rows)
    lr: float = 1e-3
    min_lr: float | None = None     # None: lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "default"   # torch.compile's mode; reduce-overhead: CUDA graphs (CUDA, static shapes)
    threads: int = 0                # CPU threads (0: torch's default)
    log_every: int = 0              # read loss and grad norm from the device every N steps (0: 1 on CPU, 10 else)
    prefetch: bool | None = None    # build the next step's batches in a background thread (None: not on the CPU)
    precision: str = "auto"         # auto | fp32 | bf16 (autocast); auto: bf16 on CUDA and on CPUs with native bf16
    extra: dict = field(default_factory=dict)


class Stage:
    """What a stage defines. The loop calls these in order: prepare, then per step micro_batches + loss."""
    name = "stage"        # CLI name
    kind = "base"         # sol.json "stage": base | sft | rm | rl
    module: nn.Module     # what is trained (a Transformer, or a Transformer with a reward head)
    tokenizer = None
    # micro_batches reads only the data, never the module or anything training changes, so the loop may
    # build step s+1's batches in a background thread while step s trains (RL samples from the model: no).
    prefetch = False
    # Every step's batches have the same shapes, so a captured CUDA graph can replay them (reduce-overhead).
    static_shapes = False

    def prepare(self, cfg: TrainConfig, device: torch.device, dist: ddp.Dist) -> None:
        """Read and check all data (errors before any training), build self.module."""
        raise NotImplementedError

    def micro_batches(self, step: int, cfg: TrainConfig, dist: ddp.Dist) -> list[dict]:
        """This rank's micro-batches for optimizer step `step`. Each dict has "count" (what the loss sums
        over) and "tokens" (for tokens/s). Must be a function of the step alone, so a resumed run sees
        exactly the batches the interrupted one would have. Tensors may be on the CPU: the loop moves
        them to the device (asynchronously from pinned memory on a GPU)."""
        raise NotImplementedError

    def loss(self, module: nn.Module, batch: dict) -> torch.Tensor:
        """The summed loss of a micro-batch (not averaged: the loop divides by the global count)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def sample(self) -> str | None:
        return None

    def export(self, out: Path, meta: dict) -> None:
        """Write a model directory (save_model, with any extra tensors)."""
        raise NotImplementedError

    def restore(self, ckpt: Path) -> None:
        """Load weights from a checkpoint's model directory into self.module."""
        raise NotImplementedError

    def lineage(self) -> dict:
        """sol.json fields: parent, data files with hashes."""
        return {}

    def config_summary(self) -> dict:
        return {}


class _Stop:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[s] = signal.signal(s, self._handle)
            except ValueError:   # not the main thread (a test calling train() from a worker)
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # No weight decay on biases and norms (1-D tensors), as nanoGPT.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # Fused: one kernel for all tensors instead of ~10 small operations per tensor (torch 2.4 has it on
    # the CPU too: 0.10 against 0.36 ms a step for a 0.8M-parameter model on 2 cores).
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {}
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **extra)
    except (RuntimeError, ValueError):   # a torch or device without the fused kernel
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# What a Sol run writes into --out before it has finished: a folder holding only these may be reused.
RUN_ENTRIES = {"checkpoints", "data", "best", "events.jsonl"}


def check_out_dir(out: Path, resume: bool, kind: str | None = None) -> Path | None:
    """Refuse an --out that would overwrite something that is not this stage's own run, and one that
    cannot be written: both before the first step, not at the first checkpoint after all of them."""
    if out.exists() and not out.is_dir():
        raise SolError(f"--out {out}: is a file, not a folder; choose a folder for the model")
    _check_sol_stage(out, kind)
    ckpt = checkpointing.latest(out)
    if resume:
        if ckpt is None:
            raise SolError(f"--resume: {out} holds no checkpoint to resume from; run without --resume to start")
    elif ckpt is not None or (out / "sol.json").exists():
        raise SolError(f"--out {out}: already holds a training run; add --resume to continue it, "
                       "or choose another --out")
    foreign = [] if resume else _foreign_entries(out)   # resuming: a Sol run's folder (it has checkpoints)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SolError(f"--out {out}: is not empty and is not a Sol training run (it holds {shown}); "
                       "nothing was changed: choose a new or empty folder for --out")
    check_writable(out)
    return ckpt


def _check_sol_stage(out: Path, kind: str | None) -> None:
    meta = out / "sol.json"
    if kind is None or not meta.is_file():
        return
    try:
        stage = json.loads(meta.read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        raise SolError(f"--out {out}: its sol.json cannot be read; choose another --out") from None
    if stage != kind:
        raise SolError(f"--out {out}: holds a Sol model of stage {stage!r}, not a {kind!r} run; "
                       "choose another --out")


def _foreign_entries(out: Path) -> list[str]:
    """What is in `out` that a Sol run did not put there (half-written temporary files excepted)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name not in RUN_ENTRIES and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def check_writable(out: Path) -> None:
    """Create `out` (as the run will) and write a probe file in it."""
    import tempfile
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SolError(f"--out {out}: cannot write there ({e.strerror or e}); choose a folder you can "
                       "write to") from None


# Where the start event's startup_s counts from. `sol train` sets it (mark_command_start) to its process's
# start as the OS recorded it, so interpreter start-up and imports count; train() called in-process (tests,
# the benchmarks, a recipe's later stages) counts from its own entry.
_command_started: float | None = None


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc), else None."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))   # field 22: start time in ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def mark_command_start() -> None:
    global _command_started
    _command_started = time.perf_counter() - (process_age() or 0.0)


def keep_freed_memory_returned() -> None:
    """Have glibc's malloc give every large block (1 MB and up) back to the system when torch frees it.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so a
    training step's activations end up in the heap, where freed blocks of one size are not reused for
    another: measured on a LoRA run of Qwen2.5-0.5B's shape (4 x 256 tokens), peak RSS grew 7.0 -> 8.3 ->
    8.9 GB over three steps, against 5.8 -> 5.9 -> 5.9 GB with a fixed threshold. Other C libraries: nothing."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):   # not glibc (macOS, musl, Windows): their allocators decide
        pass


def train(stage: Stage, cfg: TrainConfig, emit) -> dict:
    """Run the stage to cfg.max_steps (or until stopped). Returns the `done` event."""
    global _command_started
    started, _command_started = _command_started or time.perf_counter(), None
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory_returned()
    device = pick_device(cfg.device)
    dist = ddp.setup(device)
    device = ddp.device_for(dist, device)
    if device.type == "cuda":   # float32 matmuls (outside autocast) on tensor cores, as TF32
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    try:
        return _train(stage, cfg, emit, out, device, dist, started)
    finally:
        ddp.teardown(dist)


def _train(stage: Stage, cfg: TrainConfig, emit, out: Path, device, dist: ddp.Dist, started: float) -> dict:
    if cfg.batch_size % (cfg.grad_accum * dist.world):
        raise SolError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} "
                       f"times the number of processes {dist.world}")
    if cfg.log_every < 0:
        raise SolError(f"--log-every {cfg.log_every}: must be 0 (automatic) or more")
    ckpt = check_out_dir(out, cfg.resume, stage.kind) if dist.main else None
    ddp.barrier(dist)
    if not dist.main:
        ckpt = checkpointing.latest(out) if cfg.resume else None
    torch.manual_seed(cfg.seed + dist.rank)
    stage.prepare(cfg, device, dist)
    module = stage.module.to(device)
    optimizer = make_optimizer(module.parameters(), cfg, device)
    step, elapsed = 0, 0.0
    metrics: dict = {}
    if ckpt is not None:
        stage.restore(ckpt)
        state = checkpointing.load_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        checkpointing.set_rng_state(state["rng"])
        step, elapsed, metrics = state["step"], state.get("elapsed", 0.0), state.get("metrics", {})
    train_module, loss_of, compile_mode = module, stage.loss, None
    if cfg.compile:
        train_module, loss_of, compile_mode = compiled.compile_for_training(module, cfg.compile_mode, stage,
                                                                            device, dist, cfg.grad_accum)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_module = DDP(train_module, device_ids=[device.index] if device.type == "cuda" else None)
    precision = training_precision(cfg.precision, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    # Reading a number from a GPU waits for every step queued before it: read every log_every steps (and,
    # when that is automatic, at least every second, so slow steps still show; not under DDP, whose
    # ranks must read at the same steps).
    log_every = cfg.log_every or (1 if device.type == "cpu" else 10)
    n_params = sum(p.numel() for p in module.parameters())
    emit({"type": "start", "stage": stage.name, "config": {**_public(cfg), **stage.config_summary()},
          "parameters": n_params, "device": describe(device), "world_size": dist.world,
          "max_steps": cfg.max_steps, "step": step, "resumed_from": str(ckpt) if ckpt else None,
          "compile": compile_mode, "precision": precision, "startup_s": time.perf_counter() - started})

    def trainer_state():
        return {"step": step, "optimizer": optimizer.state_dict(), "rng": checkpointing.rng_state(),
                "data": {"step": step}, "elapsed": elapsed, "metrics": metrics}

    def save_checkpoint():
        if dist.main:
            path = checkpointing.save(out, step, lambda d: stage.export(d, meta(stage, cfg, step, metrics, out)),
                                      trainer_state(), cfg.keep_checkpoints)
            emit({"type": "checkpoint", "step": step, "path": str(path)})
        ddp.barrier(dist)

    # Steps trained whose loss and gradient norm are still device tensors, and when the first began.
    pending: list[dict] = []
    since = time.perf_counter()
    step_time = None

    def read_pending():
        """One wait for the device, then one `step` event per pending step. tokens/s and the step time
        behind eta_s are over the whole interval, which is what the steps took together."""
        nonlocal elapsed, step_time, since
        if not pending:
            return
        n = len(pending)
        parts = [ddp.all_sum(torch.stack([p["loss_sum"].float() for p in pending]), dist, device),
                 torch.stack([p["grad_norm"].float() for p in pending])]
        if dist.enabled:   # the global counts were summed on the device too
            parts.append(torch.stack([p["count"] for p in pending]).float())
        values = torch.cat(parts).tolist()
        counts = values[2 * n:] if dist.enabled else [p["count"] for p in pending]
        tokens = ddp.all_sum(sum(p["tokens"] for p in pending), dist, device)
        now = time.perf_counter()
        dt = now - since
        elapsed += dt
        for i, p in enumerate(pending):
            if counts[i] <= 0:
                raise SolError(f"{stage.name}: step {p['step'] - 1} has nothing to learn from (no target tokens); "
                               "check the data")
            step_time = dt / n if step_time is None else 0.9 * step_time + 0.1 * dt / n
            loss_mean = values[i] / counts[i]
            emit({"type": "step", "step": p["step"], "loss": loss_mean, "lr": p["lr"], "grad_norm": values[n + i],
                  "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                  "eta_s": step_time * (cfg.max_steps - p["step"]), **p["extra"]})
            metrics["loss"] = loss_mean
        pending.clear()

    if step == 0 and cfg.sample_every and dist.main:
        _sample(stage, module, step, emit)
    # On the CPU cutting a batch takes microseconds, and a third thread waking every step on a machine whose
    # cores all run the step's math costs more than it saves (measured, 2 cores): there it is off unless asked.
    ahead = stage.prefetch and (cfg.prefetch if cfg.prefetch is not None else device.type != "cpu")
    batches = Prefetcher(lambda s: stage.micro_batches(s, cfg, dist), device, cfg.max_steps, ahead=ahead)
    stopped = False
    try:
        with _Stop() as stop:
            since = time.perf_counter()
            while step < cfg.max_steps:
                lr = lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps, min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if not module.training:
                    module.train()
                micro = batches.get(step)
                extra = stage_step_extra(stage)
                count = sum(b["count"] for b in micro)
                if dist.enabled:   # summed over ranks on the device: no wait here; read_pending checks it
                    count = ddp.all_sum(torch.tensor(float(count), device=device), dist, device)
                elif count <= 0:
                    raise SolError(f"{stage.name}: step {step} has nothing to learn from (no target tokens); "
                                   "check the data")
                loss_sum = None
                compiled.mark_step(compile_mode)
                for i, b in enumerate(micro):
                    sync = i == len(micro) - 1
                    no_sync = train_module.no_sync() if dist.enabled and not sync else contextlib.nullcontext()
                    with no_sync:
                        with autocast:
                            loss = loss_of(train_module, b)
                        (loss * (dist.world / count)).backward()
                    # A CUDA graph's output is overwritten by its next replay: keep a copy until it is read.
                    kept = loss.detach().clone() if compile_mode == "reduce-overhead" else loss.detach()
                    loss_sum = kept if loss_sum is None else loss_sum + kept
                grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                pending.append({"step": step, "lr": lr, "loss_sum": loss_sum, "grad_norm": grad_norm,
                                "count": count, "tokens": sum(b["tokens"] for b in micro), "extra": extra})
                last = step == cfg.max_steps
                do_eval = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or last)
                do_sample = bool(cfg.sample_every) and (step % cfg.sample_every == 0 or last)
                do_ckpt = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and not last
                due = last or do_eval or do_sample or do_ckpt or step % log_every == 0
                if dist.enabled:   # ranks agree on stopping where they all read anyway (no extra wait)
                    stop_now = due and ddp.all_sum(1.0 if stop.requested else 0.0, dist, device) > 0
                else:              # alone, a stop is seen at once; automatic reads also come every second
                    stop_now = stop.requested
                    due = due or stop_now or (not cfg.log_every and time.perf_counter() - since >= 1.0)
                if not due:
                    continue
                read_pending()
                if do_eval:
                    if dist.main:
                        module.eval()
                        with torch.no_grad(), autocast:
                            ev = stage.evaluate()
                        if ev:
                            metrics.update(ev)
                            emit({"type": "eval", "step": step, **ev})
                    ddp.barrier(dist)
                if do_sample and dist.main:
                    _sample(stage, module, step, emit)
                if stop_now and not last:
                    save_checkpoint()
                    stopped = True
                    break
                if do_ckpt:
                    save_checkpoint()
                since = time.perf_counter()   # evaluation, samples and checkpoints are not training time
    finally:
        batches.close()
    if not stopped:
        save_checkpoint()
        if dist.main:
            stage.export(out, meta(stage, cfg, step, metrics, out))
    done = {"type": "done", "out": str(out), "step": step, "stopped": stopped, "metrics": metrics,
            "elapsed_s": elapsed}
    emit(done)
    return done


def stage_step_extra(stage: Stage) -> dict:
    """Stage-specific numbers for the step event (RL's mean reward of the rollouts)."""
    extra = getattr(stage, "step_extra", None)
    return dict(extra) if extra else {}


def _sample(stage: Stage, module: nn.Module, step: int, emit) -> None:
    module.eval()
    with torch.no_grad():
        text = stage.sample()
    if text is not None:
        emit({"type": "sample", "step": step, "text": text})


def _public(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("extra", None)
    return d


def meta(stage: Stage, cfg: TrainConfig, step: int, metrics: dict, out: Path) -> dict:
    return {"name": Path(out).name, "stage": stage.kind, "trained_by": f"sol train {stage.name}",
            **stage.lineage(), "steps": step, "metrics": dict(metrics),
            "train": {**_public(cfg), **stage.config_summary()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
