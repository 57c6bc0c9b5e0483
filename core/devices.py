"""Choose where to run (cuda, mps, cpu) and in what precision, and say so."""
from __future__ import annotations

import platform

import torch

from .errors import SolError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SolError("--device cuda: no CUDA GPU is available here; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SolError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise SolError(f"--device {name}: choose auto, cpu, cuda or mps")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that have it, float16 on other GPUs and MPS; on the CPU None, which the
    loader reads as the weights' own dtype (formats/loaded.stored_dtype)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return None
    if name not in DTYPES:
        raise SolError(f"--dtype {name}: choose auto, float32, float16 or bfloat16")
    return DTYPES[name]


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bf16 matrix products run
    at twice float32's rate; elsewhere they are emulated and slower than float32."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)   # torch 2.3+; older: no
        try:
            if check is not None and check():
                return True
        except Exception:   # a private helper: never let it stop training
            pass
    return False


def training_precision(name: str, device: torch.device) -> str:
    """What `--precision` means on this device: `auto` is bf16 autocast on CUDA GPUs and on CPUs with native
    bf16, float32 elsewhere (MPS, older CPUs). Weights, optimizer state and reductions stay float32."""
    if name not in PRECISIONS:
        raise SolError(f"--precision {name}: choose auto, fp32 or bf16")
    if name != "auto":
        return name
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return "bf16"
    return "fp32"


def describe(device: torch.device) -> dict:
    """What a status bar or a `start` event shows: kind, name, and whether a GPU sits idle."""
    info = {"type": device.type, "name": platform.processor() or platform.machine() or "CPU",
            "gpu_available": torch.cuda.is_available()}
    if device.type == "cuda":
        idx = device.index or 0
        props = torch.cuda.get_device_properties(idx)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1))
    elif device.type == "mps":
        info["name"] = "Apple GPU (MPS)"
    info["threads"] = torch.get_num_threads()
    info["warning"] = ("a CUDA GPU is available but not used" if device.type == "cpu" and info["gpu_available"]
                       else None)
    return info
