"""What chat and completions share: engine requests, and what has been sent of each.

Each choice of a request is one engine request. The engine hands its events to the event loop
(`Request.listen`: call_soon_threadsafe into an asyncio queue), so the event loop never blocks on
the engine and /health answers while every decode step runs. A client that goes away cancels its
engine requests (the stream's `finally`, or collect's), so the engine drops them at its next step.
"""
from __future__ import annotations

import asyncio
import time

from fastapi import Request

from ..chat.markup import END_MARKERS, JSON_CALL, OPEN_MARKERS, SOL_CALL
from ..chat.session import parse_json_call, parse_sol_call
from ..errors import SolError
from ..generation.batch import QueueFull
from ..generation.engine import DoneEvent, GenerationParams
from . import protocol as P
from .constrain import Constraint, grammar_for, lark_grammar
from .served import Served, ServeState


# ---- one choice: an engine request and what has been sent of it ---------------------------
class Choice:
    def __init__(self, index: int, req, stops: tuple[str, ...], tools: dict | None, hidden: tuple[str, ...] = (),
                 conversation: list | None = None):
        self.index, self.req, self.tools = index, req, tools
        self.holds = stops + (OPEN_MARKERS if tools is not None else ())
        # Special tokens' texts that never reach content, and their beginnings (held back while they may complete).
        self.hidden = hidden
        self._partial = {h[:k] for h in hidden for k in range(1, len(h))}
        self._longest = max((len(h) for h in hidden), default=0)
        self.conversation = conversation   # this choice's own messages, when the server runs its tools
        self.text = ""          # the text of the token events so far
        self.raw = ""           # ... all of it, once the DoneEvent came
        self.sent = 0           # characters of it already sent as content
        self.events = []        # TokenEvents
        self.done: DoneEvent | None = None
        self.before = ""        # content of earlier segments, when the server ran a tool in between
        self.rounds: list[dict] = []   # the tools the server ran: {"name", "arguments", "result"}

    def add(self, ev) -> str:
        """Take a token event; returns the content that is now safe to send."""
        self.events.append(ev)
        self.text += ev.text
        return self._release(self._safe_end(self.text))

    def _safe_end(self, text: str) -> int:
        """Send nothing that could still become a stop string, a tool call's opening or a special token."""
        end = len(text)
        if self.tools is not None:
            at = [text.find(m) for m in OPEN_MARKERS if m in text]
            if at:
                return min(at)
        for s in self.holds:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:   # the token that completes a stop string comes before the DoneEvent
                end = min(end, at)
                continue
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    end = min(end, len(text) - k)
                    break
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            if text[-k:] in self._partial:
                end = min(end, len(text) - k)
                break
        return end

    def _visible(self, text: str) -> str:
        for h in self.hidden:
            if h in text:
                text = text.replace(h, "")
        return text

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return self._visible(out)

    def finish(self, done: DoneEvent) -> str:
        """The last content to send once the DoneEvent came."""
        self.done = done
        self.raw = self.text    # every token's text, past where a stop string cut the answer
        self.text = self._segment() or ""
        return self._release(len(self.text))

    def restart(self, req, call, result: str) -> None:
        """Go on with a new engine request after the server ran the tool the model called."""
        self.before += self._visible(self._segment() or "")
        self.rounds.append({"name": call.name, "arguments": call.arguments, "result": result})
        self.req, self.text, self.raw, self.sent, self.done = req, "", "", 0, None

    def calls(self) -> list:
        """The complete tool calls of the answer, in order (the last one may have lost its end marker
        to the stop string that ended the answer: that one, not a client's stop string inside a call)."""
        if self.tools is None or self.done is None:
            return []
        text = self.done.text
        found = find_tool_calls(text, self.tools)
        if found or self.done.stop_reason != "stop_string":
            return found
        cut = self.raw[len(text):]
        end = next((e for e in END_MARKERS.values() if cut.startswith(e)), None)
        return find_tool_calls(text + end, self.tools) if end else []

    def call(self):
        calls = self.calls()
        return calls[0] if calls else None

    def _segment(self) -> str | None:
        text = self.done.text
        if self.call() is not None:
            cut = min(text.find(m) for m in OPEN_MARKERS if m in text)
            return text[:cut].strip() or None
        return text

    def content(self) -> str | None:
        segment = self._segment()
        segment = self._visible(segment) if segment is not None else None
        return (self.before + (segment or "")) if self.before else segment

    def finish_reason(self) -> str:
        return "tool_calls" if self.call() is not None else P.FINISH.get(self.done.stop_reason, "stop")


def find_tool_calls(text: str, tools: dict) -> list:
    """Every complete, readable tool call in the text, in order, in either markup."""
    found = [(m.start(), parse_sol_call(m.group(1), tools)) for m in SOL_CALL.finditer(text)]
    found += [(m.start(), parse_json_call(m.group(1))) for m in JSON_CALL.finditer(text)]
    return [c for _, c in sorted(found, key=lambda x: x[0]) if c.error is None]


# ---- engine requests: submitted, relayed to the event loop, collected or cancelled ---------
def relay(reqs: list, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """(index, event) pairs of several engine requests, in the order they arrive."""
    q: asyncio.Queue = asyncio.Queue()
    for i, req in enumerate(reqs):
        relay_into(q, i, req, loop)
    return q


def relay_into(q: asyncio.Queue, i: int, req, loop: asyncio.AbstractEventLoop) -> None:
    def hand(ev):   # on the engine's thread
        try:
            loop.call_soon_threadsafe(q.put_nowait, (i, ev))
        except RuntimeError:   # the event loop has closed (the server stopped): no one waits for it
            pass
    req.listen(hand)


def submit(state: ServeState, s: Served, ids: list[int], params: GenerationParams, param: str):
    if state.closing:
        raise P.ApiError(503, "the server is shutting down", None, "shutting_down", "server_error",
                         {"Retry-After": "5"})
    try:
        req = s.engine.submit(ids, params, adapter=s.adapter)
    except QueueFull as e:
        raise P.ApiError(503, f"the server is busy: {e}", None, "queue_full", "server_error",
                         {"Retry-After": "1"}) from None
    except SolError as e:   # the prompt and max_tokens do not fit the context: the engine names the numbers
        raise P.ApiError(400, str(e), param, "context_length_exceeded") from None
    state.inflight.add(req)
    return req


def submit_all(state: ServeState, s: Served, ids: list[int], params: GenerationParams, n: int, constrained,
               param: str) -> list:
    reqs = []
    try:
        for i in range(n):
            seed = params.sampling.seed
            sampling = P.SamplingParams(**{**params.sampling.__dict__,
                                           "seed": None if seed is None else seed + i})
            proc = constrained() if constrained else None
            p = GenerationParams(**{**params.__dict__, "sampling": sampling, "logits_processor": proc})
            reqs.append(submit(state, s, ids, p, param))
    except P.ApiError:
        for r in reqs:
            r.cancel()
        raise
    return reqs


def cancel_all(state: ServeState, reqs) -> None:
    for r in reqs:
        r.cancel()
        state.inflight.discard(r)


async def collect(state: ServeState, request: Request, choices: list[Choice], more=None) -> None:
    """Wait for every choice's DoneEvent; a client that leaves cancels them. `more(choice, q)`
    may go on with a new engine request (a tool the server ran) and returns True if it did."""
    q = relay([c.req for c in choices], asyncio.get_running_loop())
    left = len(choices)
    checked = time.monotonic()
    try:
        while left:
            try:
                i, ev = await asyncio.wait_for(q.get(), 0.05)
            except asyncio.TimeoutError:
                i, ev = None, None
            if time.monotonic() - checked > 0.05:   # tokens may come faster than that: check on time
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if ev is None:
                continue
            if isinstance(ev, DoneEvent):
                choices[i].finish(ev)
                if more is None or not await more(choices[i], q):
                    left -= 1
            else:
                choices[i].add(ev)
    finally:
        cancel_all(state, [c.req for c in choices])


def engine_error(done: DoneEvent) -> P.ApiError:
    return P.ApiError(500, f"the engine failed on this request: {done.stop_reason.removeprefix('error: ')}",
                      None, "engine_error", "server_error")


def failed(choices: list[Choice]) -> None:
    for c in choices:
        if c.done is not None and c.done.stop_reason.startswith("error"):
            raise engine_error(c.done)


# ---- reading requests ------------------------------------------------------------------------
def request_params(body: dict, s: Served, ids: list[int], stops: tuple[str, ...], want_top: bool, top_n: int,
                   stop_ids: tuple[int, ...], tools, forced_call: str | None = None):
    """Params for the engine, how many choices, whether to explain, and a maker of constraints.
    `forced_call`: a Lark grammar of the tool calls the answer must be (tool_choice "required" or named);
    the grammar then ends the calls, not the end markers' stop strings."""
    sampling = P.sampling(body, getattr(s.lm, "sampling", None))
    n = P.integer(body, "n", 1, 1, 16)
    explain = P.flag(body, "sol_explain")
    room = s.context - len(ids)
    limit = P.max_tokens(body, room)
    strings = stops + (tuple(END_MARKERS.values()) if tools is not None and forced_call is None else ())
    constrained = None
    fmt = body.get("response_format")
    if fmt is not None and not isinstance(fmt, dict):
        raise P.bad("response_format", 'give an object such as {"type": "json_object"}')
    where = "tool_choice" if forced_call is not None else "response_format"
    try:
        grammar = lark_grammar(forced_call, "tool_choice") if forced_call is not None else \
            grammar_for(fmt) if fmt is not None else None
        if grammar is not None:
            ll = s.ll_tokenizer()
            vocab = s.lm.config.vocab_size

            def constrained():
                return Constraint(ll, grammar, stop_ids, s.tokenizer, vocab, specials=forced_call is not None)
            constrained().check_start()
    except SolError as e:
        raise P.ApiError(400, str(e), where, "invalid_value") from None
    params = GenerationParams(max_tokens=limit, sampling=sampling, stop_ids=stop_ids, stop_strings=strings,
                    explain=want_top or explain, top_n=max(top_n, 1) if want_top else 0)
    return params, n, explain, constrained
