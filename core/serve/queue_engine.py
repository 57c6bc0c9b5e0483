"""A stand-in for core/batch.py's BatchEngine (the serving-engine issue), with its interface:
one worker thread serves queued requests one at a time over the single-sequence Session.
It goes away when the batched engine lands; the server only uses the interface below."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..engine import DoneEvent, GenerationParams, Session, TokenEvent
from ..errors import SolError
from ..sampling import choose, make_generator
from ..tokenizer import StreamDecoder


@dataclass
class Params(GenerationParams):
    """GenerationParams with the two fields the batched engine adds."""
    top_n: int = 10
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None


class QueueFull(SolError):
    pass


class Request:
    def __init__(self, prompt_ids: list[int], params: GenerationParams):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.done = False

    def get(self, timeout: float | None = None):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self):
        while True:
            ev = self.events.get()
            yield ev
            if isinstance(ev, DoneEvent):
                return

    def cancel(self) -> None:
        self.cancelled.set()


class BatchEngine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self._pending: queue.Queue = queue.Queue()
        self._texts: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = 0

    @property
    def queued(self) -> int:
        return self._pending.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sol-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> Request:
        context = self.model.cfg.context
        if not prompt_ids:
            raise SolError("the prompt is empty; give at least one token of text")
        if len(prompt_ids) + params.max_tokens > context:
            raise SolError(f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: "
                           f"{len(prompt_ids) + params.max_tokens} is more than the model's context of {context}")
        if self._pending.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting; try again shortly")
        params.sampling.validate()
        req = Request(prompt_ids, params)
        self._pending.put(req)
        return req

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        while True:
            try:
                self._pending.get_nowait().cancel()
            except queue.Empty:
                break
        if self._current is not None:
            self._current.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    _current: Request | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                req = self._pending.get(timeout=0.05)
            except queue.Empty:
                continue
            self._current = req
            self.active = 1
            try:
                self._serve(req)
            except Exception as e:   # one failing request never stops the others
                req.events.put(DoneEvent([], f"error: {e}", len(req.prompt_ids), 0, 0.0, "cancelled"))
            finally:
                self.active = 0
                self._current = None
        # Anything submitted after close() still gets its end.
        while True:
            try:
                req = self._pending.get_nowait()
            except queue.Empty:
                break
            req.events.put(DoneEvent([], "", len(req.prompt_ids), 0, 0.0, "cancelled"))

    def _text(self, i: int) -> str:
        t = self._texts.get(i)
        if t is None:
            t = self._texts[i] = self.tokenizer.decode([i])
        return t

    @torch.inference_mode()
    def _serve(self, req: Request) -> None:
        p = req.params
        top_n = getattr(p, "top_n", 10)
        process = getattr(p, "logits_processor", None)
        gen = make_generator(p.sampling.seed)
        s = Session(self.model)
        if req.cancelled.is_set():
            req.events.put(DoneEvent([], "", len(req.prompt_ids), 0, 0.0, "cancelled"))
            return
        s.feed(req.prompt_ids)
        decoder = StreamDecoder(self.tokenizer, s.ids)
        new: list[int] = []
        text, reason = "", "max_tokens"
        t0 = time.perf_counter()
        first = 0.0
        penalty = p.sampling.repetition_penalty != 1.0
        for _ in range(p.max_tokens):
            if req.cancelled.is_set():
                reason = "cancelled"
                break
            raw = s.logits.float().cpu()
            logits = process(list(new), raw.clone()) if process is not None else raw
            history = torch.tensor(s.ids, dtype=torch.long) if penalty else None
            token, expl = choose(logits, p.sampling, gen, history, p.explain)
            if token in p.stop_ids:
                reason = "eos"
                break
            new.append(token)
            piece = decoder.step(token)
            text += piece
            logp = torch.log_softmax(raw, dim=-1)
            top = []
            if p.explain and top_n:
                vals, idx = logp.topk(min(top_n, logp.numel()))
                top = [{"id": int(i), "text": self._text(int(i)), "prob": float(v.exp())} for v, i in zip(vals, idx)]
            if not first:
                first = time.perf_counter() - t0
            ev = TokenEvent(token, piece, float(logp[token]), top, expl)
            hit = next((x for x in p.stop_strings if x in text[-(len(x) + len(piece)):]), None)
            if hit is not None:
                text = text[:text.index(hit)]
                reason = "stop_string"
                req.events.put(ev)
                break
            req.events.put(ev)
            if s.room <= 0:
                reason = "context"
                break
            s.feed([token])
        if reason != "stop_string":
            text += decoder.flush()
        elapsed = time.perf_counter() - t0
        req.events.put(DoneEvent(new, text, len(req.prompt_ids), len(new), len(new) / elapsed if elapsed else 0.0,
                                 reason, first, elapsed))
