"""Structured output: llguidance compiles a JSON schema into a grammar over this model's
vocabulary, and at each step masks the logits so only tokens the grammar allows can be sampled.

llguidance reads most `tokenizers` JSON itself; vocabularies it cannot read that way (Sol's
character-level ones use the Fuse decoder) go in as a plain list of each token's bytes."""
from __future__ import annotations

import json

import numpy as np
import torch

from ..errors import SolError
from ..formats.tokenizer import UNK, Tokenizer
from .schema import check_openai_strict, strict_schema


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: each token's bytes, eos, and an encode function."""

    def __init__(self, tok: Tokenizer, n_vocab: int):
        special = set(tok.special_tokens().values())
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.special_token_ids = sorted(special)
        self.tokens = [(tok.id_to_token(i) or "").encode() if i in special else tok.decode([i]).encode()
                       for i in range(n_vocab)]
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode_ids(text, add_special_tokens=False)


def ll_tokenizer(tok: Tokenizer, n_vocab: int):
    import llguidance
    try:
        return llguidance.LLTokenizer(tok.hf.to_str(), n_vocab=n_vocab, eos_token=tok.eos_id)
    except ValueError:   # a decoder llguidance does not know
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tok, n_vocab)), n_vocab=n_vocab)


def grammar_for(response_format: dict) -> str | None:
    """The llguidance grammar for an OpenAI `response_format`, or None for plain text. Schemas are
    read as OpenAI's strict mode and vLLM read them (schema.py): objects allow only their listed
    properties unless they say otherwise, no whitespace between tokens, and with `strict: true` what
    OpenAI would refuse is refused, naming the keyword."""
    import llguidance
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise SolError("response_format.json_schema: give an object with a `schema` object")
        schema = spec.get("schema") or {}
        if spec.get("strict") is True:
            check_openai_strict(schema, "response_format.json_schema.schema")
        schema = strict_schema(schema)
    else:
        raise SolError(f"response_format.type {kind!r}: use text, json_object or json_schema")
    return checked(lambda: llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT),
                   "response_format.json_schema.schema")


# No whitespace between JSON tokens: a small model's runs of spaces or newlines would eat max_tokens.
COMPACT = {"whitespace_flexible": False}


def lark_grammar(lark: str, where: str) -> str:
    """A Lark grammar (llguidance's dialect; `%json {schema}` inside it is compact as above)."""
    import llguidance
    return checked(lambda: llguidance.LLMatcher.grammar_from_lark(lark), where)


def checked(make, where: str) -> str:
    import llguidance
    try:
        grammar = make()
    except ValueError as e:
        raise SolError(f"{where}: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise SolError(f"{where}: {error.splitlines()[0]}")
    return grammar


class Constraint:
    """A logits processor for one request: tokens outside the grammar get -inf.
    When the grammar is complete, the request's end-of-turn tokens are what is left."""

    def __init__(self, ll_tok, grammar: str, end_ids: tuple[int, ...], tok: Tokenizer, vocab_size: int,
                 specials: bool = False):
        import llguidance
        self.matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise SolError(f"response_format: {self.matcher.get_error().splitlines()[0]}")
        self.end_ids = list(end_ids)
        self.vocab_size = vocab_size
        self.consumed = 0
        unk = tok.token_to_id(UNK)
        # Special tokens are markup, never JSON (unless the grammar writes them: `specials`, a tool call's
        # markers); <|unk|> stands for characters the vocabulary lacks.
        marks = set() if specials else set(tok.special_tokens().values())
        self.never = [i for i in marks | ({unk} if unk is not None else set())
                      if i < vocab_size and i not in self.end_ids]

    def allowed(self) -> torch.Tensor:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool))
        if len(mask) < self.vocab_size:
            mask = torch.cat([mask, torch.zeros(self.vocab_size - len(mask), dtype=torch.bool)])
        mask[self.never] = False
        accepting = self.matcher.is_accepting() or self.matcher.is_stopped()
        mask[self.end_ids] = accepting
        return mask

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        # Catch up with the tokens sampled since the last call (the last one, normally).
        for t in ids[self.consumed:]:
            if t not in self.end_ids:
                self.matcher.consume_token(t)
        self.consumed = len(ids)
        mask = self.allowed()
        if not bool(mask.any()):
            # Nothing the vocabulary has can continue (or the matcher failed): end the answer here rather
            # than raise inside the engine's step, which would end every request in the batch.
            mask[self.end_ids] = True
        return logits.masked_fill(~mask, float("-inf"))

    def check_start(self) -> None:
        """Refuse up front a schema this vocabulary cannot begin to write."""
        if not bool(self.allowed().any()):
            raise SolError("response_format: this model's vocabulary cannot write what the schema asks "
                           "(the first character it needs has no token); use a schema it can express")
