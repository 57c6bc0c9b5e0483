"""Sol against llama.cpp on the same GGUF files: decode and prefill speed, load time and memory, and accuracy.

llama.cpp's own tools (llama-bench, llama-quantize, llama-server) are built once from the llama-cpp-python
sdist's vendored llama.cpp (`pip download --no-deps --no-binary :all: llama-cpp-python`, CMake, Release,
GGML_NATIVE, CPU only), cached outside the repository in ~/.cache/sol-bench/llamacpp (build/bin/).

Speed: for Qwen2.5-0.5B's shape (benchmarks/load.py's random-weight folder) and SmolLM2-360M's (llama: d_model
960, 32 layers, 15/5 heads, d_ff 2560, vocab 49152, tied, rope theta 1e5; random weights), `sol models export
--type f16` writes an F16 GGUF and llama-quantize makes each other type from it (all cached in
~/.cache/sol-bench). Per shape and type, `--reps` rounds, each llama.cpp then Sol, one process at a time:
- llama.cpp: `llama-bench -m FILE -t 2 -p 64 -n 64 -r INNER -o json` gives llama_pp and llama_tg (its pp64
  and tg64 averages; tg64 decodes from an empty cache, after its warm-up run). Load: the wall time of
  `llama-bench -m FILE -t 2 -p 0 -n 1 -r 1 --no-warmup` (process start, the model loaded (mmap, as
  llama.cpp does by default), a context made, one token decoded, exit), and that process's peak RSS
  (/usr/bin/time's %M: its mapped weights count once touched, as Sol's do).
- Sol: a fresh `python -c` child per round: import torch, torch.set_num_threads(2), RSS noted; then
  `load_model(FILE)` timed, with what `sol` does on the CPU with --dtype auto (dtype None, quantize="auto": a
  Q8_0 file stays int8, other types as core/formats/gguf_io.py reads them); then one untimed warm-up (the 64-token prompt, 2 tokens),
  then INNER times: `Engine.session(prompt)` (the 64-token prefill, timed: sol_pp) and `Engine.generate`,
  64 greedy tokens without explanations (timed: sol_tg), the median of the INNER repetitions (llama.cpp's: the
  median of llama-bench's samples_ts), so a burst of other work hits one repetition, not the figure; peak RSS
  (VmHWM) at the end: sol_rss_mb, and sol_rss_over_torch_mb = VmHWM - RSS after `import torch`.
Values are medians over the rounds; tg_ratio and pp_ratio (Sol / llama.cpp) are medians of the rounds' ratios.

    python benchmarks/llamacpp.py [--json] [--reps 3] [--inner 5] [--shapes qwen2.5-0.5b smollm2-360m]
                                  [--types F16 Q8_0 Q4_0 Q4_K_M Q5_K_M Q6_K]
                                  [--accuracy [--positions 1024] [--ggml-gelu] [--server-args ARGS]]

With --json the last line is {SHAPE: {TYPE: {"llama_tg", "sol_tg", "tg_ratio", "llama_pp", "sol_pp",
"pp_ratio", "llama_load_s", "sol_load_s", "llama_rss_mb", "sol_rss_mb", "sol_rss_over_torch_mb"}}} (tok/s,
seconds, MB), plus "accuracy" with --accuracy. Each file's tensor types are printed before its row: 896 and
960 are not multiples of 256 (K blocks), so llama-quantize falls back on every 896/960-wide row (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0): in these shapes' Q4_K_M and Q5_K_M files only ffn_down (4864 / 2560 inputs) has
K blocks (half of the layers Q6_K), the rest is Q5_0 / Q5_1 and Q8_0 (attn_v in half of the layers, the tied
token table); Q6_K is about 78 % Q8_0. llama.cpp's threads spin at every barrier, so another process on one
of the two cores slows it several times (tg64 5.4 against 35.7 tok/s in one test): note the load average
printed beside each row, and compare rows run on a quiet machine only. A side that fails gets nulls (its
error on stderr).

--accuracy: the trained words model (resources/models/words: GPT-2 layout, d_model 192, d_ff 768, vocab 4096,
context 128) exported as an F32 GGUF, quantized by llama-quantize to each type. 192 is not a multiple of 256,
so for the K types llama-quantize falls back on every 192-wide row (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0):
only ffn_down (768 inputs) gets K blocks, the token table is Q8_0; the types written are printed. Held-out
text: the tail of ../shared/data/shakespeare_complete.txt (the model trained on that file's first 90 %),
`--positions` tokens in rows of 127 (llama-server wants room for one more token in the context of 128).
Next-token argmax per position: Sol on the quantized file
(one forward over each row, loaded as `sol` loads it), Sol on the F32 file in float32, and llama.cpp's
llama-server on the quantized file (POST /completion with the token-id prefix, n_predict 1, temperature 0,
top_k 1, cache_prompt: one new token evaluated per request; n_probs 10 with post_sampling_probs false: its 10
most likely tokens and their log-probabilities from the logits). llama-server runs twice per file: with
`--server-args` (default `-fa off -ctk f32 -ctv f32`: attention in float32, as Sol's) and with its own
defaults (flash attention on the CPU, which casts K and V to float16 and sums V in float16 whatever the
cache type, so -ctk f32 alone changes nothing). "accuracy": {TYPE: {"sol_vs_llama", "sol_vs_f32",
"llama_vs_f32", "positions"}} (fractions of positions that agree; llama: the --server-args run), with an
"F32" row first: llama.cpp and Sol on the same float32 weights, the check that both sides read the file
alike; plus "sol_vs_llama_default", "llama_default_vs_llama" (llama.cpp's defaults against its float32
attention: how far llama.cpp moves its own greedy tokens), "llama_default_vs_f32"; "sol_vs_sol_jitter" (Sol
on the file against itself with its token embeddings times 1 + 1e-6 N(0, 1): what a float32-rounding-sized
difference does); and "sol_llama_dlogprob", "sol_f32_dlogprob", "llama_f32_dlogprob": mean |log p - log p'|
over llama.cpp's 10 most likely tokens per position; "sol_products_rel_diff": Sol's products fed llama.cpp's
own inputs (benchmarks/llamacpp_dump.cpp, built against the llama.cpp build's libraries, decodes the first
9 held-out tokens one at a time and writes its graph's tensors at the last; each of Sol's layers takes the
product's input, attn_norm, ffn_norm, ffn_gelu or result_norm, and its output less the bias is held to
llama.cpp's, wqkv, ffn_up, ffn_down or result_output): the largest max |Δ| / max |y| over the model's products.
Why these: Sol's block products equal llama.cpp's to float32 rounding (~1e-7 relative, layer by layer, every
type here), but a model whose activations are rounded to int8 codes at every product is chaotic: a 1e-6
nudge flips codes near a rounding boundary, each flip is a whole step (~1 % of a block's largest value), and
the layers after amplify it, so its greedy token moves wherever the top two are close (mean |Δ log p| ~0.01
between two such runs, against ~1e-6 in float32). Two implementations agree on a quantized model only as far
as their float work agrees: ggml's GELU (a float16 table, `--ggml-gelu` for Sol to use it too) and flash
attention's float16 K and V are such differences.
`--shapes` with no names skips the speed rows (accuracy only).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = Path(os.environ.get("SOL_BENCH_CACHE", Path.home() / ".cache" / "sol-bench"))
LLAMA = CACHE / "llamacpp"
BUILD = LLAMA / "build"
LLAMA_CPP_PYTHON = "0.3.36"   # the sdist these CMake options were written for
TOOLS = ("llama-bench", "llama-quantize", "llama-server")
THREADS = 2
N_PROMPT = N_GEN = 64
TYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
DATA = ROOT.parent / "shared" / "data" / "shakespeare_complete.txt"
WORDS = ROOT / "resources" / "models" / "words"
SERVER_ARGS: list[str] = []   # --server-args
FLOAT_ATTENTION = "-fa off -ctk f32 -ctv f32"
DUMP_SRC = ROOT / "benchmarks" / "llamacpp_dump.cpp"
DUMP_STEP = 8   # the decode step whose tensors the products check reads (8 earlier tokens in the cache)
TOP = 10   # llama-server's most likely tokens per position (n_probs), for the log-probability differences
TIMEOUT = 3600   # one child: low-bit files are decoded to float32 by Sol for now, which can take minutes

# Hugging Face configs of the two shapes (random weights, written by transformers in float32)
SHAPES = {
    "qwen2.5-0.5b": None,   # benchmarks/load.py's folder: load.SHAPE, Qwen2ForCausalLM
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
}
KEYS = ("llama_tg", "sol_tg", "tg_ratio", "llama_pp", "sol_pp", "pp_ratio", "llama_load_s", "sol_load_s",
        "llama_rss_mb", "sol_rss_mb", "sol_rss_over_torch_mb")

SOL_CHILD = r'''
import json, sys, time
import torch
torch.set_num_threads(%(threads)d)
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
base = status_mb("VmRSS")
path, n_prompt, n_gen, inner = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from sol.core.devices import pick_dtype
from sol.core.formats.checkpoint import load_model
from sol.core.generation.engine import DoneEvent, Engine, GenerationParams
from sol.core.generation.sampling import SamplingParams
device = torch.device("cpu")
t0 = time.perf_counter()
# What `sol` does with --dtype auto on the CPU (core/commands/common.py): the weights' own dtype, and a Q8_0
# GGUF kept int8.
lm = load_model(path, device=device, dtype=pick_dtype("auto", device), quantize="auto")
load_s = time.perf_counter() - t0
engine = Engine(lm.model, lm.tokenizer)
limit = lm.model.vocab_limit or lm.config.vocab_size
g = torch.Generator().manual_seed(0)
prompt = torch.randint(0, limit, (n_prompt,), generator=g).tolist()
def once(n):
    params = GenerationParams(max_tokens=n, sampling=SamplingParams(temperature=0), explain=False)
    t = time.perf_counter()
    session = engine.session(prompt)          # the prefill
    pp_s = time.perf_counter() - t
    t = time.perf_counter()
    done = None
    for ev in engine.generate(session, params):
        if isinstance(ev, DoneEvent):
            done = ev
    tg_s = time.perf_counter() - t
    return pp_s, tg_s, done.completion_tokens
once(2)   # warm-up, as llama-bench warms up
pp, tg = [], []
for _ in range(inner):
    pp_s, tg_s, n = once(n_gen)
    if n != n_gen:
        raise SystemExit(f"generated {n} tokens, not {n_gen}")
    pp.append(n_prompt / pp_s)
    tg.append(n / tg_s)
peak = status_mb("VmHWM")
pp.sort(), tg.sort()
print(json.dumps({"load_s": load_s, "pp": pp[len(pp) // 2], "tg": tg[len(tg) // 2], "rss_mb": peak,
                  "rss_over_torch_mb": peak - base, "quantization": lm.meta.get("quantization")}))
'''

ACC_CHILD = r"""
import json, os, sys
import numpy as np
import torch
torch.set_num_threads(%(threads)d)
if os.environ.get("SOL_BENCH_GGML_GELU"):   # --ggml-gelu: GELU as ggml's float16 table gives it (vec.h)
    import ctypes
    import torch.nn.functional as F
    libm = ctypes.CDLL("libm.so.6")
    libm.tanhf.restype, libm.tanhf.argtypes = ctypes.c_float, [ctypes.c_float]
    f = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):   # ggml_gelu_f32 in float32, tanhf from libm, as ggml fills its table
        inner = (np.float32(0.7978845608028654) * f) * (np.float32(1) + (np.float32(0.044715) * f) * f)
        th = np.array([libm.tanhf(float(v)) for v in inner], dtype=np.float32)
        table = torch.from_numpy(((np.float32(0.5) * f) * (np.float32(1) + th)).astype(np.float16).astype(np.float32))
    def table_gelu(x, approximate="none"):
        y = table[x.half().view(torch.int16).long() & 0xffff]
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))
    F.gelu = table_gelu
from sol.core.formats.checkpoint import load_model
text_path, n_pos, f32, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5]
files = json.loads(sys.argv[4])
ref = load_model(f32, dtype=torch.float32)
row = ref.config.context - 1   # llama-server refuses a prompt as long as the context (it needs room for the answer)
text = open(text_path, encoding="utf-8").read()
ids = ref.tokenizer.encode_ids(text[-len(text) // 20:], add_special_tokens=False)   # the last 5 %%
ids = ids[-n_pos:][: n_pos // row * row]
rows = torch.tensor(ids).view(-1, row)
def forward(lm, name):
    # greedy tokens; the log-probabilities go to out_dir/name.npy (float32, positions x vocab)
    with torch.inference_mode():
        y = lm.model(rows).float()
    np.save(os.path.join(out_dir, name + ".npy"), torch.log_softmax(y, -1).flatten(0, 1).numpy())
    return y.argmax(-1).flatten().tolist()
def jittered(lm):
    # the same file, its token embeddings times (1 + 1e-6 N(0, 1)): a float32-rounding-sized difference
    g = torch.Generator().manual_seed(0)
    embed = lm.model.embed
    plain = embed.forward
    embed.forward = lambda idx: (lambda e: e * (1 + 1e-6 * torch.randn(e.shape, generator=g)))(plain(idx))
    try:
        with torch.inference_mode():
            return lm.model(rows).argmax(-1).flatten().tolist()
    finally:
        embed.forward = plain
out = {"row": row, "ids": ids, "f32": forward(ref, "f32"), "jitter": {}}
del ref
for name, path in files.items():
    try:
        lm = load_model(path, dtype=None, quantize="auto")   # as `sol` loads it (--dtype auto)
        out[name] = forward(lm, name)
        out["jitter"][name] = jittered(lm)
        del lm
    except Exception as e:
        print(f"sol on {name}: {type(e).__name__}: {e}", file=sys.stderr)
        out[name] = None
print(json.dumps(out))
"""


PRODUCTS_CHILD = r"""
import json, sys
import numpy as np
import torch
from sol.core.formats.checkpoint import load_model
tensors_path, model_path = sys.argv[1], sys.argv[2]
raw = open(tensors_path, "rb").read()
found, i = {}, 0
while i < len(raw):   # llamacpp_dump.cpp's records: name, NUL, int64 ne[4], float32 data
    j = raw.index(b"\0", i)
    n = int(np.prod(np.frombuffer(raw[j + 1:j + 33], dtype=np.int64)))
    found.setdefault(raw[i:j].decode(), np.frombuffer(raw[j + 33:j + 33 + 4 * n], dtype=np.float32))
    i = j + 33 + 4 * n
model = load_model(model_path, dtype=None, quantize="auto").model
pairs = [("result_norm", "result_output", model.lm_head)]
for k, block in enumerate(model.blocks):   # GPT-2's products: llama.cpp's input and output names
    pairs += [(f"attn_norm-{k}", f"wqkv-{k}", block.attn.qkv), (f"ffn_norm-{k}", f"ffn_up-{k}", block.mlp.fc),
              (f"ffn_gelu-{k}", f"ffn_down-{k}", block.mlp.proj)]
worst, types = 0.0, set()
for x_name, y_name, layer in pairs:
    with torch.inference_mode():
        y = layer(torch.from_numpy(found[x_name].copy())[None])[0]
        if layer.bias is not None:
            y = y - layer.bias
    want = found[y_name].astype(np.float64)
    worst = max(worst, float(np.abs(y.numpy() - want).max() / np.abs(want).max()))
    types.update(getattr(layer, "type_names", ["float32"]))
print(json.dumps({"worst": worst, "products": len(pairs), "types": sorted(types)}))
"""

def log(*a) -> None:
    print(*a, flush=True)


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- llama.cpp's tools -------------------------------------------------------
def llama_source() -> Path:
    found = sorted(LLAMA.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    LLAMA.mkdir(parents=True, exist_ok=True)
    log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist into {LLAMA}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(LLAMA)], check=True)
    tar = sorted(LLAMA.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(tar) as t:
        t.extractall(LLAMA)
    return sorted(LLAMA.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def llama_tools(need=TOOLS) -> Path:
    """build/bin with llama.cpp's tools, built first where they are missing (about 40 minutes on 2 cores)."""
    bin_dir = BUILD / "bin"
    if all((bin_dir / t).is_file() for t in need):
        return bin_dir
    src = llama_source()
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    logf = LLAMA / "build.log"
    log(f"building llama.cpp ({src}) into {BUILD}, log in {logf}")
    t = time.perf_counter()
    with open(logf, "a") as f:
        if not (BUILD / "CMakeCache.txt").is_file():
            subprocess.run(["cmake", "-S", str(src), "-B", str(BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release",
                            "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
                            "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF"],
                           check=True, stdout=f, stderr=subprocess.STDOUT)
        subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                       check=True, stdout=f, stderr=subprocess.STDOUT)
    log(f"built in {time.perf_counter() - t:.0f} s")
    return bin_dir


def run_measured(cmd: list[str], timeout: float) -> tuple[float, float, str, str]:
    """(wall seconds, peak RSS in MB of that process, stdout, stderr); raises on failure.

    The peak comes from /usr/bin/time (%M): a child of this Python process would report at least this
    process's own RSS (Linux carries the forking image's high-water mark across exec)."""
    timer = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        full = [timer, "-f", "%M", "-o", rss.name, *cmd] if timer else cmd
        t = time.perf_counter()
        p = subprocess.Popen(full, stdout=out, stderr=err, start_new_session=True)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)   # the timer and the tool under it
            p.wait()
            raise RuntimeError(f"{Path(cmd[0]).name} ran past {timeout} s") from None
        wall = time.perf_counter() - t
        out.seek(0), err.seek(0)
        so, se = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{se[-2000:]}")
        if timer:
            peak_mb = int(rss.read().split()[-1]) / 1024
        else:   # no /usr/bin/time: this process's children's peak (an upper bound)
            import resource
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, peak_mb, so, se


def llama_bench(bin_dir: Path, path: Path, inner: int) -> dict:
    _, _, out, _ = run_measured([str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(THREADS),
                                 "-p", str(N_PROMPT), "-n", str(N_GEN), "-r", str(inner), "-o", "json"], TIMEOUT)
    rows = json.loads(out[out.index("["):])
    def ts(r):   # the median of its repetitions: a burst of other work on the host hits one, not the figure
        return statistics.median(r.get("samples_ts") or [r["avg_ts"]])
    pp = next(ts(r) for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(ts(r) for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"pp": pp, "tg": tg}


def llama_load(bin_dir: Path, path: Path) -> dict:
    """A llama.cpp process that loads the file and decodes one token (llama-bench tg1, one repetition, no
    warm-up): its wall time from launch to exit and its peak RSS."""
    wall, rss, _, _ = run_measured([str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(THREADS), "-p", "0",
                                    "-n", "1", "-r", "1", "--no-warmup", "-o", "json"], TIMEOUT)
    return {"load_s": wall, "rss_mb": rss}


def sol_run(path: Path, inner: int) -> dict:
    r = subprocess.run([sys.executable, "-c", SOL_CHILD % {"threads": THREADS}, str(path), str(N_PROMPT),
                        str(N_GEN), str(inner)], capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        raise RuntimeError(f"Sol's child exited {r.returncode}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- model files --------------------------------------------------------------
def write_hf(shape: str) -> Path:
    """The shape's Hugging Face folder (float32, random weights), cached."""
    import load   # benchmarks/load.py: the Qwen2.5-0.5B-shaped folder and its byte-level tokenizer
    if SHAPES[shape] is None:
        return load.write_model("float32")
    out = CACHE / f"{shape}-shape-float32"
    if (out / "config.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).float()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok = Tokenizer(models.BPE(vocab={chr(i): i for i in range(33, 127)}, merges=[]))   # as load.py's
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp / "tokenizer.json"))
    tmp.rename(out)
    return out


def sol_export(src: Path, kind: str, out: Path) -> Path:
    if not out.is_file():
        tmp = out.with_name(out.stem + ".tmp.gguf")
        subprocess.run([sys.executable, "-m", "sol.core.cli", "models", "export", str(src), "--format", "gguf",
                        "--out", str(tmp), "--type", kind], check=True, timeout=TIMEOUT, stdout=subprocess.DEVNULL)
        tmp.rename(out)
    return out


def quantized(bin_dir: Path, src: Path, kind: str, out: Path) -> Path:
    """llama-quantize's `kind` of src (an F16 or F32 GGUF), cached; what it said is kept beside it (.log)."""
    if not out.is_file():
        tmp = out.with_name(out.stem + ".tmp.gguf")
        r = subprocess.run([str(bin_dir / "llama-quantize"), str(src), str(tmp), kind, str(THREADS)],
                           capture_output=True, text=True, timeout=TIMEOUT)
        out.with_suffix(".log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"llama-quantize {kind} exited {r.returncode}:\n{r.stderr[-2000:]}")
        tmp.rename(out)
    return out


def tensor_types(path: Path) -> str:
    """How many tensors of each type the file holds, and how many of its weights: "Q5_0 144 (62%), ..."."""
    from sol.core.formats.gguf_file import GGUFFile   # the header alone, read in one pass
    counts: dict[str, list[int]] = {}
    for t in GGUFFile(path).tensors:
        c = counts.setdefault(t.tensor_type.name, [0, 0])
        c[0] += 1
        c[1] += int(t.n_elements)
    total = sum(c[1] for c in counts.values())
    return ", ".join(f"{k} {c[0]} ({100 * c[1] / total:.0f}%)" for k, c in sorted(counts.items(), key=lambda x: -x[1][1]))


def shape_files(bin_dir: Path, shape: str, types: list[str]) -> dict[str, Path]:
    f16 = sol_export(write_hf(shape), "f16", CACHE / f"{shape}-shape-f16.gguf")
    return {t: f16 if t == "F16" else quantized(bin_dir, f16, t, CACHE / f"{shape}-shape-f16-{t}.gguf")
            for t in types}


# ---- speed ----------------------------------------------------------------------
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rnd(x, digits):
    return None if x is None else round(x, digits) if digits else round(x)


def bench_row(bin_dir: Path, path: Path, reps: int, inner: int) -> dict:
    rounds = []
    for r in range(reps):   # llama.cpp, Sol, llama.cpp, Sol, ...: one process at a time
        row = {}
        try:
            row.update({f"llama_{k}": v for k, v in llama_bench(bin_dir, path, inner).items()})
            row.update({f"llama_{k}": v for k, v in llama_load(bin_dir, path).items()})
        except Exception as e:
            warn(f"llama.cpp on {path.name}: {e}")
        try:
            row.update({f"sol_{k}": v for k, v in sol_run(path, inner).items()})
        except Exception as e:
            warn(f"Sol on {path.name}: {e}")
        for k in ("tg", "pp"):
            a, b = row.get(f"sol_{k}"), row.get(f"llama_{k}")
            row[f"{k}_ratio"] = a / b if a is not None and b else None
        log(f"  round {r + 1}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in row.items()))
        rounds.append(row)
    med = {k: median(x.get(k) for x in rounds) for k in
           ("llama_tg", "sol_tg", "tg_ratio", "llama_pp", "sol_pp", "pp_ratio", "llama_load_s", "sol_load_s",
            "llama_rss_mb", "sol_rss_mb", "sol_rss_over_torch_mb")}
    digits = {"tg_ratio": 2, "pp_ratio": 2, "llama_load_s": 2, "sol_load_s": 2, "llama_rss_mb": 0,
              "sol_rss_mb": 0, "sol_rss_over_torch_mb": 0}
    return {k: rnd(med[k], digits.get(k, 1)) for k in KEYS}


# ---- accuracy -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def llama_server_tokens(bin_dir: Path, path: Path, ids: list[int], row: int, server_args: list[str]):
    """llama.cpp's greedy next token after every prefix of each row of `row` ids, from llama-server, with its
    10 most likely tokens and their log-probabilities (from the logits, before sampling): (tokens, top ids,
    top log-probabilities)."""
    port = free_port()
    logf = tempfile.TemporaryFile()
    server = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(path), "-t", str(THREADS), "-c", str(row + 1),
                               "-np", "1", "--host", "127.0.0.1", "--port", str(port), *server_args],
                              stdout=logf, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                logf.seek(0)
                raise RuntimeError(f"llama-server exited {server.returncode}:\n{logf.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError("llama-server did not become healthy in 300 s")
            time.sleep(0.2)
        out, top_ids, top_lp = [], [], []
        for r0 in range(0, len(ids), row):
            for p in range(row):
                res = post(base + "/completion", {
                    "prompt": ids[r0:r0 + p + 1], "n_predict": 1, "n_probs": TOP, "post_sampling_probs": False,
                    "temperature": 0, "top_k": 1,
                    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0,
                    "cache_prompt": True, "return_tokens": True})
                probs = res.get("completion_probabilities") or []
                toks = res.get("tokens") or [c["id"] for c in probs]
                if not toks:
                    raise RuntimeError(f"llama-server gave no token: {json.dumps(res)[:500]}")
                out.append(int(toks[0]))
                top = probs[0].get("top_logprobs") if probs else None
                if top and len(top) == TOP:
                    top_ids.append([int(c["id"]) for c in top])
                    top_lp.append([float(c["logprob"]) for c in top])
        complete = len(top_ids) == len(out)
        return out, top_ids if complete else None, top_lp if complete else None
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        logf.close()


def dump_tool() -> Path:
    """benchmarks/llamacpp_dump.cpp built against the llama.cpp build's static libraries (seconds), cached."""
    exe = BUILD / "bin" / "sol-llama-dump"
    if exe.is_file() and exe.stat().st_mtime >= DUMP_SRC.stat().st_mtime:
        return exe
    src = llama_source()
    libs = [BUILD / "src" / "libllama.a", *(BUILD / "ggml" / "src" / f"lib{n}.a" for n in ("ggml", "ggml-cpu", "ggml-base"))]
    r = subprocess.run([os.environ.get("CXX", "g++"), "-O2", "-std=c++17", f"-I{src / 'include'}",
                        f"-I{src / 'ggml' / 'include'}", str(DUMP_SRC), *map(str, libs), "-fopenmp", "-lpthread", "-ldl",
                        "-o", str(exe)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"building {DUMP_SRC.name} failed:\n{r.stderr[-2000:]}")
    return exe


def products_check(path: Path, ids: list[int]) -> dict:
    """Sol's products fed llama.cpp's own inputs: llama.cpp decodes ids[:DUMP_STEP + 1] one at a time (float32
    attention) and writes its graph's tensors at the last step; Sol's layers take each product's input
    (attn_norm, ffn_norm, ffn_gelu, result_norm) and their outputs, less the bias, are held to llama.cpp's
    (wqkv, ffn_up, ffn_down, result_output): {"worst": max |Δ| / max |y| over the products, ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        id_file, out = Path(tmp) / "ids.txt", Path(tmp) / "tensors.bin"
        id_file.write_text(" ".join(map(str, ids[:DUMP_STEP + 1])))
        subprocess.run([str(dump_tool()), str(path), str(id_file), str(out), str(DUMP_STEP), "0", "f32"], check=True,
                       capture_output=True, timeout=600)
        r = subprocess.run([sys.executable, "-c", PRODUCTS_CHILD, str(out), str(path)], capture_output=True, text=True,
                           timeout=TIMEOUT, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"Sol's products child exited {r.returncode}:\n{r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

def agree(a, b):
    if a is None or b is None:
        return None
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4)


def dlogprob(a, b, top_ids) -> float | None:
    """Mean |log p_a - log p_b| over llama.cpp's TOP tokens at each position; a, b: (positions, vocab) arrays
    or (positions, TOP) arrays already taken at top_ids."""
    import numpy as np
    if a is None or b is None or top_ids is None:
        return None
    ids = np.asarray(top_ids)

    def take(x):
        x = np.asarray(x, dtype=np.float64)
        return x if x.shape == ids.shape else np.take_along_axis(x, ids, 1)
    return round(float(np.abs(take(a) - take(b)).mean()), 5)


def accuracy(bin_dir: Path, types: list[str], positions: int) -> dict:
    import numpy as np
    st = WORDS / "model.safetensors"
    tag = hashlib.sha256(f"{st.stat().st_size}:{st.stat().st_mtime_ns}".encode()).hexdigest()[:8]
    f32 = sol_export(WORDS, "f32", CACHE / f"words-{tag}-f32.gguf")
    files = {"F32": f32}
    for t in types:
        try:
            files[t] = quantized(bin_dir, f32, t, CACHE / f"words-{tag}-f32-{t}.gguf")
        except Exception as e:
            warn(f"words {t}: {e}")
    for t, f in files.items():
        log(f"words {t}: {f.name}: {tensor_types(f)}")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", ACC_CHILD % {"threads": THREADS}, str(DATA), str(positions),
                            str(f32), json.dumps({t: str(f) for t, f in files.items()}), tmp],
                           capture_output=True, text=True, timeout=TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"Sol's accuracy child exited {r.returncode}:\n{r.stderr[-3000:]}")
        if r.stderr.strip():
            warn(r.stderr.strip()[-3000:])
        sol = json.loads(r.stdout.strip().splitlines()[-1])
        ids, row, ref = sol["ids"], sol["row"], sol["f32"]
        ref_lp = np.load(Path(tmp) / "f32.npy")
        res = {}
        for t, f in files.items():
            runs = {}
            for which, args in (("llama", SERVER_ARGS), ("default", [])):
                if which == "default" and not SERVER_ARGS:
                    continue
                try:
                    runs[which] = llama_server_tokens(bin_dir, f, ids, row, args)
                except Exception as e:
                    warn(f"llama-server {' '.join(args)} on {f.name}: {e}")
                    runs[which] = (None, None, None)
            llama, top_ids, top_lp = runs["llama"]
            sol_lp = np.load(Path(tmp) / f"{t}.npy") if sol[t] is not None else None
            res[t] = {"sol_vs_llama": agree(sol[t], llama), "sol_vs_f32": agree(sol[t], ref),
                      "llama_vs_f32": agree(llama, ref), "positions": len(ids),
                      "sol_vs_sol_jitter": agree(sol[t], sol["jitter"].get(t)),
                      "sol_llama_dlogprob": dlogprob(sol_lp, top_lp, top_ids),
                      "sol_f32_dlogprob": dlogprob(sol_lp, ref_lp, top_ids),
                      "llama_f32_dlogprob": dlogprob(np.asarray(top_lp) if top_lp else None, ref_lp, top_ids)}
            try:
                check = products_check(f, ids)
                res[t]["sol_products_rel_diff"] = float(f"{check['worst']:.2g}")
            except Exception as e:
                warn(f"products check on {f.name}: {e}")
                res[t]["sol_products_rel_diff"] = None
            if "default" in runs:
                default = runs["default"][0]
                res[t].update({"sol_vs_llama_default": agree(sol[t], default),
                               "llama_default_vs_llama": agree(default, llama),
                               "llama_default_vs_f32": agree(default, ref)})
            del sol_lp
            log(f"accuracy {t}: {res[t]}")
    return res


# ---- output ---------------------------------------------------------------------
def markdown(results: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:g}"
    lines = ["| shape | type | llama tg | Sol tg | tg ratio | llama pp | Sol pp | pp ratio | llama load s | Sol load s "
             "| llama RSS MB | Sol RSS MB | Sol over torch MB |", "|" + "---|" * 13]
    for shape, rows in results.items():
        if shape == "accuracy":
            continue
        for t, v in rows.items():
            lines.append(f"| {shape} | {t} | " + " | ".join(f(v[k]) for k in KEYS) + " |")
    if "accuracy" in results:
        cols = [("sol_vs_llama", "Sol vs llama.cpp"), ("sol_vs_f32", "Sol vs Sol f32"),
                ("llama_vs_f32", "llama.cpp vs Sol f32"), ("sol_vs_llama_default", "Sol vs llama.cpp (its defaults)"),
                ("llama_default_vs_llama", "llama.cpp (defaults) vs llama.cpp"),
                ("sol_vs_sol_jitter", "Sol vs Sol (1e-6 jitter)"), ("sol_llama_dlogprob", "mean Δ log p: Sol, llama.cpp"),
                ("sol_f32_dlogprob", "Sol, Sol f32"), ("llama_f32_dlogprob", "llama.cpp, Sol f32"),
                ("sol_products_rel_diff", "Sol's products on llama.cpp's inputs"), ("positions", "positions")]
        lines += ["", "| words model | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for t, v in results["accuracy"].items():
            lines.append(f"| {t} | " + " | ".join(f(v.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--reps", type=int, default=3, help="alternating rounds per row (medians over them)")
    p.add_argument("--inner", type=int, default=5, help="repetitions inside each round (llama-bench -r, and Sol's)")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--types", nargs="+", default=list(TYPES), type=str.upper)
    p.add_argument("--accuracy", action="store_true", help="also the words model's greedy agreement per type")
    p.add_argument("--positions", type=int, default=1024, help="held-out positions for --accuracy")
    p.add_argument("--ggml-gelu", action="store_true", help="--accuracy with Sol's GELU looked up in ggml's float16 "
                   "table, as llama.cpp's CPU backend computes it (a diagnostic: how much of the disagreement GELU makes)")
    p.add_argument("--server-args", default=FLOAT_ATTENTION, help="llama-server arguments for --accuracy's main "
                   f"comparison (default '{FLOAT_ATTENTION}': attention in float32, as Sol's; llama.cpp's own default, "
                   "flash attention, casts K and V to float16 whatever the cache type, and is compared as well); "
                   "'' for llama-server's defaults alone")
    args = p.parse_args()
    SERVER_ARGS[:] = args.server_args.split()
    if args.ggml_gelu:
        os.environ["SOL_BENCH_GGML_GELU"] = "1"
    import side_by_side
    side_by_side.sol_env()   # where `sol` is not importable, the repository as the `sol` package (children too)
    bin_dir = llama_tools()
    load = os.getloadavg()[0]
    log(f"llama.cpp tools: {bin_dir}; load average {load:.2f}")
    if args.shapes and load > 1.0:
        warn(f"load average {load:.2f}: llama.cpp's spinning threads lose several times their speed when another "
             "process takes a core; these timings are only good on a quiet machine")
    results: dict = {}
    for shape in args.shapes:
        files = shape_files(bin_dir, shape, args.types)
        results[shape] = {}
        for t, path in files.items():
            log(f"{shape} {t}: {path.name} ({path.stat().st_size / 2**20:.0f} MB): {tensor_types(path)}")
            results[shape][t] = bench_row(bin_dir, path, args.reps, args.inner)
            log(f"{shape} {t}: {results[shape][t]}  (load average {os.getloadavg()[0]:.2f})")
    if args.accuracy:
        results["accuracy"] = accuracy(bin_dir, args.types, args.positions)
    print(json.dumps(results) if args.json else markdown(results), flush=True)


if __name__ == "__main__":
    main()
