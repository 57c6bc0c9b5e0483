"""Sol's own int8 product for x86 CPUs with AVX2 (int8_linear.cpp), compiled on this machine at first use.

Why a kernel of our own: decoding reads every weight once a token, so int8 weights should read at memory
speed. torch's int8 x float products on the CPU do not:
- fbgemm (core/model/quant.py) pads rows to blocks of 512 inputs (GPT-2's 768-input layers read a third more), and
  without AVX-512 VNNI its int16 pair sums saturate, so activations go in as three 7-bit rows;
- aten._weight_int8pack_mm is vectorised for AVX-512 BF16 only; torch._int_mm on the CPU is scalar code.
Measured on a 2-core AVX2 EPYC (torch 2.13), GPT-2 124M's 48 layer products and its head, one token: 4.4-4.8
ms here against 6.7-7.1 ms in fbgemm; the activations go in once, as 15-bit codes (fbgemm's: three rows of
7 bits), and top-1 agreement with float32 is the same (99.2 % on the trained starter and words models).

It is compiled with torch's own extension builder (a C++ compiler and ninja; about 25 s on 2 cores, once:
the library is kept in Sol's cache folder and reloaded by later runs). Where that cannot happen (no compiler,
no AVX2, another OS or CPU, SOL_INT8_KERNEL=0), available() says no, says why once, and Int8Linear uses
fbgemm as before: the kernel makes int8 faster, never required.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int8_linear.cpp")
# The product; the decode step that uses it; the greedy token and log-sum-exp of logits (core/kernels/pick.py);
# the products of GGUF blocks (core/kernels/blocks.py).
SOURCES = [SOURCE, SOURCE.with_name("int8_step.cpp"), SOURCE.with_name("pick.cpp"), SOURCE.with_name("blocks.cpp")]
HEADERS = [SOURCE.with_name("int8_linear.h"), SOURCE.with_name("exp8.h"), SOURCE.with_name("blocks.h")]
# OpenMP: at::parallel_for's threads, torch's own libgomp; F16C: float16 scales (every AVX2 CPU has it).
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
ROWS, STEP = 4, 16          # the blocked layout's tile: 4 rows x 16 inputs, one 64-byte line
_STATE: bool | None = None  # None: not tried yet in this process
_WHY = ""                   # why it is not available
_ENABLED = True             # set_enabled(False): layers packed from now on use fbgemm (tests, benchmarks)
SCHEMA = "linear(Tensor x, Tensor w, Tensor scales, Tensor? bias, int in_features, int out_features) -> Tensor"


def _declare():
    """torch.ops.sol_int8.linear's schema, declared now (cheap), so TorchScript can compile a call to it in
    every process; the compiled library brings its CPU implementation when loaded."""
    try:
        torch.ops.sol_int8.linear   # noqa: B018 (declared already: this module imported under two names)
        return None
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("sol_int8", "DEF")
        lib.define(SCHEMA)
        return lib


_LIBRARY = _declare()   # kept: the declaration lasts as long as this object


def _cache_dir() -> Path:
    env = os.environ.get("SOL_KERNEL_CACHE")
    if env:
        return Path(env)
    import platformdirs
    return Path(platformdirs.user_cache_dir("sol", appauthor=False)) / "kernels"


def _unsupported() -> str:
    """Why this machine cannot run the kernel, without compiling anything ("" where it can)."""
    if os.environ.get("SOL_INT8_KERNEL", "1").lower() in ("0", "off", "no", "false"):
        return "SOL_INT8_KERNEL is off"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"written for x86-64 Linux, this is {sys.platform} {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU lacks AVX2 (torch sees {torch.backends.cpu.get_cpu_capability()})"
    if not torch.backends.openmp.is_available():
        return "this torch is built without OpenMP"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) on the PATH"
    return ""


def likely() -> bool:
    """Whether layers packed now would use the kernel, without compiling it (for size estimates)."""
    if not _ENABLED:
        return False
    return bool(_STATE) if _STATE is not None else not _unsupported()


def available() -> bool:
    """Whether the kernel runs in this process: compiled (or found in the cache) and loaded. The first call
    may take ~25 s; a failure is said once on stderr and never retried in this process."""
    return _ENABLED and _ready()


def _ready() -> bool:
    global _STATE, _WHY
    if _STATE is None:
        _WHY = _unsupported()
        if not _WHY:
            try:
                _load()
            except Exception as e:   # a compiler error, no ninja, a read-only cache: fbgemm still works
                _WHY = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
        _STATE = not _WHY
        if _WHY and "SOL_INT8_KERNEL" not in _WHY:
            print(f"note: Sol's int8 kernel is not used ({_WHY}); int8 layers run in fbgemm", file=sys.stderr)
    return _STATE


def loaded() -> bool:
    """Whether the compiled library is in this process already (an int8 model loaded it); compiles nothing."""
    return _STATE is True


def why_not() -> str:
    """Why available() said no ("" if it said yes or was not asked)."""
    return "turned off by set_enabled(False)" if not _ENABLED else _WHY


def set_enabled(flag: bool) -> None:
    """Use the kernel for layers packed from now on (True, the default) or not (fbgemm)."""
    global _ENABLED
    _ENABLED = flag


def _load() -> None:
    from torch.utils import cpp_extension
    source = b"".join(p.read_bytes() for p in [*SOURCES, *HEADERS])
    # A name per source, flags and torch version: a library built against another torch must not be loaded.
    tag = hashlib.sha256(source + " ".join(CFLAGS).encode() + torch.__version__.encode()).hexdigest()[:12]
    name = f"sol_int8_{tag}"
    build = _cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    lib = build / f"{name}.so"
    if lib.exists():
        try:
            torch.ops.load_library(str(lib))
            return
        except OSError:   # half-written by another process, or damaged: build it (under torch's lock)
            pass
    if shutil.which("ninja") is None:   # pip's ninja package, in a virtual environment not on the PATH
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass   # torch's builder will say that ninja is missing
    print("note: compiling Sol's int8 kernel for this CPU (once, about 25 s)", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(build),
                           extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)


# ---- the blocked layout ----------------------------------------------------------------------------------
def block(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 rows in the kernel's layout: (out/4, in/16, 4, 16), zero-padded."""
    o, k = q.shape
    op, kp = -(-o // ROWS) * ROWS, -(-k // STEP) * STEP
    padded = torch.zeros(op, kp, dtype=torch.int8)
    padded[:o, :k] = q
    return padded.view(op // ROWS, ROWS, kp // STEP, STEP).transpose(1, 2).contiguous()


HUGE_PAGE = 2 << 20


def block_all(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """block() of each (out, in) int8 tensor, all in one memory region the OS is asked to back with 2 MB
    pages (transparent huge pages, madvise).

    A token streams every weight once, and with 4 KB pages that is a TLB miss and a page walk every 64
    lines: on a 2-core AVX2 EPYC, GPT-2 124M's 49 products took 4.2-5.8 ms in huge pages against 5.0-6.4
    ms in 4 KB ones (same run, alternating). One region, not one per layer: a huge page must lie whole in
    its mapping, and most layers are under 2 MB."""
    sizes = [blocked_bytes(*w.shape) for w in weights]
    region = _huge_region(sum(sizes))
    out, at = [], 0
    for w, n in zip(weights, sizes):
        b = block(w)
        view = region[at:at + n].view(b.shape)
        view.copy_(b)
        out.append(view)
        at += n
    return out


def _huge_region(n: int) -> torch.Tensor:
    """n bytes (int8) of fresh anonymous memory starting on a 2 MB boundary, advised for huge pages; the
    tensor keeps the mapping alive. Plain memory where the OS takes no such advice."""
    import mmap
    try:
        # Private: a shared anonymous mapping is shmem, which takes huge pages only where shmem does.
        m = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)   # before the first touch: pages are chosen when first written
    except (AttributeError, OSError, ValueError):
        return torch.empty(n, dtype=torch.int8)
    whole = torch.frombuffer(m, dtype=torch.int8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + n]


def unblock(w: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """block()'s inverse: the (out, in) int8 rows."""
    tiles, steps = w.shape[0], w.shape[1]
    return w.transpose(1, 2).reshape(tiles * ROWS, steps * STEP)[:out_features, :in_features].contiguous()


def blocked_bytes(out_features: int, in_features: int) -> int:
    return -(-out_features // ROWS) * ROWS * -(-in_features // STEP) * STEP


def linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
           in_features: int, out_features: int) -> torch.Tensor:
    """y = x W^T * scales + bias for blocked int8 W; x (..., in) float32, y (..., out) float32. The sizes are
    the layer's: the blocked weights are padded, so they cannot tell a wrong input size from padding."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.sol_int8.linear(x2.contiguous(), w, scales, bias, in_features, out_features)
    return y.view(*x.shape[:-1], out_features)
