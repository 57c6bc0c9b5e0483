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
                          str(parent) if parent else None))
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
