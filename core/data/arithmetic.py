"""A safe arithmetic evaluator: parse with `ast`, walk only the nodes we allow.

Nothing here calls eval/exec or looks up a name outside a fixed table, and
every way an expression could eat time or memory is bounded *before* the
work is done: input length, nesting depth, the digits a power or a product
would have. It keeps no state and uses no signals, so it is safe on any
thread (generation runs in a worker thread). It lives in core because two
layers need the same arithmetic: the calculator plugin runs it as its tool,
and the synthetic data (core/data/synthetic.py) writes its results, so a
model learns exactly the answers the tool will give.

    >>> evaluate("12 × 7")
    84
    >>> format_result(evaluate("2 ** 100"))
    '1267650600228229401496703205376'
"""
from __future__ import annotations

import ast
import math
import re

MAX_LENGTH = 1000        # characters of input
MAX_DEPTH = 64           # nested parentheses, calls, unary signs and powers
MAX_DIGITS = 1000        # decimal digits of any integer on the way
MAX_ROUND_DIGITS = 100   # round(x, n) with |n| beyond this would build 10**n

CONSTANTS = {"pi": math.pi, "e": math.e}


class CalculatorError(ValueError):
    """A short message the model (and the user) can read: what is wrong with the expression."""


def _digits(n: int) -> int:
    """Decimal digits of |n|, from its bit length (never converts to a string)."""
    return int(abs(n).bit_length() * 0.30103) + 1


def _check_int(n):
    if isinstance(n, int) and _digits(n) > MAX_DIGITS:
        raise CalculatorError(f"result too large: more than {MAX_DIGITS} digits")
    return n


def _check_float(x: float) -> float:
    if isinstance(x, complex):
        raise CalculatorError("result is not a real number")
    if math.isnan(x):
        raise CalculatorError("result is not a number")
    if math.isinf(x):
        raise CalculatorError("result too large (overflow)")
    return x


def _real(x):
    if isinstance(x, complex):
        raise CalculatorError("result is not a real number")
    return _check_float(x) if isinstance(x, float) else _check_int(x)


# ---- functions ---------------------------------------------------------------
def _sqrt(x):
    if x < 0:
        raise CalculatorError("sqrt of a negative number")
    if isinstance(x, int):
        r = math.isqrt(x)
        if r * r == x:          # perfect squares stay exact integers, however large
            return r
    return math.sqrt(x)


def _log(x, base=None):
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise CalculatorError("log of a number that is not positive (or a base of 1)")
    return math.log(x) if base is None else math.log(x, base)


def _round(x, n=0):
    if not isinstance(n, int):
        raise CalculatorError("round: the number of digits must be an integer")
    if abs(n) > MAX_ROUND_DIGITS:
        raise CalculatorError(f"round: at most {MAX_ROUND_DIGITS} digits")
    return round(x, n) if n else round(x)


def _int_result(f):
    def g(x):
        if isinstance(x, int):
            return x
        return f(x)
    return g


FUNCTIONS = {   # name: (function, smallest and largest number of arguments)
    "sqrt": (_sqrt, 1, 1),
    "log": (_log, 1, 2),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (_int_result(math.floor), 1, 1),
    "ceil": (_int_result(math.ceil), 1, 1),
}


# ---- operators, with their size checks done before the work -------------------
def _pow(a, b):
    if isinstance(a, int) and isinstance(b, int):
        if b < 0:                        # a float, as in Python: 2 ** -1 is 0.5
            if a == 0:
                raise CalculatorError("division by zero")
            if abs(a) == 1:
                return float(a if b % 2 else 1)
            if -b * math.log10(abs(a)) > 400:  # smaller than the smallest float
                return 0.0
            return a ** b
        if abs(a) > 1 and b * math.log10(abs(a)) > MAX_DIGITS:
            raise CalculatorError(f"result too large: {a}**{b} has about {int(b * math.log10(abs(a))) + 1} "
                                  f"digits (the limit is {MAX_DIGITS})")
        return a ** b
    try:
        r = float(a) ** float(b)
    except OverflowError:
        raise CalculatorError("result too large (overflow)") from None
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    return r


def _mul(a, b):
    if isinstance(a, int) and isinstance(b, int) and _digits(a) + _digits(b) > MAX_DIGITS + 1:
        raise CalculatorError(f"result too large: more than {MAX_DIGITS} digits")
    return a * b


def _div(a, b):
    if b == 0:
        raise CalculatorError("division by zero")
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b           # exact when it divides: 10**30 / 10**10 is 10**20, not 1e+20
    return a / b


def _floordiv(a, b):
    if b == 0:
        raise CalculatorError("division by zero")
    return a // b


def _mod(a, b):
    if b == 0:
        raise CalculatorError("division by zero (modulo)")
    return a % b


BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: _mul, ast.Div: _div,
          ast.FloorDiv: _floordiv, ast.Mod: _mod, ast.Pow: _pow}
UNARY = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}


# ---- the walk ---------------------------------------------------------------------
def _eval(node, depth: int):
    if depth > MAX_DEPTH:
        raise CalculatorError(f"expression nested too deeply (the limit is {MAX_DEPTH} levels)")
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CalculatorError(f"only numbers are allowed, not {type(v).__name__} {v!r:.20}")
        return _real(v)
    if isinstance(node, ast.BinOp):
        return _eval_chain(node, depth)
    if isinstance(node, ast.UnaryOp):
        op = UNARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
        return op(_eval(node.operand, depth + 1))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r:.30}: only the constants pi and e are allowed")
    if isinstance(node, ast.Call):
        return _eval_call(node, depth)
    if isinstance(node, ast.Attribute):
        raise CalculatorError("attributes (a.b) are not allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed; use numbers, + - * / // % **, "
                          "parentheses and the functions " + ", ".join(FUNCTIONS))


def _eval_chain(node: ast.BinOp, depth: int):
    """a + b - c * d ...: walk the left spine with a loop, so a long sum costs no recursion."""
    spine = []
    while isinstance(node, ast.BinOp) and not isinstance(node.op, ast.Pow):
        spine.append(node)
        node = node.left
    if isinstance(node, ast.BinOp):      # a power at the bottom: its operands nest
        value = _apply(node.op, _eval(node.left, depth + 1), _eval(node.right, depth + 1))
    else:
        value = _eval(node, depth + 1)
    for n in reversed(spine):
        value = _apply(n.op, value, _eval(n.right, depth + 1))
    return value


def _apply(op, a, b):
    f = BINARY.get(type(op))
    if f is None:
        raise CalculatorError(f"operator {type(op).__name__} is not allowed; use + - * / // % **")
    try:
        return _real(f(a, b))
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large (overflow)") from None


def _eval_call(node: ast.Call, depth: int):
    if not isinstance(node.func, ast.Name):
        raise CalculatorError("this call is not allowed; only the functions " + ", ".join(FUNCTIONS) + " may be called")
    name = node.func.id
    if name not in FUNCTIONS:
        raise CalculatorError(f"function {name!r:.30} is not allowed; use " + ", ".join(FUNCTIONS))
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise CalculatorError(f"{name}: give plain arguments, e.g. {name}(2)")
    f, lo, hi = FUNCTIONS[name]
    if not lo <= len(node.args) <= hi:
        want = str(lo) if lo == hi else f"{lo} or {hi}"
        raise CalculatorError(f"{name} takes {want} argument{'s' if hi > 1 else ''}, not {len(node.args)}")
    args = [_eval(a, depth + 1) for a in node.args]
    try:
        return _real(f(*args))
    except CalculatorError:
        raise
    except OverflowError:
        raise CalculatorError(f"{name}: result too large (overflow)") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise CalculatorError(f"{name}: {e}") from None


# ---- entry points ---------------------------------------------------------------
_TIMES = re.compile(r"(?<=[\d.)])\s*[x×]\s*(?=[\d.(])")
_RADIX = re.compile(r"(?<![\w.])0[xXbBoO][0-9a-fA-F_]")


def normalize(expression: str) -> str:
    """Typography people and models use: × ÷ − and x between numbers for times, ^ for power."""
    if _RADIX.search(expression):
        raise CalculatorError("hexadecimal, binary and octal numbers are not supported; write decimal numbers")
    s = expression.replace("÷", "/").replace("×", "*").replace("−", "-").replace("^", "**")
    s = s.replace("·", "*").replace("\u2009", " ").replace("\u00a0", " ")
    return _TIMES.sub("*", s)


def evaluate(expression: str):
    """The value of an arithmetic expression: an int (exact) or a float. Raises CalculatorError."""
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be text, not {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"expression too long: {len(expression)} characters (the limit is {MAX_LENGTH})")
    text = normalize(expression).strip()
    if not text:
        raise CalculatorError("the expression is empty")
    # The parser nests per bracket; refuse deep bracketing before it does any work.
    depth = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth > MAX_DEPTH:
            raise CalculatorError(f"expression nested too deeply (the limit is {MAX_DEPTH} levels)")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot parse {expression.strip()[:60]!r}: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise CalculatorError("cannot parse the expression") from None
    return _eval(tree.body, 0)


def format_result(value) -> str:
    """Text for a result: integers in full, floats to 12 significant digits (0.1 + 0.2 is 0.3)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculatorError(f"not a number: {value!r:.40}")
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.12g}"
