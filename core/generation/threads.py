"""How many CPU threads a piece of model work gets: one when it is too small to pay for a second.

PyTorch runs its products on OpenMP's threads. Between steps the extra thread first spins, then sleeps,
and the first parallel product after a pause waits for it to wake: measured on a 2-core AMD EPYC VM
(libgomp, torch 2.13), 8 tokens of the words model took 13.7 ms on two threads 50 ms after the last step
and 2.3 ms on one (1.2 and 1.1 ms back to back).

So the prefill that begins a small model's answer runs on one thread, and so do the one-sequence engine's
decode steps of a tiny float32 model (sol chat, the GUI: the first token waits for the first step). Steps
come back to back, so the second thread is mostly awake for them: the 6-layer "small" GPT-2 shape (10.5 M
multiply-adds a token) decodes 5-10 % slower on one thread in float32 and 1.5x slower in float16 and int8,
while the shipped words and starter models (1.8 and 0.8 M) decode as fast. Larger models keep every
thread, and so do the batched engine's steps (sol serve sends its first token before the step).

torch.set_num_threads is process-wide, and each thread reads the count once, at its first parallel
product: a thread that began while another held the count at one would keep one. So one thread at a time
holds it there (`one_thread`), and a thread that may start torch work beside one that does calls
`settle()` first.
"""
from __future__ import annotations

import contextlib
import threading

import torch

# Multiply-adds one thread does in about a millisecond (18 tokens of the words model): a second thread
# saves at most half of that, and may first have to be woken.
SMALL_WORK = 32 * 2**20
# A decode step's, where the second thread is mostly awake already (the words model's step is 1.8 M).
SMALL_STEP = 4 * 2**20

_ONE = threading.RLock()   # held while torch's thread count is one (a window inside a window re-enters it)


def work_per_token(model) -> int:
    """Multiply-adds a token costs in the layers (the LM head runs for the last position only)."""
    cfg = model.cfg
    return cfg.n_params_estimate - cfg.vocab_size * cfg.d_model


def settle() -> None:
    """Have this thread read torch's thread count now, while no other thread holds it at one."""
    with _ONE:
        torch.get_num_threads()


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside (no-op where it has one already); the count is restored after."""
    with _ONE:
        before = torch.get_num_threads()
        if before == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def float32_layers(model) -> bool:
    """Whether the model's linear layers are plain float32 ones (its first block's tell: a float16, int8 or
    GGUF layer replaces nn.Linear)."""
    layer = model.blocks[0].attn.qkv
    return type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32


@contextlib.contextmanager
def threads_for(model, tokens: int, step: bool = False):
    """One thread inside where `tokens` tokens of `model` on the CPU are SMALL_WORK or less (a prefill), or
    with `step` SMALL_STEP or less in float32 layers (a decode step); every thread otherwise."""
    if (model.device.type != "cpu" or tokens * work_per_token(model) > (SMALL_STEP if step else SMALL_WORK)
            or (step and not float32_layers(model))):
        yield
        return
    with one_thread():
        yield
