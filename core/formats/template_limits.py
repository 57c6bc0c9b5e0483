"""Limits on rendering a chat template: time, output size, and the size of what it computes.

A chat template arrives with a model from anywhere. Jinja's sandbox keeps it away from Python's
internals; these limits keep it from hanging Sol or exhausting memory: loops nested to 10^10
iterations, `9**(10**9)`, `'x' * 3000000000`, a macro that calls itself. Real templates render
in milliseconds and stay far inside every limit.
"""
from __future__ import annotations

import sys
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


def render_limited(tmpl, context: dict, seconds: float = MAX_SECONDS) -> str:
    """Render a compiled template (of a LimitedSandbox) with a deadline (checked on every line the
    template runs and every call it makes) and a cap on the output. Raises TemplateLimit."""
    deadline = time.monotonic() + seconds

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimit(f"took longer than {seconds:g} s to render")
        # Line events only in the template's own code: its loops are where the time goes.
        return trace if frame.f_code.co_filename == "<template>" else None

    out, size = [], 0
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for piece in tmpl.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise TemplateLimit(f"rendered more than {MAX_OUTPUT:,} characters")
            out.append(piece)
    except RecursionError:
        raise TemplateLimit("a macro calls itself too deeply") from None
    finally:
        sys.settrace(previous)
    return "".join(out)
