"""The HTTP side of `sol serve`: the FastAPI app that turns OpenAI requests into engine requests.

The routes live one module per endpoint family (info, embeddings, chat, completions), each an
APIRouter; this module builds the app around them: what they share (a ServeState on
`app.state.serve`), the API key, CORS, and errors in OpenAI's shape.
"""
from __future__ import annotations

import hmac

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import chat, completions, embeddings, info
from . import protocol as P
from .generate import cancel_all
from .served import Served, ServeState, serve_state


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


# ---- errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}} ----------------
def error_response(e: P.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def api_error(request, e: P.ApiError):
    serve_state(request).log({"endpoint": request.url.path, "status": e.status, "error": e.message})
    return error_response(e)


async def http_error(request, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(P.ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     None, None, kind))


async def validation_error(request, e):
    first = (e.errors() or [{}])[0]
    return error_response(P.ApiError(400, f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg')}",
                                     None, "invalid_value"))


# ---- the application ---------------------------------------------------------------------
def create_app(served: list[Served], api_key: str | None = None, cors_origins: list[str] | None = None,
               log=None, plugins=None, plugin_tools: str = "trained"):
    """`plugins`: a PluginManager whose tools the server offers to the model and runs itself when a
    request brings no tools of its own; `plugin_tools` says which (tools.py: trained, all, none)."""
    app = FastAPI(title="Sol", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.closing = False   # `sol serve` sets it on SIGINT/SIGTERM: new requests get 503
    state = app.state.serve = ServeState(app.state, served, log, plugins, plugin_tools)
    # ... and calls this then, so what is still generating ends now rather than after it finishes
    app.state.cancel_inflight = lambda: cancel_all(state, list(state.inflight))

    if api_key:
        app.add_middleware(KeyCheck, key=api_key, log=state.log)
    if cors_origins:   # added last, so outermost: refusals carry the CORS headers too
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    app.add_exception_handler(P.ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    for endpoints in (info, embeddings, chat, completions):
        app.include_router(endpoints.router)
    return app
