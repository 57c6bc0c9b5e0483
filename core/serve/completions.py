"""/v1/completions: text on from a prompt (a string or token ids), answered whole or streamed as
server-sent events; `echo` with `logprobs` scores the prompt's own tokens too."""
from __future__ import annotations

import asyncio
import json
import time

import torch
from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from ..generation.engine import DoneEvent
from ..model import lora
from . import protocol as P
from .generate import Choice, cancel_all, collect, engine_error, failed, relay, request_params, submit_all
from .served import Served, serve_state

router = APIRouter()


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


@torch.inference_mode()
def prompt_logprobs(s: Served, ids: list[int], top_n: int) -> dict:
    """`echo` with `logprobs`: each prompt token's log-probability given the ones before (None for the first)."""
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
    reqs = submit_all(st, s, ids, params, n, constrained, "prompt")
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
        await collect(st, request, choices)
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
        st.log({"endpoint": "/v1/completions", "status": 200, "prompt_tokens": len(ids), "completion_tokens": done,
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
            st.log({"endpoint": "/v1/completions", "status": 200, "prompt_tokens": len(ids),
                    "completion_tokens": done, "duration_s": time.perf_counter() - t0})
            if include_usage:
                yield json.dumps({**head, "choices": [], "usage": P.usage(len(ids), done)})
            yield "[DONE]"
        finally:
            cancel_all(st, reqs)

    return EventSourceResponse(events(), sep="\n")
