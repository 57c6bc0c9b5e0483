"""/v1/chat/completions: OpenAI messages through the model's chat template, answered whole or
streamed as server-sent events.

For a request that brings no tools, the server offers the plugin tools it runs for this model
(`sol serve --plugin-tools`, tools.py: by default the ones the model was trained to call) and runs
a call itself (the tool round, per choice), then goes on with the answer. Any other call the model
writes ends its choice as a `tool_calls` message. `tool_choice` "required" or a named function
constrains decoding to the model's call markup (tools.call_grammar)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from ..chat.session import MAX_TOOL_ROUNDS, result_text
from ..errors import SolError
from ..generation.engine import DoneEvent, GenerationParams
from . import protocol as P
from .chat_prompt import chat_tools, render_chat, template_kwargs
from .generate import (
    Choice,
    cancel_all,
    collect,
    engine_error,
    failed,
    relay,
    relay_into,
    request_params,
    submit,
    submit_all,
)
from .served import Served, ServeState, serve_state
from .tools import call_grammar

router = APIRouter()


def tool_calls_json(calls: list) -> list[dict]:
    # Nine letters and digits: Mistral's templates refuse any other id when the client sends it back.
    return [{"index": k, "id": P.new_id("", 9), "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
            for k, call in enumerate(calls)]


async def run_tool(st: ServeState, s: Served, c: Choice, runs: dict, tool_list: list, params: GenerationParams,
                   q: asyncio.Queue, template_vars: dict) -> bool:
    """The model called one of the tools the server runs: run it, add the call and its result to this
    choice's conversation, and go on with a new engine request for the rest of the answer. A call to
    a tool the server does not run ends the choice as a `tool_calls` message."""
    call = c.call()
    used = len(c.events)   # tokens of this answer so far, every segment
    if call is None or call.name not in runs or len(c.rounds) >= MAX_TOOL_ROUNDS or used >= params.max_tokens:
        return False
    result = result_text(await asyncio.to_thread(st.tools.plugins.call_tool, call.name, call.arguments))
    call_id = P.new_id("", 9)
    c.conversation += [{"role": "assistant", "content": c._segment(),
                        "tool_calls": [{"id": call_id, "type": "function",
                                        "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]},
                       {"role": "tool", "tool_call_id": call_id, "content": result}]
    ids = s.tokenizer.encode_ids(render_chat(s, c.conversation, tool_list, template_vars), add_special_tokens=False)
    budget = min(params.max_tokens - used, s.context - len(ids))
    if budget < 1:
        return False
    sampling = params.sampling
    if sampling.seed is not None:   # choice i of n keeps its own seed after the round, as before it
        sampling = replace(sampling, seed=sampling.seed + c.index)
    req = submit(st, s, ids, replace(params, max_tokens=budget, sampling=sampling), "messages")
    c.restart(req, call, result)
    relay_into(q, c.index, req, asyncio.get_running_loop())
    return True


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st = serve_state(request)
    body = await P.read_body(request)
    s = st.pick(body)
    tools, tool_list, forced = chat_tools(body)
    runs = {}
    if tools is None and body.get("tool_choice") != "none":
        # The request brings no tools: the server runs the model's own (sol serve --plugin-tools), and a
        # call to any other comes back as tool_calls, its arguments named by the plugin's schema.
        # On a thread when an MCP server (core/mcp) is still to start, which may take its timeout.
        def look():
            return st.tools.runs(s.trained_tools), st.tools.known()
        runs, known = look() if st.tools.ready() else await asyncio.to_thread(look)
        tools, tool_list = ({**known, **runs}, st.tools.schemas(runs)) if runs else (known, [])
    conversation = list(body.get("messages") or []) if isinstance(body.get("messages"), list) else None
    try:
        prompt = render_chat(s, body.get("messages"), tool_list or None, template_kwargs(body))
    except SolError as e:
        raise P.ApiError(400, str(e), "messages", "invalid_value") from None
    ids = s.tokenizer.encode_ids(prompt, add_special_tokens=False)
    logprobs = P.flag(body, "logprobs")
    top_n = P.integer(body, "top_logprobs", 0, 0, P.MAX_TOP_LOGPROBS)
    if top_n and not logprobs:
        raise P.bad("top_logprobs", "needs `logprobs: true`")
    stops = P.stop_strings(body)
    grammar = None
    if forced is not None:
        # "required" may write several calls (unless parallel_tool_calls is false); a named function one, as
        # OpenAI and vLLM answer it.
        parallel = P.flag(body, "parallel_tool_calls", True) and body.get("tool_choice") == "required"
        grammar = call_grammar(s.tokenizer, {n: t.parameters for n, t in tools.items()}, forced, parallel)
    params, n, explain, constrained = request_params(body, s, ids, stops, logprobs or top_n > 0, top_n,
                                                     s.end_ids, tools, grammar)
    stream = P.flag(body, "stream")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    reqs = submit_all(st, s, ids, params, n, constrained, "messages")
    choices = [Choice(i, r, stops, tools, s.hidden, list(conversation) if runs else None) for i, r in enumerate(reqs)]
    more = ((lambda c, q: run_tool(st, s, c, runs, tool_list, params, q, template_kwargs(body)))
            if runs else None)
    rid, created, t0 = P.new_id("chatcmpl"), P.now(), time.perf_counter()
    head = {"id": rid, "created": created, "model": s.name, "system_fingerprint": None}

    def done_log(choices):
        st.log({"endpoint": "/v1/chat/completions", "status": 200, "prompt_tokens": len(ids),
                "completion_tokens": sum(len(c.events) for c in choices),
                "duration_s": time.perf_counter() - t0})

    def token_logprobs(c, events):
        return {"content": [P.chat_logprob(ev, top_n, s.token_text(ev.id)) for ev in events]} if logprobs else None

    if not stream:
        await collect(st, request, choices, more)
        failed(choices)
        done_log(choices)
        out = []
        for c in choices:
            msg = {"role": "assistant", "content": c.content()}
            if c.rounds:
                msg["sol_tool_rounds"] = c.rounds
            calls = c.calls()
            if calls:
                msg["tool_calls"] = [{k: v for k, v in t.items() if k != "index"} for t in tool_calls_json(calls)]
            item = {"index": c.index, "message": msg, "logprobs": token_logprobs(c, c.events),
                    "finish_reason": c.finish_reason()}
            if explain:
                item["sol_explain"] = [ev.explanation.to_dict() if ev.explanation else None for ev in c.events]
            out.append(item)
        done = sum(len(c.events) for c in choices)
        return {**head, "object": "chat.completion", "choices": out,
                "usage": P.usage(len(ids), done, reqs[0].cached_tokens)}

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
                    calls = c.calls()
                    if calls:
                        yield chunk(i, {"tool_calls": tool_calls_json(calls)})
                    yield chunk(i, {}, c.finish_reason())
                    continue
                piece = c.add(ev)
                extra = {"sol_explain": ev.explanation.to_dict() if ev.explanation else None} if explain else {}
                if piece or logprobs or explain:
                    yield chunk(i, {"content": piece}, None, token_logprobs(c, [ev]), **extra)
            done_log(choices)
            if include_usage:
                u = P.usage(len(ids), sum(len(c.events) for c in choices), reqs[0].cached_tokens)
                yield json.dumps({**head, "object": "chat.completion.chunk", "choices": [], "usage": u})
            yield "[DONE]"
        finally:
            cancel_all(st, [c.req for c in choices])   # the latest request of each

    return EventSourceResponse(events(), sep="\n")
