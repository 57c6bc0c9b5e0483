"""How many CPU threads a piece of model work gets: one when it is too small to pay for a second.

PyTorch runs its products on OpenMP's threads. Between steps the extra thread first spins, then sleeps,
and the first parallel product after a pause waits for it to wake: measured on a 2-core AMD EPYC VM
(libgomp, torch 2.13), 8 tokens of the words model took 13.7 ms on two threads 50 ms after the last step
and 2.3 ms on one (1.2 and 1.1 ms back to back). A thread that has just run also spins on the other core
for a while, which the GUI thread or sol serve's event loop then waits for. So a prefill or a lone row's
step of a small model runs on one thread; larger models and batches keep every thread.

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


@contextlib.contextmanager
def threads_for(model, tokens: int | None):
    """One thread inside where `tokens` tokens (rows of a step, or a prefill's length; None: not small)
    of `model` on the CPU are SMALL_WORK or less; every thread otherwise."""
    if tokens is None or model.device.type != "cpu" or tokens * work_per_token(model) > SMALL_WORK:
        yield
        return
    with one_thread():
        yield
