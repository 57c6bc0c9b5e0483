"""Limits on rendering a chat template: time, output size, and the size of what it computes.

A chat template arrives with a model from anywhere. Jinja's sandbox keeps it away from Python's
internals; these limits keep it from hanging Sol or exhausting memory: loops nested to 10^10
iterations, `9**(10**9)`, `'x' * 3000000000`, a macro that calls itself. Real templates render
in milliseconds and stay far inside every limit.
"""
from __future__ import annotations

import ctypes
import math
import threading
import time

from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SECONDS = 2.0          # to render one prompt
MAX_OUTPUT = 8 * 2**20     # characters of rendered text (a 128k-token conversation is ~0.5 M)
MAX_VALUE = 2**20          # characters (or items) of a string or list built by * or +
MAX_BITS = 2**16           # bits of an integer built by * or **


class TemplateLimit(Exception):
    """The template went past one of the limits; the message says which."""


class LimitedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context, operator, left, right):
        check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _seq(x) -> bool:
    return isinstance(x, (str, list, tuple))


def check_binop(op: str, a, b) -> None:
    """Refuse an operation whose result would be too big, before computing it."""
    if op == "**" and _int(a) and _int(b) and b > 0 and abs(a) > 1:
        if b * abs(a).bit_length() > MAX_BITS:
            raise TemplateLimit(f"{a} ** {b} would be an integer of more than {MAX_BITS} bits")
    elif op == "*":
        if _int(a) and _int(b) and a.bit_length() + b.bit_length() > MAX_BITS:
            raise TemplateLimit(f"a product of more than {MAX_BITS} bits")
        seq, n = (a, b) if _seq(a) and _int(b) else (b, a) if _seq(b) and _int(a) else (None, 0)
        if seq is not None and len(seq) * n > MAX_VALUE:
            raise TemplateLimit(f"repeating {len(seq)} items {n} times makes more than {MAX_VALUE:,}")
    elif op == "+" and _seq(a) and _seq(b) and len(a) + len(b) > MAX_VALUE:
        raise TemplateLimit(f"a value of more than {MAX_VALUE:,} characters or items")


class _Late(TemplateLimit):
    """Raised in a rendering thread by the watchdog (which can only name a class, so the text is its own)."""

    def __init__(self, *args):
        super().__init__(*(args or ("took longer than its time limit to render",)))


class _Watchdog:
    """One daemon thread for every render's deadline. Past it, _Late is raised in the rendering thread
    (PyThreadState_SetAsyncExc), at its next bytecode: a template's loops are Python loops, so they stop there.
    Nothing runs per line of the template; a line tracer doing the same cost 2-3 ms of every chat request."""

    def __init__(self):
        self._cond = threading.Condition()
        self._watch: dict[int, tuple[float, int]] = {}   # token -> (deadline, thread id)
        self._fired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf   # when the watchdog's thread looks again by itself

    def arm(self, seconds: float) -> int:
        with self._cond:
            self._next += 1
            deadline = time.monotonic() + seconds
            self._watch[self._next] = (deadline, threading.get_ident())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sol-template-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._wakes_at:   # else it looks in time by itself: a wake-up per render would cost
                self._cond.notify()         # the renderer the GIL's hand-over (sol serve's requests, one after another)
            return self._next

    def disarm(self, token: int) -> bool:
        """True if the deadline passed; an exception still pending for this thread is taken back."""
        with self._cond:
            if self._watch.pop(token, None) is not None:
                return False
            self._fired.discard(token)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)
            return True

    def _run(self) -> None:
        idle = False   # nothing was watched the last time it looked, either
        with self._cond:
            while True:
                if not self._watch:
                    # Look again after the time limit, then sleep until armed: renders that come one after
                    # another within it arm without waking this thread.
                    self._wakes_at = math.inf if idle else time.monotonic() + MAX_SECONDS
                    self._cond.wait(None if idle else MAX_SECONDS)
                    idle = not self._watch
                    continue
                idle = False
                token, (deadline, tid) = min(self._watch.items(), key=lambda kv: kv[1][0])
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._wakes_at = deadline
                    self._cond.wait(wait)
                    continue
                del self._watch[token]
                self._fired.add(token)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_Late))


_WATCHDOG = _Watchdog()


def render_limited(tmpl, context: dict, seconds: float = MAX_SECONDS) -> str:
    """Render a compiled template (of a LimitedSandbox) with a deadline (the watchdog's) and a cap on the
    output. Raises TemplateLimit."""
    out, size = [], 0
    token = _WATCHDOG.arm(seconds)
    late = False
    try:
        for piece in tmpl.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise TemplateLimit(f"rendered more than {MAX_OUTPUT:,} characters")
            out.append(piece)
    except _Late:
        late = True
    except RecursionError:
        raise TemplateLimit("a macro calls itself too deeply") from None
    finally:
        late = _WATCHDOG.disarm(token) or late
    if late:
        raise TemplateLimit(f"took longer than {seconds:g} s to render")
    return "".join(out)
