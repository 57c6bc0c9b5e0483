"""What the server tells about itself: its health, the models it serves, how a model tokenizes."""
from __future__ import annotations

from fastapi import APIRouter, Request

from . import protocol as P
from .served import serve_state

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    st = serve_state(request)
    return {"status": "closing" if st.closing else "ok", "models": list(st.models),
            "active": sum(e.active for e in st.engines()), "queued": sum(e.queued for e in st.engines())}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "sol"}
                                       for s in serve_state(request).served]}


@router.get("/v1/models/{name:path}")
async def one_model(request: Request, name: str):
    if name not in serve_state(request).models:
        raise P.ApiError(404, f"model {name!r} is not served here", "model", "model_not_found", "not_found_error")
    return {"id": name, "object": "model", "created": 0, "owned_by": "sol"}


@router.post("/sol/tokenize")
async def tokenize(request: Request):
    body = await P.read_body(request)
    s = serve_state(request).pick(body)
    if not isinstance(body.get("text"), str):
        raise P.bad("text", "give the text to tokenize as a string")
    return s.tokenizer.encode(body["text"]).to_json()
