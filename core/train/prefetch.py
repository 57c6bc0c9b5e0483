"""Batches built ahead: step s+1's micro-batches are cut while step s trains.

A stage's micro_batches is a pure function of the step (see Stage.micro_batches), so building a
step early changes only *when* it is built, never what it holds: a resumed or stopped run, and every
DDP rank, sees exactly the batches it would have without this. On a GPU the rows are put in pinned
(page-locked) memory in the background thread, so the copy to the device is asynchronous and the
host never waits for it.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a micro-batch on `device` (a tensor already there is not copied). From pinned
    memory the copy is queued behind the running step instead of waiting for it."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def pin(batch: dict) -> dict:
    return {k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v for k, v in batch.items()}


class Prefetcher:
    """get(step) returns that step's micro-batches on the device and starts building step + 1's.

    `make(step)` is the stage's micro_batches; with `ahead` False everything happens in the caller's
    thread, in order (the reference the prefetching is tested against)."""

    def __init__(self, make, device: torch.device, last_step: int, ahead: bool):
        self.make, self.device, self.last_step = make, device, last_step
        self.pin = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sol-batches") if ahead else None
        self.next: tuple[int, Future] | None = None

    def _build(self, step: int) -> list[dict]:
        micro = self.make(step)
        return [pin(b) for b in micro] if self.pin else micro

    def get(self, step: int) -> list[dict]:
        if self.next is not None and self.next[0] == step:
            micro = self.next[1].result()     # re-raises the stage's error here, in the loop's thread
        else:
            if self.next is not None:         # asked for another step than the one built: drop that
                self.next[1].cancel()
            micro = self._build(step)
        self.next = None
        if self.pool is not None and step + 1 < self.last_step:
            self.next = (step + 1, self.pool.submit(self._build, step + 1))
        return [to_device(b, self.device) for b in micro]

    def close(self) -> None:
        if self.pool is not None:
            if self.next is not None:
                self.next[1].cancel()
            self.pool.shutdown(wait=True)
            self.next = None
