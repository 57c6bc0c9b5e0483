"""/v1/embeddings: the mean of a model's last hidden states over each input, normalised to length 1."""
from __future__ import annotations

import asyncio
import base64
import time

import torch
from fastapi import APIRouter, Request

from ..generation.threads import settle
from ..model import lora
from . import protocol as P
from .served import Served, serve_state

router = APIRouter()


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


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    st = serve_state(request)
    body = await P.read_body(request)
    s = st.pick(body)
    inputs = embedding_inputs(s, body.get("input"))
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise P.bad("encoding_format", "use float or base64")
    for ids in inputs:
        if len(ids) > s.context:
            raise P.ApiError(400, f"input has {len(ids)} tokens, more than the model's context of {s.context}",
                             "input", "context_length_exceeded")
    t0 = time.perf_counter()
    def run():
        settle()   # a worker thread beside the engine's (generation/threads.py)
        with lora.here(s.lm.model, s.adapter):   # the served model id's own adapter, on this thread
            return embed(s.lm.model, inputs)
    vectors = await asyncio.to_thread(run)   # off the event loop: /health still answers
    data = []
    for i, v in enumerate(vectors):
        emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(ids) for ids in inputs)
    st.log({"endpoint": "/v1/embeddings", "status": 200, "prompt_tokens": n, "completion_tokens": 0,
            "duration_s": time.perf_counter() - t0})
    return {"object": "list", "data": data, "model": s.name, "usage": {"prompt_tokens": n, "total_tokens": n}}
