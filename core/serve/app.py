"""The HTTP side of `sol serve`: FastAPI routes that turn OpenAI requests into engine requests.

Each choice of a request is one engine request. A small thread per engine request relays its
events into an asyncio queue, so the event loop never blocks on the engine and /health answers
while every decode step runs. A client that goes away cancels its engine requests (the stream's
`finally`), so the engine drops them at its next step.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from ..batch import QueueFull
from ..chat import END_MARKERS, MAX_TOOL_ROUNDS, TESTS_NONE, find_tool_call, json_string_arguments, result_text
from ..engine import DoneEvent, GenerationParams, end_of_turn_ids, stop_ids_for
from ..errors import SolError
from . import protocol as P
from .constrain import Constraint, grammar_for, ll_tokenizer

OPEN_MARKERS = ("<|tool_call|>", "<tool_call>")


@dataclass
class Served:
    """One loaded model and the engine that serves it."""
    name: str
    lm: object                      # checkpoint.LoadedModel
    engine: object                  # BatchEngine
    _texts: dict = field(default_factory=dict)
    _ll: object = None
    _ll_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        extra = getattr(self.lm.config, "extra", None)
        self.end_ids = end_of_turn_ids(self.lm.tokenizer, extra)
        self.stop_ids = stop_ids_for(self.lm.tokenizer, extra)
        defaults = getattr(self.lm, "sampling", None)
        if defaults:   # what requests that leave a field out get: refuse a bad one at start-up, by its file
            try:
                P.SamplingParams(**defaults).validate()
            except SolError as e:
                raise SolError(f"{self.lm.path / 'generation_config.json'}: {e}") from None

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def context(self) -> int:
        return self.lm.config.context

    def token_text(self, i: int) -> str:
        t = self._texts.get(i)
        if t is None:
            t = self._texts[i] = self.tokenizer.decode([i])
        return t

    def ll_tokenizer(self):
        with self._ll_lock:   # built once (up to a second for a large vocabulary)
            if self._ll is None:
                self._ll = ll_tokenizer(self.tokenizer, self.lm.config.vocab_size)
            return self._ll


# ---- one choice: an engine request and what has been sent of it ---------------------------
class Choice:
    def __init__(self, index: int, req, stops: tuple[str, ...], tools: dict | None):
        self.index, self.req, self.tools = index, req, tools
        self.holds = stops + (OPEN_MARKERS if tools is not None else ())
        self.text = ""          # the text of the token events so far
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
        """Send nothing that could still become a stop string or a tool call's opening."""
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
        return end

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def finish(self, done: DoneEvent) -> str:
        """The last content to send once the DoneEvent came."""
        self.done = done
        self.text = self._segment() or ""
        return self._release(len(self.text))

    def restart(self, req, call, result: str) -> None:
        """Go on with a new engine request after the server ran the tool the model called."""
        self.before += self._segment() or ""
        self.rounds.append({"name": call.name, "arguments": call.arguments, "result": result})
        self.req, self.text, self.sent, self.done = req, "", 0, None

    def call(self):
        if self.tools is None or self.done is None:
            return None
        text = self.done.text
        for end in END_MARKERS.values():
            call = find_tool_call(text + end, self.tools)
            if call is not None and call.error is None:
                return call
        return None

    def _segment(self) -> str | None:
        text = self.done.text
        if self.call() is not None:
            cut = min(text.find(m) for m in OPEN_MARKERS if m in text)
            return text[:cut].strip() or None
        return text

    def content(self) -> str | None:
        segment = self._segment()
        return (self.before + (segment or "")) if self.before else segment

    def finish_reason(self) -> str:
        return "tool_calls" if self.call() is not None else P.FINISH.get(self.done.stop_reason, "stop")


def tool_calls_json(call, index: int) -> list[dict]:
    # Nine letters and digits: Mistral's templates refuse any other id when the client sends it back.
    return [{"index": 0, "id": uuid.uuid4().hex[:9], "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}]


class _Tool:
    """What chat.parse_sol_call reads of a tool: its parameters' JSON schema."""

    def __init__(self, parameters: dict):
        self.parameters = parameters if isinstance(parameters, dict) else {}


def relay(reqs: list, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """(index, event) pairs of several engine requests, in the order they arrive."""
    q: asyncio.Queue = asyncio.Queue()
    for i, req in enumerate(reqs):
        relay_into(q, i, req, loop)
    return q


def relay_into(q: asyncio.Queue, i: int, req, loop: asyncio.AbstractEventLoop) -> None:
    def run():
        for ev in req:
            loop.call_soon_threadsafe(q.put_nowait, (i, ev))
    threading.Thread(target=run, daemon=True, name=f"sol-serve-relay-{i}").start()


class KeyCheck:
    """401 for /v1 and /sol requests without `Authorization: Bearer KEY`. Plain ASGI, not
    BaseHTTPMiddleware: that one hides a client's disconnect from the endpoint."""

    def __init__(self, app, key: str, log):
        self.app, self.key, self.log = app, f"Bearer {key}".encode(), log

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(("/v1", "/sol")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                self.log({"endpoint": scope["path"], "status": 401, "error": "missing or wrong API key"})
                e = P.ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with the key "
                                    "`sol serve` was started with", None, "invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the application ---------------------------------------------------------------------
def create_app(served: list[Served], api_key: str | None = None, cors_origins: list[str] | None = None,
               log=None, plugins=None):
    """`plugins`: a PluginManager whose tools the server offers to the model and runs itself when a
    request brings no tools of its own (`sol serve --plugin-tools`)."""
    models = {s.name: s for s in served}
    app = FastAPI(title="Sol", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.closing = False
    inflight: set = set()
    log = log or (lambda entry: None)

    if api_key:
        app.add_middleware(KeyCheck, key=api_key, log=log)
    if cors_origins:   # added last, so outermost: refusals carry the CORS headers too
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    def error_response(e: P.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(P.ApiError)
    async def _api_error(request, e: P.ApiError):
        log({"endpoint": request.url.path, "status": e.status, "error": e.message})
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(P.ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                         None, None, kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        first = (e.errors() or [{}])[0]
        return error_response(P.ApiError(400, f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg')}",
                                         None, "invalid_value"))

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise P.ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise P.ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def pick(body: dict) -> Served:
        name = body.get("model")
        if name is None and len(models) == 1:
            return next(iter(models.values()))
        if name not in models:
            raise P.ApiError(404, f"model {name!r} is not served here; served: {', '.join(models)}", "model",
                             "model_not_found", "not_found_error")
        return models[name]

    def submit(s: Served, ids: list[int], params: GenerationParams, param: str):
        if app.state.closing:
            raise P.ApiError(503, "the server is shutting down", None, "shutting_down", "server_error",
                             {"Retry-After": "5"})
        try:
            req = s.engine.submit(ids, params)
        except QueueFull as e:
            raise P.ApiError(503, f"the server is busy: {e}", None, "queue_full", "server_error",
                             {"Retry-After": "1"}) from None
        except SolError as e:   # the prompt and max_tokens do not fit the context: the engine names the numbers
            raise P.ApiError(400, str(e), param, "context_length_exceeded") from None
        inflight.add(req)
        return req

    def submit_all(s: Served, ids: list[int], params: GenerationParams, n: int, constrained,
                   param: str) -> list:
        reqs = []
        try:
            for i in range(n):
                seed = params.sampling.seed
                sampling = P.SamplingParams(**{**params.sampling.__dict__,
                                               "seed": None if seed is None else seed + i})
                proc = constrained() if constrained else None
                p = GenerationParams(**{**params.__dict__, "sampling": sampling, "logits_processor": proc})
                reqs.append(submit(s, ids, p, param))
        except P.ApiError:
            for r in reqs:
                r.cancel()
            raise
        return reqs

    def cancel_all(reqs) -> None:
        for r in reqs:
            r.cancel()
            inflight.discard(r)

    app.state.cancel_inflight = lambda: cancel_all(list(inflight))

    async def collect(request: Request, choices: list[Choice], more=None) -> None:
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
            cancel_all([c.req for c in choices])

    async def run_tool(s: Served, c: Choice, messages: list, tool_list: list, params: GenerationParams,
                       q: asyncio.Queue, template_vars: dict) -> bool:
        """The model called one of the server's plugin tools: run it, add the call and its result to the
        conversation, and go on with a new engine request for the rest of the answer."""
        call = c.call()
        used = len(c.events)   # tokens of this answer so far, every segment
        if call is None or len(c.rounds) >= MAX_TOOL_ROUNDS or used >= params.max_tokens:
            return False
        result = result_text(await asyncio.to_thread(plugins.call_tool, call.name, call.arguments))
        call_id = uuid.uuid4().hex[:9]
        messages += [{"role": "assistant", "content": c._segment(),
                      "tool_calls": [{"id": call_id, "type": "function",
                                      "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]},
                     {"role": "tool", "tool_call_id": call_id, "content": result}]
        ids = s.tokenizer.encode_ids(render_chat(s, messages, tool_list, template_vars), add_special_tokens=False)
        budget = min(params.max_tokens - used, s.context - len(ids))
        if budget < 1:
            return False
        req = submit(s, ids, replace(params, max_tokens=budget), "messages")
        c.restart(req, call, result)
        relay_into(q, c.index, req, asyncio.get_running_loop())
        return True

    # ---- endpoints -----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "closing" if app.state.closing else "ok", "models": list(models),
                "active": sum(s.engine.active for s in served), "queued": sum(s.engine.queued for s in served)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "sol"}
                                           for s in served]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name not in models:
            raise P.ApiError(404, f"model {name!r} is not served here", "model", "model_not_found", "not_found_error")
        return {"id": name, "object": "model", "created": 0, "owned_by": "sol"}

    @app.post("/sol/tokenize")
    async def tokenize(request: Request):
        from ..commands.tokenize import encoding_json
        body = await read_body(request)
        s = pick(body)
        if not isinstance(body.get("text"), str):
            raise P.bad("text", "give the text to tokenize as a string")
        return encoding_json(s.tokenizer.encode(body["text"]))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_body(request)
        s = pick(body)
        inputs = embedding_inputs(s, body.get("input"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise P.bad("encoding_format", "use float or base64")
        for ids in inputs:
            if len(ids) > s.context:
                raise P.ApiError(400, f"input has {len(ids)} tokens, more than the model's context of {s.context}",
                                 "input", "context_length_exceeded")
        t0 = time.perf_counter()
        vectors = await asyncio.to_thread(embed, s.lm.model, inputs)
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(ids) for ids in inputs)
        log({"endpoint": "/v1/embeddings", "status": 200, "prompt_tokens": n, "completion_tokens": 0,
             "duration_s": time.perf_counter() - t0})
        return {"object": "list", "data": data, "model": s.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        s = pick(body)
        tools, tool_list = chat_tools(body)
        server_tools = plugins is not None and tools is None and body.get("tool_choice") != "none"
        if server_tools:   # the request brings no tools: offer the server's, and run them here
            tools, tool_list = plugins.tools(), plugins.tool_schemas()
            if P.integer(body, "n", 1, 1, 16) > 1:
                raise P.bad("n", "must be 1 when the server runs its plugin tools (--plugin-tools)")
        conversation = list(body.get("messages") or []) if isinstance(body.get("messages"), list) else None
        try:
            prompt = render_chat(s, body.get("messages"), tool_list if tools is not None else None,
                                 template_kwargs(body))
        except SolError as e:
            raise P.ApiError(400, str(e), "messages", "invalid_value") from None
        ids = s.tokenizer.encode_ids(prompt, add_special_tokens=False)
        logprobs = P.flag(body, "logprobs")
        top_n = P.integer(body, "top_logprobs", 0, 0, P.MAX_TOP_LOGPROBS)
        if top_n and not logprobs:
            raise P.bad("top_logprobs", "needs `logprobs: true`")
        stops = P.stop_strings(body)
        params, n, explain, constrained = request_params(body, s, ids, stops, logprobs or top_n > 0, top_n,
                                                         s.end_ids, tools)
        stream = P.flag(body, "stream")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        reqs = submit_all(s, ids, params, n, constrained, "messages")
        choices = [Choice(i, r, stops, tools) for i, r in enumerate(reqs)]
        more = ((lambda c, q: run_tool(s, c, conversation, tool_list, params, q, template_kwargs(body)))
                if server_tools else None)
        rid, created, t0 = P.new_id("chatcmpl"), P.now(), time.perf_counter()
        head = {"id": rid, "created": created, "model": s.name, "system_fingerprint": None}

        def done_log(choices):
            log({"endpoint": "/v1/chat/completions", "status": 200, "prompt_tokens": len(ids),
                 "completion_tokens": sum(len(c.events) for c in choices),
                 "duration_s": time.perf_counter() - t0})

        def token_logprobs(c, events):
            return {"content": [P.chat_logprob(ev, top_n, s.token_text(ev.id)) for ev in events]} if logprobs else None

        if not stream:
            await collect(request, choices, more)
            failed(choices)
            done_log(choices)
            out = []
            for c in choices:
                msg = {"role": "assistant", "content": c.content()}
                if c.rounds:
                    msg["sol_tool_rounds"] = c.rounds
                call = c.call()
                if call is not None:
                    msg["tool_calls"] = [{k: v for k, v in t.items() if k != "index"} for t in tool_calls_json(call, c.index)]
                item = {"index": c.index, "message": msg, "logprobs": token_logprobs(c, c.events),
                        "finish_reason": c.finish_reason()}
                if explain:
                    item["sol_explain"] = [ev.explanation.to_dict() if ev.explanation else None for ev in c.events]
                out.append(item)
            done = sum(len(c.events) for c in choices)
            return {**head, "object": "chat.completion", "choices": out, "usage": P.usage(len(ids), done)}

        def chunk(index, delta, finish=None, lp=None, **extra):
            d = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra}
            if include_usage:
                d["usage"] = None
            return json.dumps(d, ensure_ascii=False)

        async def events():
            q = relay(reqs, asyncio.get_running_loop())
            left = len(choices)
            try:
                for c in choices:
                    yield chunk(c.index, {"role": "assistant", "content": ""})
                while left:
                    i, ev = await q.get()
                    c = choices[i]
                    if isinstance(ev, DoneEvent):
                        if ev.stop_reason.startswith("error"):
                            left -= 1
                            yield json.dumps(engine_error(ev).body())
                            continue
                        rest = c.finish(ev)
                        if rest:
                            yield chunk(i, {"content": rest})
                        if more is not None and await more(c, q):
                            r = c.rounds[-1]
                            yield chunk(i, {}, None, sol_tool_round=r)
                            continue
                        left -= 1
                        call = c.call()
                        if call is not None:
                            yield chunk(i, {"tool_calls": tool_calls_json(call, i)})
                        yield chunk(i, {}, c.finish_reason())
                        continue
                    piece = c.add(ev)
                    extra = {"sol_explain": ev.explanation.to_dict() if ev.explanation else None} if explain else {}
                    if piece or logprobs or explain:
                        yield chunk(i, {"content": piece}, None, token_logprobs(c, [ev]), **extra)
                done_log(choices)
                if include_usage:
                    u = P.usage(len(ids), sum(len(c.events) for c in choices))
                    yield json.dumps({**head, "object": "chat.completion.chunk", "choices": [], "usage": u})
                yield "[DONE]"
            finally:
                cancel_all([c.req for c in choices])   # the latest request of each

        return EventSourceResponse(events(), sep="\n")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        s = pick(body)
        ids = completion_prompt(s, body.get("prompt"))
        top_n = P.integer(body, "logprobs", None, 0, P.MAX_TOP_LOGPROBS)
        echo = P.flag(body, "echo")
        stops = P.stop_strings(body)
        params, n, explain, constrained = request_params(body, s, ids, stops, top_n is not None, top_n or 0,
                                                         s.stop_ids, None)
        stream = P.flag(body, "stream")
        if stream and echo:
            raise P.bad("echo", "is not supported with stream; ask without stream")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        reqs = submit_all(s, ids, params, n, constrained, "prompt")
        choices = [Choice(i, r, stops, None) for i, r in enumerate(reqs)]
        rid, created, t0 = P.new_id("cmpl"), P.now(), time.perf_counter()
        head = {"id": rid, "object": "text_completion", "created": created, "model": s.name,
                "system_fingerprint": None}
        prompt_text = s.tokenizer.decode(ids)

        def logprobs_of(events, offset):
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for ev in events:
                text = s.token_text(ev.id)
                out["tokens"].append(text)
                out["token_logprobs"].append(ev.logprob)
                out["top_logprobs"].append({t["text"]: P._logprob(t["prob"]) for t in ev.top[:top_n]})
                out["text_offset"].append(offset)
                offset += len(text)
            return out

        if not stream:
            await collect(request, choices)
            failed(choices)
            echo_lp = await asyncio.to_thread(prompt_logprobs, s, ids, top_n) if echo and top_n is not None else None
            out = []
            for c in choices:
                text = c.content()
                lp = None
                if top_n is not None:
                    lp = logprobs_of(c.events, len(prompt_text) if echo else 0)
                    if echo_lp:
                        lp = {k: echo_lp[k] + lp[k] for k in lp}
                item = {"index": c.index, "text": (prompt_text if echo else "") + text, "logprobs": lp,
                        "finish_reason": c.finish_reason()}
                if explain:
                    item["sol_explain"] = [ev.explanation.to_dict() if ev.explanation else None for ev in c.events]
                out.append(item)
            done = sum(c.done.completion_tokens for c in choices)
            log({"endpoint": "/v1/completions", "status": 200, "prompt_tokens": len(ids), "completion_tokens": done,
                 "duration_s": time.perf_counter() - t0})
            return {**head, "choices": out, "usage": P.usage(len(ids), done)}

        def chunk(index, text, finish=None, lp=None, **extra):
            d = {**head, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}], **extra}
            if include_usage:
                d["usage"] = None
            return json.dumps(d, ensure_ascii=False)

        async def events():
            q = relay(reqs, asyncio.get_running_loop())
            left = len(choices)
            try:
                while left:
                    i, ev = await q.get()
                    c = choices[i]
                    if isinstance(ev, DoneEvent):
                        left -= 1
                        if ev.stop_reason.startswith("error"):
                            yield json.dumps(engine_error(ev).body())
                            continue
                        rest = c.finish(ev)
                        yield chunk(i, rest, c.finish_reason())
                        continue
                    piece = c.add(ev)
                    extra = {"sol_explain": ev.explanation.to_dict() if ev.explanation else None} if explain else {}
                    lp = logprobs_of([ev], 0) if top_n is not None else None
                    if piece or lp or explain:
                        yield chunk(i, piece, None, lp, **extra)
                done = sum(c.done.completion_tokens for c in choices)
                log({"endpoint": "/v1/completions", "status": 200, "prompt_tokens": len(ids),
                     "completion_tokens": done, "duration_s": time.perf_counter() - t0})
                if include_usage:
                    yield json.dumps({**head, "choices": [], "usage": P.usage(len(ids), done)})
                yield "[DONE]"
            finally:
                cancel_all(reqs)

        return EventSourceResponse(events(), sep="\n")

    return app


def engine_error(done: DoneEvent) -> P.ApiError:
    return P.ApiError(500, f"the engine failed on this request: {done.stop_reason.removeprefix('error: ')}",
                      None, "engine_error", "server_error")


def failed(choices: list[Choice]) -> None:
    for c in choices:
        if c.done is not None and c.done.stop_reason.startswith("error"):
            raise engine_error(c.done)


# ---- reading requests ------------------------------------------------------------------------
def request_params(body: dict, s: Served, ids: list[int], stops: tuple[str, ...], want_top: bool, top_n: int,
                   stop_ids: tuple[int, ...], tools):
    """Params for the engine, how many choices, whether to explain, and a maker of constraints."""
    sampling = P.sampling(body, getattr(s.lm, "sampling", None))
    n = P.integer(body, "n", 1, 1, 16)
    explain = P.flag(body, "sol_explain")
    room = s.context - len(ids)
    limit = P.max_tokens(body, room)
    strings = stops + (tuple(END_MARKERS.values()) if tools is not None else ())
    constrained = None
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise P.bad("response_format", 'give an object such as {"type": "json_object"}')
        try:
            grammar = grammar_for(fmt)
            if grammar is not None:
                ll = s.ll_tokenizer()
                vocab = s.lm.config.vocab_size

                def constrained():
                    return Constraint(ll, grammar, stop_ids, s.tokenizer, vocab)
                constrained().check_start()
        except SolError as e:
            raise P.ApiError(400, str(e), "response_format", "invalid_value") from None
    params = GenerationParams(max_tokens=limit, sampling=sampling, stop_ids=stop_ids, stop_strings=strings,
                    explain=want_top or explain, top_n=max(top_n, 1) if want_top else 0)
    return params, n, explain, constrained


def text_of(content, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise P.bad(where, f"content part of type {p.get('type')!r} is not supported (text only)")
            parts.append(p["text"])
        return "".join(parts)
    raise P.bad(where, "content must be a string or a list of text parts")


def chat_tools(body: dict):
    """({name: _Tool} or None when tools are off, the OpenAI tool list for the template)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        # "required" and a named function would force a call; Sol's sampler cannot yet force one in
        # every chat template's format, and answering as "auto" would break the promise silently.
        raise P.ApiError(400, f"tool_choice {choice!r}: not supported; Sol lets the model choose (\"auto\", the "
                              "default) or offers no tools (\"none\")", "tool_choice", "unsupported_parameter")
    if tools is None or choice == "none":
        return None, []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise P.bad("tools", 'give a list of {"type": "function", "function": {"name", "parameters"}}')
    return {t["function"]["name"]: _Tool(t["function"].get("parameters") or {}) for t in tools}, tools


# What the server itself gives every chat template; a request's chat_template_kwargs cannot replace them.
TEMPLATE_OWN = {"messages", "tools", "documents", "add_generation_prompt"}


def template_kwargs(body: dict) -> dict:
    """`chat_template_kwargs` (as vLLM and llama.cpp's server take it): extra variables for the chat
    template, such as Qwen3's {"enable_thinking": false}."""
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kw):
        raise P.bad("chat_template_kwargs", 'give an object of template variables, e.g. {"enable_thinking": false}')
    own = sorted(TEMPLATE_OWN & set(kw))
    if own:
        raise P.bad("chat_template_kwargs", f"{', '.join(own)} come from the request itself; leave them out")
    return kw


def render_chat(s: Served, messages, tools: list | None, template_vars: dict | None = None) -> str:
    """The prompt: OpenAI messages through the model's chat template (the one transformers would pick
    for these tools), as core/chat.py renders a conversation."""
    template = s.tokenizer.template_for(tools)
    out = chat_messages(s, messages, tools or [], "tool_calls" in template, bool(TESTS_NONE.search(template)))
    kw = template_vars or {}
    try:
        return s.tokenizer.apply_chat_template(out, add_generation_prompt=True, tools=tools, **kw)
    except SolError:
        if not any("tool_calls" in m for m in out):   # DeepSeek's templates want the arguments as a string
            raise
        return s.tokenizer.apply_chat_template(json_string_arguments(out), add_generation_prompt=True, tools=tools,
                                               **kw)


def chat_messages(s: Served, messages, tool_list: list, structured: bool, none_content: bool) -> list[dict]:
    """OpenAI messages as chat templates take them. A template that knows `tool_calls` gets calls
    structured; Sol's gets them in its own markup, others as <tool_call>{json}</tool_call> text."""
    if not isinstance(messages, list) or not messages:
        raise P.bad("messages", "give a non-empty list of {role, content} messages")
    names: dict[str, str] = {}
    out = []
    for k, m in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise P.bad(f"{where}.role", "must be system, user, assistant or tool")
        role = "system" if m["role"] == "developer" else m["role"]
        content = text_of(m.get("content"), f"{where}.content")
        msg = {"role": role, "content": content}
        calls = m.get("tool_calls") or []
        if role == "assistant" and calls:
            parsed = []
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise P.bad(f"{where}.tool_calls[{j}]", "needs function.name and function.arguments")
                try:
                    args = json.loads(f.get("arguments") or "{}")
                except ValueError:
                    raise P.bad(f"{where}.tool_calls[{j}].function.arguments", "is not valid JSON") from None
                names[c.get("id", "")] = f["name"]
                parsed.append((c.get("id") or "", f["name"], args))
            if structured:
                msg["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                     for i, n, a in parsed]
                if not content:
                    msg["content"] = None
                    if not none_content:
                        del msg["content"]
            elif s.tokenizer.is_sol:
                msg["content"] = content + "".join(f"<|tool_call|>{n}: {sol_arguments(n, a, tool_list)}<|tool_end|>"
                                                   for _, n, a in parsed)
            else:
                msg["content"] = content + "".join(
                    "<tool_call>" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False) + "</tool_call>"
                    for _, n, a in parsed)
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id", "")
            msg["name"] = m.get("name") or names.get(m.get("tool_call_id", ""), "")
        out.append(msg)
    return out


def sol_arguments(name: str, args, tool_list: list) -> str:
    """A call's arguments as Sol models write them: the bare value when the tool takes one
    required parameter (`calculator: 12*7`), else a JSON object."""
    tool = next((t["function"] for t in tool_list if t["function"].get("name") == name), None)
    params = (tool or {}).get("parameters") or {}
    required = params.get("required") or list(params.get("properties", {}))
    if isinstance(args, dict) and len(args) == 1 and required and list(args) == [required[0]] \
            and isinstance(args[required[0]], str):
        return args[required[0]]
    return json.dumps(args, ensure_ascii=False)


def completion_prompt(s: Served, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = s.tokenizer.encode_ids(prompt)   # as `sol generate` encodes a prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = list(prompt)
        if any(i < 0 or i >= s.lm.config.vocab_size for i in ids):
            raise P.bad("prompt", f"token ids must be from 0 to {s.lm.config.vocab_size - 1}")
    else:
        raise P.bad("prompt", "give one string or one list of token ids (several prompts: send several requests)")
    if not ids:
        raise P.bad("prompt", "is empty; give at least one token of text")
    return ids


def embedding_inputs(s: Served, value) -> list[list[int]]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise P.bad("input", "give a string, a list of strings, or token ids")
    out = []
    for k, v in enumerate(value):
        ids = s.tokenizer.encode_ids(v, add_special_tokens=False) if isinstance(v, str) else v
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < s.lm.config.vocab_size
                                                           for i in ids):
            raise P.bad(f"input[{k}]", "is empty or not a string / list of valid token ids")
        out.append(ids)
    return out


@torch.inference_mode()
def embed(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    """Mean of the last hidden states over each input's tokens, normalised to length 1."""
    out = []
    for ids in inputs:
        h = model.hidden(torch.tensor([ids], device=model.device))[0].float().mean(0)
        out.append(torch.nn.functional.normalize(h, dim=0).cpu())
    return out


@torch.inference_mode()
def prompt_logprobs(s: Served, ids: list[int], top_n: int) -> dict:
    """`echo` with `logprobs`: each prompt token's log-probability given the ones before (None for the first)."""
    logp = torch.log_softmax(s.lm.model(torch.tensor([ids], device=s.lm.model.device))[0].float(), -1).cpu()
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for k, i in enumerate(ids):
        text = s.token_text(i)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if k == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row = logp[k - 1]
        out["token_logprobs"].append(float(row[i]))
        vals, idx = row.topk(min(top_n, row.numel())) if top_n else (row[:0], row[:0].long())
        out["top_logprobs"].append({s.token_text(int(j)): float(v) for v, j in zip(vals, idx)})
    return out


def print_log(as_json: bool):
    """One line per finished request on stdout: what the GUI's request log reads."""
    def log(entry: dict) -> None:
        entry = {"time": time.strftime("%H:%M:%S"), **entry}
        if as_json:
            line = json.dumps(entry, ensure_ascii=False)
        else:
            tokens = f" {entry.get('prompt_tokens', 0)}+{entry.get('completion_tokens', 0)} tokens" \
                if "prompt_tokens" in entry else ""
            dur = f" {entry['duration_s']:.2f} s" if "duration_s" in entry else ""
            line = f"{entry['time']} {entry['status']} {entry['endpoint']}{tokens}{dur}" + \
                (f" ({entry['error']})" if "error" in entry else "")
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return log
