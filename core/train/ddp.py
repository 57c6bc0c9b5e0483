"""Distributed data parallel when started by torchrun: one process per device.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. We join the process group
(nccl on GPUs, gloo on CPUs); every rank draws the same global batch and
trains on its own slice of it, and DDP averages the gradients, so N processes
take the same steps as one process with the whole batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> Dist:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d


def device_for(d: Dist, device: torch.device) -> torch.device:
    if d.enabled and device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return device


def all_sum(x, d: Dist, device):
    """The sum over ranks of a number (returned as a float: the host waits) or of a tensor (returned as a
    tensor on its device: nothing waits until it is read)."""
    if torch.is_tensor(x):
        if not d.enabled:
            return x
        t = x.clone()
        dist.all_reduce(t)
        return t
    if not d.enabled:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, d: Dist) -> slice:
    """This rank's rows of a global batch of n rows (n divisible by the world size)."""
    per = n // d.world
    return slice(d.rank * per, (d.rank + 1) * per)
