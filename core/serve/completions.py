"""/v1/completions: text on from prompts (a string, a list of strings, a list of token ids, or a list
of such lists: one choice per prompt and `n`, in order, batched through the engine), answered whole or
streamed as server-sent events; `echo` with `logprobs` scores the prompt's own tokens too (with
`max_tokens` 0 or 1, as lm-evaluation-harness scores log-likelihoods)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import torch
from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from ..generation.engine import DoneEvent
from ..generation.threads import settle
from ..model import lora
from . import protocol as P
from .generate import Choice, cancel_all, collect, engine_error, failed, relay, request_params, submit_all
from .served import Served, serve_state

router = APIRouter()


def _ids(s: Served, v, where: str) -> list[int] | None:
    """One prompt: a string or a list of token ids; None if it is neither."""
    if isinstance(v, str):
        ids = s.tokenizer.encode_ids(v)   # as `sol generate` encodes a prompt
    elif isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        ids = list(v)
        if any(i < 0 or i >= s.lm.config.vocab_size for i in ids):
            raise P.bad(where, f"token ids must be from 0 to {s.lm.config.vocab_size - 1}")
    else:
        return None
    if not ids:
        raise P.bad(where, "is empty; give at least one token of text")
    return ids


def completion_prompts(s: Served, prompt) -> list[list[int]]:
    """The API's four forms: a string, a list of strings, a list of token ids, a list of such lists."""
    one = _ids(s, prompt, "prompt")
    if one is not None:
        return [one]
    if isinstance(prompt, list) and prompt and len(prompt) <= MAX_PROMPTS:
        out = [_ids(s, p, f"prompt[{k}]") for k, p in enumerate(prompt)]
        if all(ids is not None for ids in out):
            return out
    raise P.bad("prompt", f"give a string, a list of token ids, or a list of up to {MAX_PROMPTS} of either")


MAX_PROMPTS = 256


@torch.inference_mode()
def prompt_logprobs(s: Served, ids: list[int], top_n: int) -> dict:
    """`echo` with `logprobs`: each prompt token's log-probability given the ones before (None for the first).
    Runs on a worker thread beside the engine's (generation/threads.py: settle)."""
    settle()
    with lora.here(s.lm.model, s.adapter):   # this thread runs the served model id's own adapter
        logits = s.lm.model(torch.tensor([ids], device=s.lm.model.device))[0]
    logp = torch.log_softmax(logits.float(), -1).cpu()
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


@router.post("/v1/completions")
async def completions(request: Request):
    st = serve_state(request)
    body = await P.read_body(request)
    s = st.pick(body)
    prompts = completion_prompts(s, body.get("prompt"))
    top_n = P.integer(body, "logprobs", None, 0, P.MAX_TOP_LOGPROBS)
    echo = P.flag(body, "echo")
    stops = P.stop_strings(body)
    # max_tokens 0: nothing generated (with echo, the prompt's own log-probabilities: scoring).
    zero = body.get("max_tokens") == 0 and body.get("max_completion_tokens") is None
    longest = max(prompts, key=len)
    params, n, explain, constrained = request_params({**body, "max_tokens": 1} if zero else body, s, longest, stops,
                                                     top_n is not None, top_n or 0, s.stop_ids, None)
    # With echo and logprobs the end-of-text token that ends an answer is reported too, as vLLM does:
    # lm-evaluation-harness drops the last token of each choice as the generated one.
    params = replace(params, emit_stop=echo and top_n is not None)
    stream = P.flag(body, "stream")
    if stream and echo:
        raise P.bad("echo", "is not supported with stream; ask without stream")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    if zero:
        for k, ids in enumerate(prompts):
            if len(ids) > s.context:
                raise P.ApiError(400, f"prompt[{k}]: its {len(ids)} tokens do not fit the context window of "
                                      f"{s.context}; shorten it", "prompt", "context_length_exceeded")
        reqs = [None] * (len(prompts) * n)
    else:
        reqs = []
        try:   # one choice per prompt and n, in order: prompt 0's n choices, then prompt 1's ...
            for ids in prompts:
                reqs += submit_all(st, s, ids, params, n, constrained, "prompt")
        except P.ApiError:
            cancel_all(st, reqs)
            raise
    choices = [Choice(i, r, stops, None) for i, r in enumerate(reqs)]
    of = [prompts[i // n] for i in range(len(choices))]   # each choice's prompt
    prompt_tokens = sum(len(ids) for ids in prompts)
    rid, created, t0 = P.new_id("cmpl"), P.now(), time.perf_counter()
    head = {"id": rid, "object": "text_completion", "created": created, "model": s.name,
            "system_fingerprint": None}

    def logprobs_of(events, offset):
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ev in events:
            text = s.token_text(ev.id)
            out["tokens"].append(text)
            out["token_logprobs"].append(ev.logprob)
            out["top_logprobs"].append({t["text"]: P._logprob(t["prob"]) for t in ev.top[:top_n]})
            out["text_offset"].append(offset)
            offset += len(ev.text)
        return out

    def cached():   # each prompt's first choice: the others were prefilled beside it
        return sum(r.cached_tokens for r in reqs[::n] if r is not None)

    def completion_tokens():
        return sum(c.done.completion_tokens + (1 if c.events and c.done.stop_reason == "eos" and params.emit_stop
                                               else 0) for c in choices if c.done is not None)

    if not stream:
        if zero:
            for c in choices:
                c.done = DoneEvent([], "", len(of[c.index]), 0, 0.0, "max_tokens")
        else:
            await collect(st, request, choices)
            failed(choices)
        echo_lp = {}
        if echo and top_n is not None:
            for k, ids in enumerate(prompts):
                echo_lp[k] = await asyncio.to_thread(prompt_logprobs, s, ids, top_n)
        out = []
        for c in choices:
            prompt_text = s.tokenizer.decode(of[c.index]) if echo else ""
            text = c.content()
            lp = None
            if top_n is not None:
                lp = logprobs_of(c.events, len(prompt_text))
                if echo:
                    lp = {k: echo_lp[c.index // n][k] + lp[k] for k in lp}
            item = {"index": c.index, "text": prompt_text + text, "logprobs": lp,
                    "finish_reason": c.finish_reason()}
            if explain:
                item["sol_explain"] = [ev.explanation.to_dict() if ev.explanation else None for ev in c.events]
            out.append(item)
        done = completion_tokens()
        st.log({"endpoint": "/v1/completions", "status": 200, "prompt_tokens": prompt_tokens,
                "completion_tokens": done, "duration_s": time.perf_counter() - t0})
        return {**head, "choices": out, "usage": P.usage(prompt_tokens, done, cached())}

    def chunk(index, text, finish=None, lp=None, **extra):
        d = {**head, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}], **extra}
        if include_usage:
            d["usage"] = None
        return json.dumps(d, ensure_ascii=False)

    async def events():
        left = 0 if zero else len(choices)
        q = relay(reqs, asyncio.get_running_loop()) if left else None
        try:
            if zero:
                for c in choices:
                    c.done = DoneEvent([], "", len(of[c.index]), 0, 0.0, "max_tokens")
                    yield chunk(c.index, "", c.finish_reason())
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
            done = completion_tokens()
            st.log({"endpoint": "/v1/completions", "status": 200, "prompt_tokens": prompt_tokens,
                    "completion_tokens": done, "duration_s": time.perf_counter() - t0})
            if include_usage:
                yield json.dumps({**head, "choices": [], "usage": P.usage(prompt_tokens, done, cached())})
            yield "[DONE]"
        finally:
            cancel_all(st, [r for r in reqs if r is not None])

    return EventSourceResponse(events(), sep="\n")
