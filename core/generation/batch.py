"""Continuous batching: many requests decoded together, one forward pass per token for all of them.

A request waits in a queue until a row of the KV cache is free; it is then prefilled alone into that
row and joins the batch between two steps. Each step samples every live row's next token (each with
its own sampling parameters, seed, stops and grammar, through the same `Decoding` as a lone
`Engine.generate`), then runs one decode step over all rows that go on. A finished or cancelled
request leaves at once and its row is given to the next in the queue.

Live requests always occupy rows 0..n-1 (a leaving request's row is filled with the last row's), so a
step runs on the first n rows and its shapes depend on n and the cache's capacity only.

A request's tokens do not depend on its companions: rows never see each other (attention is per row,
masked to the row's own positions), and the sampler of each request draws from its own generator.

    engine = BatchEngine(model, tokenizer, max_batch=8)
    engine.start()                        # a background thread runs step() until close()
    req = engine.submit(prompt_ids, GenerationParams(...))
    for event in req: ...                 # TokenEvents, then one DoneEvent
    req.cancel()                          # leaves at the next step; its DoneEvent says "cancelled"
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass

import torch

from ..errors import SolError
from ..formats.tokenizer import Tokenizer
from ..model import lora
from ..model.transformer import Transformer
from .decode_step import DecodeStep
from .engine import Decoding, DoneEvent, Engine, GenerationParams, TokenEvent
from .prefix_cache import PrefixCache
from .threads import threads_for


class QueueFull(SolError):
    """Every row is busy and the waiting queue is full: try again later."""


class Request:
    """One submitted prompt: its events arrive on a thread-safe queue as the engine makes them, or, once
    someone listens (`listen`), go straight to the listener on the engine's thread."""

    def __init__(self, engine: "BatchEngine", prompt_ids: list[int], params: GenerationParams,
                 adapter: str | None = None):
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.adapter = adapter            # the LoRA adapter this request runs with (None: the base)
        self.finished = False             # the DoneEvent has been queued
        self.cached_tokens = 0            # prompt tokens whose KV rows came from the prefix cache
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._listener = None
        self._listen_lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating: the request leaves the batch at the next step."""
        self._cancel.set()
        self.engine._wake()

    def get(self, timeout: float | None = None) -> TokenEvent | DoneEvent | None:
        """The next event, or None if none came within `timeout` seconds."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, DoneEvent):
                return

    def listen(self, fn) -> None:
        """Hand every event to `fn(event)`, in order: those already made now, later ones on the engine's thread
        as it makes them. `fn` must be quick and must not raise (sol serve's hands them to its event loop);
        it saves a thread that waits on the queue, and that thread's wake-up, on every token."""
        with self._listen_lock:
            while True:
                try:
                    fn(self._events.get_nowait())
                except queue.Empty:
                    break
            self._listener = fn

    def _put(self, event) -> None:
        fn = self._listener
        if fn is None:
            with self._listen_lock:   # listen() may be draining the queue right now
                fn = self._listener
                if fn is None:
                    self._events.put(event)
                    return
        fn(event)


@dataclass(eq=False)   # rows are found by identity
class _Row:
    request: Request
    decoding: Decoding
    length: int                      # positions of this row the cache holds
    logits: torch.Tensor | None      # for the next position


class BatchEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None, prefix_cache: PrefixCache | None = None, cache_key: str = ""):
        if max_batch < 1:
            raise SolError(f"max_batch {max_batch}: must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = min(max_len or model.cfg.context, model.cfg.context)
        # One cache row per concurrent request; positions are allocated in buckets as rows need them.
        self.cache = model.new_cache(max_batch, self.max_len)
        self.step_fn = DecodeStep(model, self.cache)
        self.adapters = set(lora.adapter_names(model))   # requests may name one (sol serve --adapter)
        self._lora_layers = list(lora.lora_layers(model).values())
        self._active = None   # (thread, choice) last made: the choice is per thread (lora.use_here)
        self.rows: list[_Row] = []
        self.waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        # Rows of recent sequences, reused by prompts that begin the same way (prefix_cache.py). Not for
        # longrope models: past their switch length every cached key changes.
        self.prefix = prefix_cache if prefix_cache is not None and prefix_cache.enabled \
            and model.rope_switch is None else None
        self.cache_key = cache_key

    # ---- what callers see ----------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def kv_memory(self, sequences: int | None = None) -> int:
        """Bytes the KV cache takes for `sequences` sequences at full length (default: max_batch)."""
        return self.model.cfg.kv_cache_bytes(sequences or self.max_batch, self.max_len, self.cache.k[0].element_size())

    def describe(self) -> str:
        mb = self.kv_memory() / 2**20
        return (f"batched engine: {self.max_batch} concurrent sequences of up to {self.max_len} tokens; "
                f"KV cache up to {mb:.1f} MB ({mb / self.max_batch:.1f} MB a sequence), allocated as they grow; "
                + (self.prefix.describe() + " (shared by the served models)" if self.prefix is not None
                   else "no prefix cache"))

    def submit(self, prompt_ids: list[int], params: GenerationParams, adapter: str | None = None) -> Request:
        """Queue a prompt, run with the model's LoRA adapter `adapter` if given (requests of several adapters
        share a batch: each row runs its own). Errors here name the numbers: an empty prompt, a prompt plus
        max_tokens longer than the context, a full queue (QueueFull)."""
        if adapter is not None and adapter not in self.adapters:
            raise SolError(f"adapter {adapter!r}: the model has no adapter of that name")
        if not prompt_ids:
            raise SolError("the prompt is empty; give at least one token of text")
        params.sampling.validate()
        if params.max_tokens < 1:
            raise SolError(f"max_tokens {params.max_tokens}: must be at least 1")
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_len:
            raise SolError(f"the prompt's {len(prompt_ids)} tokens plus max_tokens {params.max_tokens} = {need} "
                           f"do not fit the context window of {self.max_len}; shorten the prompt or ask for "
                           f"at most {max(self.max_len - len(prompt_ids), 0)} tokens")
        request = Request(self, prompt_ids, params, adapter)
        with self._lock:
            if self._closing:
                raise SolError("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_batch} requests are running and {len(self.waiting)} are waiting "
                                f"(the queue holds {self.max_queue}); try again later")
            self.waiting.append(request)
            self._lock.notify()
        return request

    def start(self) -> None:
        """Run step() on a background thread until close()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sol-batch-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything in flight and waiting, and stop the thread."""
        with self._lock:
            self._closing = True
            for r in list(self.waiting) + [row.request for row in self.rows]:
                r._cancel.set()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self.step()   # no thread: finish the cancelled ones here

    # ---- the loop --------------------------------------------------------------
    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self.rows or self.waiting or self._closing):
                    self._lock.wait()
                if self._closing and not (self.rows or self.waiting):
                    return
            try:
                self.step()
            except Exception as e:   # one bad step must not leave clients waiting forever
                self._fail_all(e)

    def step(self) -> bool:
        """Admit waiting requests, choose every live row's next token, run one decode step.
        Returns False when there was nothing to do."""
        with torch.inference_mode():
            self._admit()
            if not self.rows:
                return False
            going = [row for row in self.rows if self._choose(row)]
            self._keep(going)
            if going:
                self.cache.reserve(max(r.length for r in going) + 1)
                self._use([r.request.adapter for r in going])
                # Every thread: steps come back to back, and two threads decode a small float16 or int8 model
                # 1.5x faster (generation/threads.py is for the work that follows a pause).
                logits = self.step_fn([r.decoding.token for r in going], [r.length for r in going])
                logits = logits.float().cpu()   # one copy for the batch, not one per row
                self._past_switch(going, logits)
                for r, row_logits in zip(going, logits):
                    r.logits = row_logits
                    r.length += 1
        return True

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (cancelled ones just finish)."""
        while len(self.rows) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            decoding = Decoding(self.engine, request.params, request.prompt_ids, self.max_len)
            if request.cancelled:
                decoding.cancel()
                self._finish(request, decoding)
                continue
            n = len(request.prompt_ids)
            self.cache.reserve(n + 1)
            row = len(self.rows)
            view = self.cache.rows(row, row + 1)
            # A prefix some earlier sequence had: copy its rows, prefill the rest (at least one token, for logits).
            hit = self.prefix.lookup(self._key(request), request.prompt_ids, n - 1) if self.prefix is not None else None
            if hit is not None:
                start, k, v = hit
                for i in range(len(view.k)):
                    view.k[i][0, :, :start].copy_(k[i][:, :start])
                    view.v[i][0, :, :start].copy_(v[i][:, :start])
                view.pos = request.cached_tokens = start
            rest = request.prompt_ids[view.pos:]
            self._use([request.adapter])
            with threads_for(self.model, len(rest)):
                if len(rest) == 1 and row == 0 and self.model.rope_switch is None:
                    # A prefix hit leaves one token (an idle server, most often): the decode step's one-row
                    # path runs it, not the whole model's forward, whose hundred small products cost 3 ms of
                    # a 6 ms time to first token on the words model.
                    logits = self._one_row(rest[0], view.pos)
                else:
                    x = torch.tensor([rest], dtype=torch.long, device=self.model.device)
                    logits = self.model(x, cache=view, last_only=True)[0, -1]
            self.rows.append(_Row(request, decoding, n, logits))

    def _one_row(self, token: int, position: int) -> torch.Tensor:
        """A prefix hit's one remaining token, through the decode step as row 0."""
        return self.step_fn([token], [position]).float().cpu()[0]

    def _past_switch(self, going: list[_Row], logits: torch.Tensor) -> None:
        """longrope (Phi-3/4): a row whose sequence just passed the switch length has keys cached with the
        short factors; recompute it whole with the long ones, as transformers' generate does."""
        switch = self.model.rope_switch
        for i, r in enumerate(going):
            if switch is not None and r.length == switch:
                self._use([r.request.adapter])
                x = torch.tensor([r.decoding.history], dtype=torch.long, device=self.model.device)
                logits[i] = self.model(x, cache=self.cache.rows(i, i + 1), last_only=True)[0, -1].float().cpu()

    def _key(self, request: Request) -> str:
        """The prefix cache's key: an adapter changes every layer's keys and values, so a base and each of its
        adapters keep their own entries."""
        return self.cache_key if request.adapter is None else f"{self.cache_key}\x00{request.adapter}"

    def _use(self, adapters: list) -> None:
        """The adapter of each batch row, on this (the engine's) thread; one name where the rows agree."""
        if self.adapters:
            active = (threading.get_ident(), adapters[0] if len(set(adapters)) == 1 else adapters)
            if active != self._active:   # most steps run the same rows as the step before
                lora.use_here(self.model, active[1], self._lora_layers)
                self._active = active

    def _choose(self, row: _Row) -> bool:
        """Sample the row's next token and hand its event over. True if the row goes on."""
        d = row.decoding
        if row.request.cancelled:
            d.cancel()
        else:
            event = d.step(row.logits)
            if event is not None:
                row.request._put(event)
        if d.reason is None:
            return True
        if self.prefix is not None and d.reason != "cancelled":
            i = self.rows.index(row)   # still in place: rows move only after every row has chosen
            n = row.length
            self.prefix.store(self._key(row.request), d.history[:n], [t[i, :, :n] for t in self.cache.k],
                              [t[i, :, :n] for t in self.cache.v])
        self._finish(row.request, d)
        return False

    def _keep(self, going: list[_Row]) -> None:
        """Rows that go on move to the front of the cache, in order, so they are rows 0..n-1."""
        for i, row in enumerate(going):
            old = self.rows.index(row)
            if old != i:
                self.cache.move_row(old, i)
                self.rows[old], self.rows[i] = self.rows[i], self.rows[old]
        del self.rows[len(going):]

    def _finish(self, request: Request, decoding: Decoding) -> None:
        request.finished = True
        request._put(decoding.done())

    def _fail_all(self, error: Exception) -> None:
        """A step raised: end every live and waiting request with an "error" DoneEvent naming it."""
        with self._lock:
            requests = [r.request for r in self.rows] + list(self.waiting)
            self.rows.clear()
            self.waiting.clear()
        for r in requests:
            if not r.finished:
                r.finished = True
                r._put(DoneEvent([], "", len(r.prompt_ids), 0, 0.0, f"error: {type(error).__name__}: {error}"))
