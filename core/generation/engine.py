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
from typing import Callable, Iterator

import torch

from ..errors import SolError
from ..formats.tokenizer import StreamDecoder, Tokenizer
from ..kernels import pick
from ..model.transformer import Transformer
from .decode_step import DecodeStep
from .sampling import Explanation, SamplingParams, choose, make_generator
from .threads import threads_for

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
    top_n: int = TOP_N            # alternatives each TokenEvent carries when explaining (at most 20)
    # Called with (ids generated so far, 1-D float32 CPU logits) before sampling; returns the logits
    # to sample from (e.g. -inf where a grammar forbids a token). Log-probabilities stay the model's.
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    # The end-of-text id that ends the answer comes as a last TokenEvent too (text "", not part of the
    # answer's ids or text), so its log-probability is known: what the completions API reports with echo.
    emit_stop: bool = False


class Session:
    """One sequence being generated: ids so far, KV cache, and the logits for what comes next."""

    def __init__(self, model: Transformer, max_len: int | None = None):
        self.model = model
        self.cache = model.new_cache(1, max_len)
        self.step = DecodeStep(model, self.cache)
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
        switch = self.model.rope_switch
        if switch is not None and self.cache.pos > 0 and (self.cache.pos + len(ids) > switch) != self.cache.long_rope:
            # longrope: past `switch` tokens every position takes the long factors (and within it, after a
            # rewind, the short ones), so the cached keys are stale: recompute the whole sequence, as
            # transformers' generate does.
            ids, self.ids = self.ids + list(ids), []
            self.cache.truncate(0)
        pos = self.cache.pos
        # A small model's turn on one CPU thread: no sleeping one to wake first (generation/threads.py).
        if len(ids) == 1 and pos > 0:   # decoding: the static-shape step (a CUDA graph on a GPU)
            self.cache.reserve(pos + 1)
            with threads_for(self.model, 1, step=True):
                self.logits = self.step([ids[0]], [pos])[0]
            self.cache.pos = pos + 1
        else:
            x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
            with threads_for(self.model, len(ids)):
                self.logits = self.model(x, cache=self.cache, last_only=True)[0, -1]
        self.ids.extend(ids)

    def rewind(self, n: int) -> None:
        """Keep only the first n ids (regenerate, edit). The next feed recomputes the logits."""
        self.ids = self.ids[:n]
        self.cache.truncate(n)
        self.logits = None


def warm_up(model: Transformer, steps: int = 3) -> None:
    """Run a throwaway sequence through a CPU model: a two-token prefill and `steps` decode steps, in a
    cache of its own. The first answer after a load otherwise pays one-time costs the user sees as its
    first token: TorchScript compiling the scripted step and profiling its first runs, the math libraries'
    first calls (the starter: 77 ms to the first token of the first answer, 1.5 ms of the next, on 2 cores;
    a warmed model's first answer is as quick as its second). Not on a GPU, where the step is captured in
    a CUDA graph per cache: a throwaway cache's graph would be captured for nothing."""
    if model.device.type != "cpu":
        return
    s = Session(model, max_len=steps + 2)
    s.feed([0, 0])
    for _ in range(steps):
        s.feed([0])


class Decoding:
    """One answer being chosen token by token: sampling, its events, stop ids and strings, limits.

    Shared by `Engine.generate` (one sequence) and the batched engine (many in one forward pass), so a
    request decodes the same way alone and among others. `step(logits)` takes the model's logits for
    the next position and returns the chosen token's event; `reason` is set once the answer is over."""

    def __init__(self, engine: "Engine", params: GenerationParams, history: list[int], limit: int):
        params.sampling.validate()
        self.engine, self.params = engine, params
        # Greedy answers draw nothing; an unseeded generator seeds itself from the OS (a system call that hands
        # the GIL to sol serve's event loop, and waits to get it back, on the way to the first token).
        self.gen = None if params.sampling.greedy else make_generator(params.sampling.seed)
        self.history = list(history)          # prompt and answer: the repetition penalty looks at both
        self.start_len = len(history)
        self.limit = limit                    # the most ids the sequence may hold (its context)
        self.decoder = StreamDecoder(engine.tokenizer, history)
        self.stops = set(params.stop_ids)
        self.new_ids: list[int] = []
        self.text = ""
        self.reason: str | None = None        # "eos" | "stop_string" | "max_tokens" | "context" | "cancelled"
        self.t0 = time.perf_counter()
        self.first = 0.0

    @property
    def token(self) -> int:
        """The last token chosen (the one to feed next)."""
        return self.new_ids[-1]

    def step(self, logits: torch.Tensor) -> TokenEvent | None:
        """Choose the next token. Returns its event, or None when an end-of-text id ends the answer."""
        p = self.params
        logits = logits.float().cpu()   # no-ops for float32 on the CPU
        sample_from = logits if p.logits_processor is None else p.logits_processor(list(self.new_ids), logits)
        penalty = p.sampling.repetition_penalty != 1.0
        history = torch.tensor(self.history, dtype=torch.long) if penalty else None
        token, expl = choose(sample_from, p.sampling, self.gen, history, p.explain)
        if token in self.stops:
            self.reason = "eos"
            return self.engine.event(logits, token, "", expl, p.explain, p.top_n) if p.emit_stop else None
        self.new_ids.append(token)
        self.history.append(token)
        piece = self.decoder.step(token)
        self.text += piece
        event = self.engine.event(logits, token, piece, expl, p.explain, p.top_n)
        if not self.first:
            self.first = time.perf_counter() - self.t0
        # A stop string completed by this token ends in its last few characters: look there only,
        # so long answers don't rescan all their text every token.
        hit = next((s for s in p.stop_strings if s in self.text[-(len(s) + len(piece)):]), None)
        if hit is not None:
            self.text = self.text[:self.text.index(hit)]
            self.reason = "stop_string"
        elif len(self.history) > self.limit:
            self.reason = "context"     # the token was chosen but there is no room left to feed it
        elif len(self.new_ids) >= p.max_tokens:
            self.reason = "max_tokens"
        return event

    def cancel(self) -> None:
        self.reason = "cancelled"

    def done(self) -> DoneEvent:
        if self.reason != "stop_string":
            self.text += self.decoder.flush()
        elapsed = time.perf_counter() - self.t0
        n = len(self.new_ids)
        # Prefill ran before decoding started, so this is decode speed.
        return DoneEvent(self.new_ids, self.text, self.start_len, n, n / elapsed if elapsed > 0 else 0.0,
                         self.reason or "max_tokens", self.first, elapsed)


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

    def event(self, logits: torch.Tensor, token: int, text: str, explanation, explain: bool,
              top_n: int = TOP_N) -> TokenEvent:
        if not explain:  # only the chosen token's log-probability: one reduction, no full log-softmax
            return TokenEvent(token, text, float(logits[token]) - pick.logsumexp(logits), [], explanation)
        logp = torch.log_softmax(logits, dim=-1)
        vals, idx = logp.topk(min(top_n, logp.numel()))
        top = [{"id": int(i), "text": self.token_text(int(i)), "prob": float(v.exp())}
               for v, i in zip(vals, idx)]
        return TokenEvent(token, text, float(logp[token]), top, explanation)

    def generate(self, session: Session, params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent | DoneEvent]:
        """Sample up to max_tokens after what the session holds; yields TokenEvents, then one DoneEvent."""
        d = Decoding(self, params, session.ids, session.cache.max_len)
        with torch.inference_mode():
            if session.logits is None:   # after a rewind: recompute the last position
                last = session.ids.pop()
                session.cache.truncate(len(session.ids))
                session.feed([last])
            while d.reason is None:
                if cancel is not None and cancel.is_set():
                    d.cancel()
                    break
                event = d.step(session.logits)
                if event is None or d.reason == "eos":   # an end-of-text id is never fed
                    if event is not None:
                        yield event
                    break
                # The token stays in the sequence: feed it so ids, cache and logits agree and a later
                # force() or generate() continues from a consistent state.
                if d.reason == "context" or session.room <= 0:
                    session.ids.append(d.token)
                    session.logits = None
                else:
                    session.feed([d.token])
                yield event
        yield d.done()


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
    # Phi-3, ChatML, Llama 3, OpenChat, Gemma (whose tokenizer's eos is <eos>, not its turns' end).
    for name in ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>"):
        i = tokenizer.token_to_id(name)
        if i is not None:
            ids.add(i)
    return tuple(sorted(ids))
