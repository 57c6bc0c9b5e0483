"""Text corpus -> token memmaps (the book's Fig. 75).

Every file is one document; documents are joined into one long stream of
token ids with the end-of-text token between them, so a (B, T) batch cut at
a random offset may hold the end of one document, `<|endoftext|>`, and the
start of the next, exactly as GPT-2 and GPT-3 were trained. The first 90 %
of each file is for training, the rest for validation. Ids are stored as
uint16 when the vocabulary fits, uint32 otherwise, in plain .bin files that
numpy memory-maps: a corpus larger than memory still trains.

Tokenizing is the slow part of starting a run, so the ids are also kept in Sol's cache folder
(data folder / cache / corpus), keyed by the files' hashes, the tokenizer and the split; a second
run on the same data hard-links them into its own data/ folder instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..atomic import replace, temp_path_for, write_text
from ..errors import SolError
from ..formats.tokenizer import EOT, Tokenizer, train_bpe, train_char

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ""}
CACHE_FORMAT = 1   # of the cached vocabularies and token ids: bump when what an entry holds changes


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def describe_files(files: list[Path]) -> list[dict]:
    """What sol.json records about training data: each file's path, size and hash."""
    return [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size, "sha256": sha256(f)} for f in files]


def corpus_files(paths: list[str | Path]) -> list[Path]:
    """Text files from files and folders (folders: every .txt/.md file inside, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise SolError(f"{p}: folder holds no text files (.txt, .md); give text files or another folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise SolError(f"--corpus {p}: no such file or folder")
    total = sum(f.stat().st_size for f in files)
    if total == 0:
        raise SolError(f"--corpus {paths[0]}: the corpus is empty; give text to train on")
    return files


def make_tokenizer(spec: str, files: list[Path], cache: Path | None = None,
                   described: list[dict] | None = None) -> Tokenizer:
    """`char`, `bpe:N`, or the path of a tokenizer.json (or of a model directory holding one).
    With `cache` (a folder), a vocabulary trained on these files' contents is kept there and reused
    (`described`: describe_files(files), when the caller has it already)."""
    if spec == "char":
        return _trained(spec, files, cache, described, lambda: train_char(files))
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise SolError(f"--tokenizer {spec}: write bpe:N with N the vocabulary size, e.g. bpe:4096") from None
        if n < 300:
            raise SolError(f"--tokenizer {spec}: a byte-level BPE needs at least 300 tokens (256 bytes + specials)")
        return _trained(spec, files, cache, described, lambda: train_bpe(files, n))
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise SolError(f"--tokenizer {spec}: not char, bpe:N, or an existing tokenizer.json")
    tok = Tokenizer.from_file(p)
    if tok.token_to_id(EOT) is None and tok.eos_id is None:
        raise SolError(f"{p}: the tokenizer has no end-of-text token to separate documents")
    return tok


def _trained(spec: str, files: list[Path], cache: Path | None, described: list[dict] | None, train) -> Tokenizer:
    """A vocabulary trained on `files` by `spec`, from the cache when these contents were seen before."""
    if cache is None:
        return train()
    what = {"format": CACHE_FORMAT, "spec": spec,
            "files": [f["sha256"] for f in (described or describe_files(files))]}
    path = cache / (_digest(what) + ".json")
    if path.is_file():
        try:
            return Tokenizer.from_file(path)
        except SolError:   # a damaged entry: train again and replace it
            pass
    tok = train()
    try:
        tok.save(path)
    except OSError:        # a cache that cannot be written only costs the next run the training
        pass
    return tok


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    # Cut after a newline, so a BPE merge never straddles two chunks in the middle of a word; a text
    # without one for 4 chunks (a one-line corpus) is cut after a space, else anywhere: the tokenizer
    # holds ~100 bytes per character of what it is given, so it is never given more than 256 kB at once.
    out, start = [], 0
    while start < len(text):
        limit = start + 4 * size
        end = text.find("\n", start + size, limit)
        if end < 0:
            end = text.rfind(" ", start + size, limit)
        end = min(len(text), limit) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


class CharEncoder:
    """Encodes for a character-level vocabulary (train_char's) as its Hugging Face tokenizer does -- the
    special tokens found leftmost-longest in the raw text, every other character its own id, an unknown
    one <|unk|> -- by a table lookup over the text's code points: ~100x faster than the tokenizer's
    per-character pre-tokenizer (3.5 s a megabyte on this machine's CPU), which made a 50 MB corpus
    take minutes. `of(tok)` gives one only for a vocabulary of exactly that shape."""

    def __init__(self, table: np.ndarray, specials: dict[str, int]):
        import re
        self.table, self.specials = table, specials
        self.split = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")") \
            if specials else None

    @classmethod
    def of(cls, tok: Tokenizer) -> CharEncoder | None:
        spec = json.loads(tok.hf.to_str(pretty=False))
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if (model.get("type") != "WordLevel" or spec.get("normalizer") is not None
                or pre.get("type") != "Split" or pre.get("pattern") != {"Regex": r"[\s\S]"}
                or pre.get("behavior") != "Isolated" or pre.get("invert")):
            return None
        added = spec.get("added_tokens") or []
        if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
            return None
        vocab = model.get("vocab") or {}
        unk = vocab.get(model.get("unk_token"))
        if unk is None:
            return None
        table = np.full(0x110000, unk, dtype=np.uint32)
        for piece, i in vocab.items():
            if len(piece) == 1:
                table[ord(piece)] = i
        return cls(table, {t["content"]: t["id"] for t in added})

    def encode(self, text: str) -> np.ndarray:
        parts = self.split.split(text) if self.split else [text]
        out = []
        for k, part in enumerate(parts):
            if k % 2:   # a special token's text
                out.append(np.asarray([self.specials[part]], dtype=np.uint32))
            elif part:
                out.append(self.table[np.frombuffer(part.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.uint32)


def encode_file(tok: Tokenizer, f: Path, progress=None, fast: CharEncoder | None = None) -> np.ndarray:
    """One document: its ids followed by the end-of-text token. `progress(characters done, characters in
    the file)` is called as the file's text is encoded, a few megabytes at a time; `fast`: the
    CharEncoder for a character-level `tok`, when the caller made one."""
    eot = tok.token_to_id(EOT)
    eot = tok.eos_id if eot is None else eot
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    text = Path(f).read_text(encoding="utf-8", errors="replace")
    chunks = _chunks(text)
    parts, done = [], 0
    for i in range(0, len(chunks), 16):   # a few MB at a time: the ids as Python lists cost ~36 bytes each
        batch = chunks[i:i + 16]
        if fast is not None:
            parts += [fast.encode(c).astype(dtype) for c in batch]
        else:
            parts += [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch_ids(batch)]
        done += sum(map(len, batch))
        if progress is not None:
            progress(done, len(text))
    return np.concatenate(parts + [np.asarray([] if eot is None else [eot], dtype=dtype)])


def write_memmap(path: Path, arr: np.ndarray) -> None:
    tmp = temp_path_for(path)
    arr.tofile(tmp)
    replace(tmp, path)


def build(files: list[Path], tok: Tokenizer, out: Path, context: int, val_fraction: float = 0.1,
          cache: Path | None = None, described: list[dict] | None = None, progress=None) -> dict:
    """Tokenize the corpus into out/train.bin and out/val.bin; returns the meta also written to meta.json.
    Each file's first part trains and its last `val_fraction` validates, so every kind of text in a
    mixed corpus is measured. With `cache` (a folder), the ids are kept there too, keyed by the files'
    contents, the tokenizer and the split: the next run on the same data links them instead of
    tokenizing again (out/ still holds its own train.bin, val.bin and meta.json).
    `progress(bytes done, bytes in all files)` is called while tokenizing (not on a cache hit)."""
    described = described or describe_files(files)
    key = cache_key(described, tok, val_fraction)
    hit = _cached(cache / key) if cache is not None else None
    if hit is not None:
        _check_size(files, hit["train_tokens"], hit["val_tokens"], context, val_fraction)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("train.bin", "val.bin"):
            link_or_copy(cache / key / name, out / name)
        meta = {**hit, "files": described}
    else:
        train, val = tokenize(files, tok, val_fraction, progress)
        _check_size(files, len(train), len(val), context, val_fraction)
        out.mkdir(parents=True, exist_ok=True)
        write_memmap(out / "train.bin", train)
        write_memmap(out / "val.bin", val)
        meta = {"dtype": str(train.dtype), "train_tokens": int(len(train)), "val_tokens": int(len(val)),
                "vocab_size": tok.vocab_size, "files": described}
    write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    if cache is not None and hit is None:
        _store(out, cache, key)
    return meta


def tokenize(files: list[Path], tok: Tokenizer, val_fraction: float, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """`progress(bytes done, bytes in all files)`, as each file's text is encoded (its characters counted
    as a share of its bytes)."""
    trains, vals = [], []
    fast = CharEncoder.of(tok)
    sizes = [f.stat().st_size for f in files]
    total, before = sum(sizes), 0
    for f, size in zip(files, sizes):
        def report(chars, n_chars, size=size, before=before):
            progress(before + int(size * chars / max(1, n_chars)), total)
        ids = encode_file(tok, f, report if progress else None, fast)
        before += size
        n_val = int(len(ids) * val_fraction)
        trains.append(ids[:len(ids) - n_val])
        vals.append(ids[len(ids) - n_val:])
    return np.concatenate(trains), np.concatenate(vals)


def _check_size(files: list[Path], n_train: int, n_val: int, context: int, val_fraction: float) -> None:
    need = context + 1
    if n_train < need or (val_fraction > 0 and n_val < need):
        raise SolError(f"--corpus {files[0]}: the corpus is {n_train + n_val} tokens; with a {int(val_fraction * 100)} % "
                       f"validation split each part needs at least {need} tokens (one context window plus one). "
                       f"Give more text or a smaller --context")


# ---- the cache of tokenized corpora -------------------------------------------


def cache_dir() -> Path:
    from ..formats.registry import data_dir
    return data_dir() / "cache" / "corpus"


def tokenizer_cache_dir() -> Path:
    from ..formats.registry import data_dir
    return data_dir() / "cache" / "tokenizers"


def cache_key(described: list[dict], tok: Tokenizer, val_fraction: float) -> str:
    """The files' contents in order (not their names: a copy hits), the tokenizer (its whole JSON, so a
    retrained vocabulary misses) and the split."""
    tok_hash = hashlib.sha256(tok.hf.to_str(pretty=False).encode("utf-8")).hexdigest()
    what = {"format": CACHE_FORMAT, "files": [f["sha256"] for f in described], "tokenizer": tok_hash,
            "val_fraction": val_fraction}
    return _digest(what)


def _digest(what: dict) -> str:
    """A cache entry's name: the first 32 hex digits of the sha256 of what it depends on."""
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def _cached(entry: Path) -> dict | None:
    """An entry's meta when the entry is whole (its .bin files as long as the meta says), else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        size = np.dtype(meta["dtype"]).itemsize
        if ((entry / "train.bin").stat().st_size != meta["train_tokens"] * size
                or (entry / "val.bin").stat().st_size != meta["val_tokens"] * size):
            return None
        return {k: meta[k] for k in ("dtype", "train_tokens", "val_tokens", "vocab_size")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(out: Path, cache: Path, key: str) -> None:
    """Put out/'s files in the cache as one entry: assembled in a temporary folder, then renamed into
    place, so a reader sees a whole entry or none. A cache that cannot be written is only slower."""
    import shutil
    import tempfile
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=cache))
    except OSError:
        return
    try:
        for name in ("train.bin", "val.bin", "meta.json"):
            link_or_copy(out / name, tmp / name)
        entry = cache / key
        if entry.exists():   # an entry that failed _cached (cut short): this one replaces it
            shutil.rmtree(entry, ignore_errors=True)
        os.rename(tmp, entry)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes src's contents, atomically: a hard link where the file system allows (no copy, and the
    files are never written in place, only replaced), else a copy."""
    import shutil
    tmp = temp_path_for(dst)
    tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    replace(tmp, dst)


def load(out: Path) -> tuple[np.memmap, np.memmap, dict]:
    meta = json.loads((out / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return (np.memmap(out / "train.bin", dtype=dtype, mode="r"),
            np.memmap(out / "val.bin", dtype=dtype, mode="r"), meta)
