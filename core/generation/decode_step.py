"""One decode step for a batch of rows: next-token logits for one new token per row.

On a GPU a decode step of a small model is hundreds of tiny kernels, and launching them from Python
costs more than running them: a 124M model decodes at a few hundred tokens/s eager when the GPU could
do thousands. So on CUDA the step is captured once per batch-size bucket in a CUDA graph, with static
input buffers (token ids, positions), and each token afterwards is one graph replay. That works
because `Transformer.decode`'s shapes depend only on the batch size and the cache's capacity, never
on the positions. When the cache grows (it does in buckets), the graphs are captured again.

On the CPU there is nothing to capture: the same step runs eagerly on the exact rows asked for, and
one row reads only the filled part of its cache, its loop over the layers run by TorchScript's
interpreter rather than Python where the model allows (core/model/cpu_step.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.layers import KVCache
from ..model.transformer import Transformer


def cpu_decode_layout(model: Transformer) -> None:
    """Store the float32 weights of linear layers that widen (more outputs than inputs: qkv, the MLP's
    first layer, the LM head) transposed in memory, on the CPU.

    Decoding multiplies one row by each weight, which is bound by how fast the weights stream from
    memory. PyTorch's float32 matrix-vector product reads a widening weight about twice as fast when
    its columns, not its rows, are contiguous (2 cores: 24 against 10 GB/s for the small model's LM
    head), and a narrowing one the other way round; float16's kernel wants rows, so it is left alone.
    The parameters keep their shapes and values, only their strides change: everything else (training,
    saving, hooks) sees the same tensors. Idempotent."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if (type(m) is torch.nn.Linear and w.device.type == "cpu" and w.dtype == torch.float32
                and w.shape[0] > w.shape[1] and w.is_contiguous()):
            w.data = w.data.t().contiguous().t()


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    idx: torch.Tensor      # (bucket, 1) static token ids
    pos: torch.Tensor      # (bucket,) static positions
    logits: torch.Tensor   # (bucket, vocab) written by every replay


def buckets(rows: int) -> list[int]:
    """Batch sizes a step is captured for: powers of two up to the cache's rows, and the rows."""
    sizes, b = [], 1
    while b < rows:
        sizes.append(b)
        b *= 2
    return sizes + [rows]


class DecodeStep:
    """`step(tokens, positions)` -> logits (n, vocab) for rows 0..n-1 of `cache`.

    Writes each row's key and value at its position; positions are the caller's (a batch holds
    sequences of different lengths). Every position must be below the cache's capacity."""

    def __init__(self, model: Transformer, cache: KVCache, capture: bool | None = None, pad: bool = False):
        self.model = model
        self.cache = cache
        self.capture = model.device.type == "cuda" if capture is None else capture
        # Pad the rows up to a bucket as the captured step does, without capturing: the CPU tests use
        # it to check that the padding rows never disturb the live ones.
        self.pad = pad or self.capture
        self._graphs: dict[int, _Captured] = {}
        self._storage = None   # the cache tensors the graphs were captured on
        self._pool = None
        if not self.capture:
            cpu_decode_layout(model)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, at: int | None = None) -> torch.Tensor:
        return self.model.logits(self.model.decode(idx, pos, self.cache, at))[:, 0]

    @torch.inference_mode()
    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        n = len(tokens)
        dev = self.model.device
        if not self.pad:
            idx = torch.tensor(tokens, dtype=torch.long, device=dev).view(n, 1)
            # One row, eagerly: attention reads only the filled part of its cache (Transformer.decode).
            at = positions[0] if n == 1 else None
            return self.forward(idx, torch.tensor(positions, dtype=torch.long, device=dev), at)
        storage = self.cache.k[0]
        b = next(s for s in buckets(storage.shape[0]) if s >= n)
        # Rows n..b-1 are free rows of the cache: they decode token 0 at position 0, which no one reads.
        idx = torch.tensor(tokens + [0] * (b - n), dtype=torch.long).view(b, 1)
        pos = torch.tensor(positions + [0] * (b - n), dtype=torch.long)
        if not self.capture:
            return self.forward(idx.to(dev), pos.to(dev))[:n]
        if storage is not self._storage:   # the cache grew: its tensors are new
            self._graphs.clear()
            self._storage = storage
        g = self._graphs.get(b) or self._capture(b)
        g.idx.copy_(idx, non_blocking=True)
        g.pos.copy_(pos, non_blocking=True)
        g.graph.replay()
        return g.logits[:n].clone()   # the next replay overwrites the graph's own output

    def _capture(self, b: int) -> _Captured:
        dev = self.model.device
        idx = torch.zeros(b, 1, dtype=torch.long, device=dev)
        # The last position: the caller grows the cache before a row can fill it, so nothing
        # live is there for the warm-up runs to overwrite.
        pos = torch.full((b,), self.cache.capacity - 1, dtype=torch.long, device=dev)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):   # warm-up: lazy initialisations happen outside the graph
                self.forward(idx, pos)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(idx, pos)
        self._graphs[b] = g = _Captured(graph, idx, pos, logits)
        return g
