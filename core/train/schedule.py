"""Learning rate: linear warmup, then cosine decay to min_lr (nanoGPT's schedule)."""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
