"""What the training panel needs that is not Qt: the command line, the event parser,
data previews (first records; one (B, T) batch as in the book's Fig. 75) and the lineage tree."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Which flag names the data file for each built-in stage, and whether it starts from a model.
STAGES = {
    "pretrain": {"data_flag": "--corpus", "base_flag": None, "data": "text file or folder"},
    "sft": {"data_flag": "--data", "base_flag": "--model", "data": 'chat JSONL: {"messages": [...]}'},
    "reward": {"data_flag": "--data", "base_flag": "--model", "data": 'preference JSONL: {"prompt","chosen","rejected"}'},
    "rl": {"data_flag": "--prompts", "base_flag": "--model", "data": 'prompts JSONL: {"prompt", "answer"}'},
}
PREVIEW_CHARS = 1 << 16    # read at most this much of each file for a preview


def command(stage: str, out: str, data: str | None = None, base: str | None = None, options: dict | None = None,
            resume: bool = False) -> list[str]:
    """argv for `sol train STAGE ... --events -`, run with this Python."""
    spec = STAGES.get(stage, {"data_flag": "--data", "base_flag": "--model"})
    argv = [sys.executable, "-m", "sol.core.cli", "train", stage, "--out", str(out)]
    if data:
        argv += [spec["data_flag"], str(data)]
    if base and spec["base_flag"]:
        argv += [spec["base_flag"], str(base)]
    for k, v in (options or {}).items():
        if v is None or v == "" or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    if resume:
        argv.append("--resume")
    return argv + ["--events", "-"]


def parse_line(line: str) -> dict | None:
    """One JSON event per line; anything else (a warning on stdout) is log text, not an event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    return ev if isinstance(ev, dict) and "type" in ev else None


def fmt_eta(s: float | None) -> str:
    if s is None:
        return "—"
    s = int(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


# ---- data previews ----------------------------------------------------------
def preview_records(path: str, stage: str, n: int = 3) -> list[dict]:
    """The first n records of a JSONL file, validated the way training will read it (raises SolError)."""
    from sol.core.data import jsonl
    reader = {"sft": jsonl.read_chat, "reward": jsonl.read_prefs, "rl": jsonl.read_prompts}.get(stage)
    if reader is None:
        return [obj for _, obj in jsonl.read_lines(path)[:n]]
    records = reader(path)
    return [r if isinstance(r, dict) else {"messages": r} for r in records[:n]]


@dataclass
class BatchPreview:
    rows: list[list[tuple[str, bool]]]          # B rows of T (token text, is end-of-text)
    batch: int
    context: int
    documents: int
    tokens: int
    files: list[str] = field(default_factory=list)


def batch_preview(corpus: str, tokenizer: str = "char", batch: int = 4, context: int = 64) -> BatchPreview:
    """One (B, T) batch as training cuts it: documents joined with <|endoftext|>, windows at offsets
    chosen so the first rows straddle a document boundary (the book's Fig. 75)."""
    from sol.core.data.corpus import corpus_files
    from sol.core.formats.checkpoint import load_tokenizer
    from sol.core.formats.tokenizer import EOT
    files = corpus_files([corpus])[:16]
    texts = [Path(f).open(encoding="utf-8", errors="replace").read(PREVIEW_CHARS) for f in files]
    if tokenizer.startswith(("char", "bpe")):
        # A preview needs the shape of the data, not the trained vocabulary: characters are exact for
        # `char` and a fair stand-in for `bpe:N` (which would take seconds to train).
        ids_of = lambda t: list(t)  # noqa: E731
        text_of = lambda i: i       # noqa: E731
        eot = EOT
    else:
        tok = load_tokenizer(tokenizer)
        ids_of = lambda t: tok.encode_ids(t, add_special_tokens=False)  # noqa: E731
        text_of = lambda i: tok.decode([i])  # noqa: E731
        eot = tok.token_to_id(EOT) if tok.token_to_id(EOT) is not None else tok.eos_id
    stream: list = []
    bounds = []
    for t in texts:
        stream += ids_of(t)
        bounds.append(len(stream))
        stream.append(eot)
    T = max(1, min(context, len(stream) - 1))
    offsets = []
    for b in bounds[:batch]:          # windows around document ends first
        offsets.append(max(0, min(b - T // 2, len(stream) - T)))
    step = max(1, (len(stream) - T) // max(1, batch))
    o = 0
    while len(offsets) < batch:
        offsets.append(min(o, max(0, len(stream) - T)))
        o += step
    rows = [[(text_of(i) if i != eot else EOT, i == eot) for i in stream[o:o + T]] for o in offsets[:batch]]
    return BatchPreview(rows, batch, T, len(files), len(stream), [str(f) for f in files])


# ---- lineage ----------------------------------------------------------------
@dataclass
class Node:
    name: str
    path: str
    stage: str
    parent: str | None
    children: list["Node"] = field(default_factory=list)
    evals: str = ""          # its kept `sol eval` results, one short line (the Evaluate panel's)


def eval_line(path: str) -> str:
    """A model's kept evaluation results in a few words: "perplexity 12.3 (tiny) · choice 0.62 (arith)"."""
    from sol.core.evaluate.results import read
    metric = {"perplexity": ("perplexity", "{:.2f}"), "choice": ("accuracy", "{:.3f}"), "exact": ("exact", "{:.3f}")}
    parts = []
    for r in read(path):
        key, fmt = metric.get(r.get("task"), (None, ""))
        if key and isinstance(r.get(key), (int, float)):
            parts.append(f"{r['task']} {fmt.format(r[key])} ({Path(str(r.get('data', ''))).stem})")
    return " · ".join(parts)


def lineage(models: list[dict]) -> list[Node]:
    """Trees of models linked by sol.json's `parent` (a path or a name): base → SFT → RM → RL."""
    from sol.core.formats.loaded import read_json
    nodes = []
    for m in models:
        meta = {}
        if (Path(m["path"]) / "sol.json").is_file():
            try:
                meta = read_json(Path(m["path"]) / "sol.json")
            except Exception:
                meta = {}
        parent = meta.get("parent")
        if isinstance(parent, dict):
            parent = parent.get("path") or parent.get("name")
        nodes.append(Node(m["name"], m["path"], meta.get("stage", "base" if m.get("format") == "sol" else "imported"),
                          str(parent) if parent else None, evals=eval_line(m["path"])))
    by_key = {}
    for n in nodes:
        by_key[n.name] = n
        by_key[str(Path(n.path).resolve())] = n
    roots = []
    for n in nodes:
        p = None
        if n.parent:
            p = by_key.get(n.parent) or by_key.get(str(Path(n.parent).expanduser().resolve()))
        (p.children if p is not None and p is not n else roots).append(n)
    return roots


# ---- a LoRA fine-tune's memory and time, before it starts --------------------------------------------------
ADAPTER_BYTES_PER_PARAM = 16   # float32 weight, its gradient, AdamW's two moments
TRAIN_EFFICIENCY = 0.4         # the share of a plain matrix product's speed a training step reaches, at best
# Python, torch and the data before any model (measured: `import torch` and Sol's trainer, ~0.23 GB resident, and
# a starter-sized run's fixed part, ~0.3 GB in all, on x86-64 Linux)
RUNTIME_BYTES = 300 * 2 ** 20


@dataclass
class LoraEstimate:
    base_params: int
    adapter_params: int
    base_bytes: int             # the frozen model: float32 4 bytes a parameter, int8 about 1
    adapter_bytes: int          # adapter parameters x 16 bytes
    activation_bytes: int       # what backpropagation keeps for one batch x seq_len tokens (a rough count)
    runtime_bytes: int          # Python and torch themselves
    batch: int
    seq_len: int
    seq_from: str               # where seq_len comes from: the data's longest conversation, or the context
    flops_per_token: float
    tokens_per_s: float | None = None   # compute-bound: from this machine's matrix-product speed
    steps: int = 0

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + self.adapter_bytes + self.activation_bytes + self.runtime_bytes

    @property
    def seconds(self) -> float | None:
        if not self.tokens_per_s:
            return None
        return self.steps * self.batch * self.seq_len / self.tokens_per_s


def adapter_parameters(cfg, r: int, targets: str) -> int:
    """How many parameters a rank-r adapter on `targets` (as --lora-targets takes them) has on this model:
    r x (inputs + outputs) for each adapted projection of every block. Raises SolError for unknown targets."""
    from sol.core.errors import SolError
    from sol.core.model import lora
    if r < 1:
        raise SolError(f"rank {r}: must be at least 1 (16 is usual)")
    chosen = lora.expand_targets(cfg, [t for t in targets.split(",")])
    q = cfg.n_head * cfg.head_dim
    inputs = {"attn.qkv": cfg.d_model, "attn.proj": q, "mlp.fc": cfg.d_model, "mlp.proj": cfg.d_ff}
    n = 0
    for block in range(cfg.n_layer):
        for name, (_, parts) in lora.projections(cfg, block).items():
            fan_in = inputs[name.split(".", 2)[2]]
            n += sum(r * (fan_in + size) for part, size in parts if part in chosen)
    return n


def longest_conversation(model_path: str, data: str, context: int, limit: int = 2000) -> int | None:
    """Tokens in the longest of the first `limit` conversations of a chat JSONL, by the model's tokenizer
    (contents only, plus a few tokens a message for its role markers), cut to the context; None if unreadable."""
    from sol.core.data import jsonl
    from sol.core.formats.checkpoint import load_tokenizer
    try:
        convs = jsonl.read_chat(data)[:limit]
        tok = load_tokenizer(model_path)
    except Exception:   # the data preview and the run say what is wrong with the file
        return None
    longest = 0
    for conv in convs:
        messages = conv if isinstance(conv, list) else conv.get("messages", [])
        n = sum(len(tok.encode_ids(str(m.get("content") or ""), add_special_tokens=False)) + 4 for m in messages)
        longest = max(longest, n)
    return min(longest, context) if longest else None


def matmul_flops(device: str = "cpu", seconds: float = 0.2) -> float:
    """This machine's speed at a plain float32 matrix product (bfloat16 on a CUDA GPU), in FLOP/s: the fastest
    of the products timed for `seconds` (what the machine can do, not what a busy moment leaves of it)."""
    import time as _time

    import torch
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b   # warm-up
    best, start = float("inf"), _time.perf_counter()
    while _time.perf_counter() - start < seconds:
        t0 = _time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, _time.perf_counter() - t0)
    return 2 * n ** 3 / best


def lora_estimate(model_path: str, r: int, targets: str, int8: bool, batch: int, steps: int,
                  data: str | None = None, flops: float | None = None) -> LoraEstimate:
    """Memory and time of a LoRA fine-tune, before it runs (an estimate, and labelled so):
    memory = frozen base (float32 4 bytes a parameter, int8 about 1) + adapter parameters x 16 bytes (weight,
    gradient, AdamW's two moments) + activations for batch x sequence (float32, per token and layer: ~18 d_model
    + 3 d_ff (5 gated) for the norms, projections, residuals and the adapters' inputs, 2 x heads x sequence for
    the attention's scores and weights; then the logits with their gradient) + Python and torch themselves (on
    the starter, batch 4 to 32, within 10 % of the run's peak resident memory); time = tokens / (this machine's
    matrix-product FLOP/s x TRAIN_EFFICIENCY / (4 x parameters + attention)): forward and the input's gradient
    through the frozen model, the adapter's own products on top. Small models are slower than that (Python's
    per-step cost dominates): the first steps' measured speed is the figure to trust."""
    from sol.core.formats.checkpoint import load_config
    cfg, _ = load_config(Path(model_path))
    params = cfg.n_params_estimate
    adapter = adapter_parameters(cfg, r, targets)
    seq, seq_from = None, ""
    if data:
        seq = longest_conversation(model_path, data, cfg.context)
        seq_from = "the longest conversation in the data"
    if not seq:
        seq, seq_from = cfg.context, "the model's context window"
    per_token_layer = 18 * cfg.d_model + (5 if cfg.gated else 3) * cfg.d_ff + 2 * cfg.n_head * seq
    activations = 4 * batch * seq * (cfg.n_layer * per_token_layer + 3 * cfg.vocab_size)
    fpt = 4 * params + 6 * adapter + 6 * cfg.n_layer * seq * cfg.n_head * cfg.head_dim
    tps = flops * TRAIN_EFFICIENCY / fpt if flops else None
    return LoraEstimate(params, adapter, params * (1 if int8 else 4), adapter * ADAPTER_BYTES_PER_PARAM,
                        activations, RUNTIME_BYTES, batch, seq, seq_from, fpt, tps, steps)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"
