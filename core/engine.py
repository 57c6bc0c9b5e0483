"""Generation: prefill once, then decode token by token from the KV cache.

`Session` holds one sequence: its ids, its KV cache and the logits for the
next position. `generate()` is a plain Python generator of events, so the
CLI prints them, the GUI moves them to a worker thread, and the chat loop
can stop, force tool-result tokens into the session, and continue.
Cancellation is a flag checked between tokens.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import SolError
from .model import Transformer
from .sampling import Explanation, SamplingParams, choose, make_generator
from .tokenizer import StreamDecoder, Tokenizer

TOP_N = 10


@dataclass
class TokenEvent:
    id: int
    text: str                     # the new text this token completes (may be "" mid-character)
    logprob: float                # log-probability under the model (temperature 1, no filters)
    top: list[dict]               # the model's top alternatives: {"id", "text", "prob"}
    explanation: Explanation | None = None
    forced: bool = False          # put there by the engine (a tool result), not sampled

    def to_dict(self) -> dict:
        return {"type": "token", "id": self.id, "text": self.text, "logprob": self.logprob, "top": self.top,
                "forced": self.forced}


@dataclass
class DoneEvent:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    completion_tokens: int
    tokens_per_s: float
    stop_reason: str              # "eos" | "stop_string" | "max_tokens" | "context" | "cancelled"
    time_to_first_token_s: float = 0.0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {"type": "done", "token_ids": self.token_ids, "text": self.text, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "tokens_per_s": self.tokens_per_s,
                "stop_reason": self.stop_reason, "time_to_first_token_s": self.time_to_first_token_s}


@dataclass
class GenerationParams:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    explain: bool = True          # build the sampling explanation and top alternatives


class Session:
    """One sequence being generated: ids so far, KV cache, and the logits for what comes next."""

    def __init__(self, model: Transformer, max_len: int | None = None):
        self.model = model
        self.cache = model.new_cache(1, max_len)
        self.ids: list[int] = []
        self.logits: torch.Tensor | None = None   # (vocab,) for the next position

    @property
    def room(self) -> int:
        return self.cache.max_len - len(self.ids)

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> None:
        """Run the model over new ids (a prompt, or forced tokens) without sampling."""
        if not ids:
            return
        if len(ids) > self.room:
            raise SolError(f"{len(self.ids) + len(ids)} tokens do not fit the context window of "
                           f"{self.cache.max_len}; shorten the prompt")
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        self.logits = self.model(x, cache=self.cache, last_only=True)[0, -1]
        self.ids.extend(ids)

    def rewind(self, n: int) -> None:
        """Keep only the first n ids (regenerate, edit). The next feed recomputes the logits."""
        self.ids = self.ids[:n]
        self.cache.truncate(n)
        self.logits = None


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def token_text(self, i: int) -> str:
        t = self._texts.get(i)
        if t is None:
            t = self._texts[i] = self.tokenizer.decode([i])
        return t

    def session(self, prompt_ids: list[int]) -> Session:
        if not prompt_ids:
            raise SolError("the prompt is empty; give at least one token of text")
        s = Session(self.model)
        s.feed(prompt_ids)
        return s

    def force(self, session: Session, ids: list[int]) -> list[TokenEvent]:
        """Insert tokens the model did not choose (a tool result); they are marked forced."""
        events = []
        decoder = StreamDecoder(self.tokenizer, session.ids)
        for i in ids:
            events.append(TokenEvent(i, decoder.step(i), 0.0, [], None, forced=True))
        if events:
            events[-1].text += decoder.flush()
        session.feed(ids)
        return events

    def _event(self, logits: torch.Tensor, token: int, text: str, explanation, explain: bool) -> TokenEvent:
        if not explain:  # only the chosen token's log-probability: one reduction, no full log-softmax
            return TokenEvent(token, text, float(logits[token] - logits.logsumexp(-1)), [], explanation)
        logp = torch.log_softmax(logits, dim=-1)
        vals, idx = logp.topk(min(TOP_N, logp.numel()))
        top = [{"id": int(i), "text": self.token_text(int(i)), "prob": float(v.exp())}
               for v, i in zip(vals, idx)]
        return TokenEvent(token, text, float(logp[token]), top, explanation)

    def generate(self, session: Session, params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent | DoneEvent]:
        """Sample up to max_tokens after what the session holds; yields TokenEvents, then one DoneEvent."""
        params.sampling.validate()
        gen = make_generator(params.sampling.seed)
        start_len = len(session.ids)
        decoder = StreamDecoder(self.tokenizer, session.ids)
        new_ids: list[int] = []
        text = ""
        reason = "max_tokens"
        t0 = time.perf_counter()
        first = 0.0
        stops = set(params.stop_ids)
        penalty = params.sampling.repetition_penalty != 1.0
        with torch.inference_mode():
            if session.logits is None:   # after a rewind: recompute the last position
                last = session.ids.pop()
                session.cache.truncate(len(session.ids))
                session.feed([last])
            for _ in range(params.max_tokens):
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                logits = session.logits.float().cpu()   # no-ops for float32 on the CPU
                history = torch.tensor(session.ids, dtype=torch.long) if penalty else None
                token, expl = choose(logits, params.sampling, gen, history, params.explain)
                if token in stops:
                    reason = "eos"
                    break
                new_ids.append(token)
                piece = decoder.step(token)
                text += piece
                event = self._event(logits, token, piece, expl, params.explain)
                if not first:
                    first = time.perf_counter() - t0
                # A stop string completed by this token ends in its last few characters: look there only,
                # so long answers don't rescan all their text every token.
                hit = next((s for s in params.stop_strings if s in text[-(len(s) + len(piece)):]), None)
                if hit is not None:
                    text = text[:text.index(hit)]
                    reason = "stop_string"
                    # The token stays in the sequence: feed it so ids, cache and logits agree and a
                    # later force() or generate() continues from a consistent state.
                    if session.room > 0:
                        session.feed([token])
                    else:
                        session.ids.append(token)
                    yield event
                    break
                if session.room <= 0:
                    session.ids.append(token)
                    session.logits = None
                    reason = "context"
                    yield event
                    break
                session.feed([token])
                yield event
        if reason not in ("stop_string",):
            text += decoder.flush()
        elapsed = time.perf_counter() - t0
        n = len(new_ids)
        # Prefill ran before generate() was called, so this is decode speed.
        yield DoneEvent(new_ids, text, start_len, n, n / elapsed if elapsed > 0 else 0.0, reason, first, elapsed)


def stop_ids_for(tokenizer: Tokenizer, config_extra: dict | None = None) -> tuple[int, ...]:
    """End-of-text ids for raw completion: the tokenizer's eos plus any eos ids the model's config lists."""
    ids = set()
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    eos = (config_extra or {}).get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(i) for i in eos)
    return tuple(sorted(ids))


def end_of_turn_ids(tokenizer: Tokenizer, config_extra: dict | None = None) -> tuple[int, ...]:
    """What ends an assistant turn in a chat: eos plus the chat templates' end-of-turn markers."""
    ids = set(stop_ids_for(tokenizer, config_extra))
    for name in ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|end_of_turn|>"):
        i = tokenizer.token_to_id(name)
        if i is not None:
            ids.add(i)
    return tuple(sorted(ids))
