"""torch.compile for training, with inductor's caches kept between runs.

Compiling costs tens of seconds per model shape; inductor keeps what it built (FX graphs, Triton
kernels, autotuning results) in a cache folder, so a second run of the same shape starts in seconds.
That folder is Sol's own (data folder / cache / inductor) rather than one under /tmp that a reboot
clears. `reduce-overhead` also captures the compiled forward and backward in CUDA graphs: one launch
replays a whole pass, which is what small models on a big GPU need (they wait on launches, not math).
It needs the same shapes every step (pretraining's fixed B x T windows) and one process.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

def cache_dir() -> Path:
    from ..formats.registry import data_dir
    return data_dir() / "cache" / "inductor"


def use_caches() -> None:
    """Point inductor at Sol's cache folder (unless the user chose one) and turn its caches on.
    Inductor reads the variable whenever it needs the folder, but the first time writes its default
    (under /tmp) into it -- creating an AdamW does -- so that default is replaced too."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except (ImportError, AttributeError):
        torch_default = None
    if current is None or os.path.abspath(current) == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
    try:
        import torch._inductor.config as inductor_config
        inductor_config.fx_graph_cache = True
    except (ImportError, AttributeError):   # a torch without these switches compiles without the cache
        pass


def effective_mode(mode: str, stage, device: torch.device, dist, grad_accum: int = 1) -> str:
    """reduce-overhead only where CUDA graphs are correct: CUDA, static shapes, one process, and one
    micro-batch a step (the gradients a replay writes live in the graphs' memory, which the next
    micro-batch's replay would reuse before they were added up)."""
    if mode == "reduce-overhead" and not (device.type == "cuda" and stage.static_shapes and not dist.enabled
                                          and grad_accum == 1):
        return "default"
    return mode


def compile_for_training(module, mode: str, stage, device: torch.device, dist, grad_accum: int = 1):
    """(module, loss, mode used): what the loop calls as loss(module, batch).

    One process and fixed shapes (pretraining): the whole loss -- forward, LM head and cross-entropy --
    is one compiled graph, so inductor fuses the cross-entropy into the head's output instead of
    writing float32 logits out. Otherwise (DDP wraps the module; varying shapes) the module alone."""
    use_caches()
    mode = effective_mode(mode, stage, device, dist, grad_accum)
    options = {"mode": None if mode == "default" else mode}
    if stage.static_shapes and not dist.enabled:
        def loss(m, batch):
            return stage.loss(m, batch)
        return module, torch.compile(loss, **options), mode
    return torch.compile(module, **options), stage.loss, mode


def mark_step(mode: str | None) -> None:
    """Tell CUDA graph trees that a new step begins, so they may reuse the last step's memory."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
