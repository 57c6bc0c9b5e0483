"""The greedy token and the log-sum-exp of a row of logits: the two reductions the engine does every token.

torch's argmax and logsumexp are slow on a CPU without AVX-512 (measured over GPT-2's 50,257 logits on a
2-core AVX2 EPYC, torch 2.13: 126 us and 140 us, where max() takes 8 us): ~0.45 ms of a 6.5 ms int8 token.
pick.cpp does each in one vectorised pass, with torch's answers (the first index of the largest value, a NaN
counting as the largest; NaN, +inf and -inf log-sum-exps as torch gives them). It is part of the library
core/kernels/int8_kernel.py compiles, so it runs where that library is loaded already (an int8 model loaded it);
elsewhere torch's reductions run, never a compile for this.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import int8_kernel


def _native(x: torch.Tensor) -> bool:
    return (x.dim() == 1 and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0
            and x.is_contiguous() and int8_kernel.loaded())


def argmax(logits: torch.Tensor) -> int:
    """int(logits.argmax()) for 1-D logits."""
    if _native(logits):
        return torch.ops.sol_pick.argmax(logits)
    return int(logits.argmax())


def logsumexp(logits: torch.Tensor) -> float:
    """float(logits.logsumexp(-1)) for 1-D logits."""
    if _native(logits):
        return torch.ops.sol_pick.logsumexp(logits)
    if logits.dim() == 1 and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.numel():
        return _numpy_logsumexp(logits)
    return float(logits.logsumexp(-1))


def _numpy_logsumexp(logits: torch.Tensor) -> float:
    """NumPy's one thread instead of torch's: torch's logsumexp opens an OpenMP parallel region even over a
    4,096-token vocabulary, and after a pause its sleeping worker takes 2-6 ms to wake (2-core AMD EPYC VM,
    libgomp), where this takes 6 us for 4,096 logits and 36 us for 50,257. Summed in float64: as close to
    the exact value as torch's, or closer. Infinities and NaNs take torch's own answer."""
    a = logits.detach().numpy()
    top = float(a.max())
    if not math.isfinite(top):
        return float(logits.logsumexp(-1))
    return top + math.log(float(np.exp(a - top).sum(dtype=np.float64)))
