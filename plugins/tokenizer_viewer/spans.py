"""From an encoding to what a person sees: spans of text, one per token.

A byte-level tokenizer can cut one character (an emoji, an accented letter)
into several tokens; those tokens all point at the same characters, so we
merge them into one segment that lists every id. Special tokens are kept and
flagged. Text a tokenizer drops (some pre-tokenizers eat whitespace) becomes a
segment with no tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

WHITESPACE_MARKS = {" ": "·", "\n": "↵\n", "\t": "→", "\r": "␍"}


@dataclass
class Segment:
    start: int                 # character offsets into the text
    end: int
    text: str                  # what to draw (the text slice, or the token for a special token without text)
    tokens: list[int] = field(default_factory=list)   # indices into the encoding
    ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)   # the tokens' own strings (e.g. "Ġthe")
    special: bool = False
    unknown: bool = False      # characters the vocabulary lacks, encoded as its unknown token

    @property
    def is_gap(self) -> bool:
        return not self.tokens


def segments(tokenizer, text: str, add_special_tokens: bool = False) -> list[Segment]:
    enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    specials = set(tokenizer.special_tokens())
    segs: list[Segment] = []
    pos = 0
    for i, ((s, e), tid, piece, special) in enumerate(zip(enc.offsets, enc.ids, enc.tokens, enc.special)):
        special = special or piece in specials
        unknown = special and e > s and text[s:e] != piece   # e.g. a char vocabulary's unk for "ã"
        special = special and not unknown
        if s == e:   # a token with no characters behind it (an added bos/eos): show the token itself
            segs.append(Segment(s, e, piece, [i], [tid], [piece], True))
            continue
        last = next((g for g in reversed(segs) if not g.is_gap and g.end > g.start), None)
        if last is not None and s < last.end:   # shares characters with the previous token: one segment
            last.tokens.append(i)
            last.ids.append(tid)
            last.pieces.append(piece)
            last.end = max(last.end, e)
            last.text = text[last.start:last.end]
            last.special = last.special or special
            pos = max(pos, e)
            continue
        if s > pos:
            segs.append(Segment(pos, s, text[pos:s]))
        segs.append(Segment(s, e, text[s:e], [i], [tid], [piece], special, unknown))
        pos = max(pos, e)
    if pos < len(text):
        segs.append(Segment(pos, len(text), text[pos:]))
    return segs


def token_segments(segs: list[Segment]) -> list[Segment]:
    return [s for s in segs if not s.is_gap]


def counts(tokenizer, text: str, segs: list[Segment] | None = None) -> dict:
    segs = segs if segs is not None else segments(tokenizer, text)
    n_tokens = sum(len(s.tokens) for s in segs)
    return {"tokens": n_tokens, "characters": len(text), "words": len(text.split()),
            "segments": len(token_segments(segs)), "unknown": sum(s.unknown for s in segs),
            "chars_per_token": round(len(text) / n_tokens, 2) if n_tokens else 0.0}


def show_whitespace(s: str) -> str:
    return "".join(WHITESPACE_MARKS.get(c, c) for c in s)


def search_vocab(tokenizer, query: str, limit: int = 500) -> list[tuple[int, str, str]]:
    """(id, token string, decoded text) for tokens whose string or decoded text contains `query`."""
    q = query.lower()
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    out = []
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        dec = tokenizer.decode([i])
        if q in tok.lower() or q in dec.lower():
            out.append((i, tok, dec))
            if len(out) >= limit:
                break
    return out
