"""The OpenAI API's request fields and response shapes, read and written by plain functions.

Every bad field becomes an ApiError that names it; the app turns that into
{"error": {"message", "type", "param", "code"}} with its HTTP status."""
from __future__ import annotations

import json
import math
import random
import time

from ..generation.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, "invalid_value")


async def read_body(request) -> dict:
    """The request's body, which must be one JSON object."""
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(body: dict, key: str, default, lo: float, hi: float):
    v = body.get(key)
    if v is None:
        return default
    if not _is_number(v) or not lo <= v <= hi:
        raise bad(key, f"{v!r} is not a number from {lo:g} to {hi:g}")
    return float(v)


def integer(body: dict, key: str, default, lo: int, hi: int | None = None):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise bad(key, f"{v!r} is not a whole number from {lo}" + (f" to {hi}" if hi is not None else " up"))
    return v


def flag(body: dict, key: str, default=False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(key, f"{v!r} is not true or false")
    return v


def stop_strings(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > 16:
        raise bad("stop", "give a non-empty string or a list of up to 16 of them")
    return tuple(v)


def sampling(body: dict, defaults: dict | None = None) -> SamplingParams:
    """The request's sampling fields; a field it leaves out takes the model's own default (its
    generation_config.json, as `sol chat` and transformers do), else OpenAI's."""
    d = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, **(defaults or {})}
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"{key}: not supported by Sol's sampler; send it as 0 or leave it out "
                                "(Sol has `repetition_penalty`, as Hugging Face's, e.g. 1.1)", key, "unsupported_parameter")
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias: not supported; leave it out", "logit_bias", "unsupported_parameter")
    return SamplingParams(temperature=number(body, "temperature", d["temperature"], 0.0, 2.0),
                          top_k=integer(body, "top_k", d["top_k"], 0),
                          top_p=number(body, "top_p", d["top_p"], 1e-9, 1.0),
                          min_p=number(body, "min_p", d["min_p"], 0.0, 0.999),
                          repetition_penalty=number(body, "repetition_penalty", d["repetition_penalty"], 1e-3, 100.0),
                          seed=integer(body, "seed", None, -2**63, 2**63 - 1))


def max_tokens(body: dict, room: int) -> int:
    """max_tokens or max_completion_tokens; without either, what is left of the context."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return integer(body, key, max(1, room), 1)


# Ids only tell responses apart, so a seeded generator makes them, not uuid4: its os.urandom releases the
# GIL, and getting it back from the engine's thread cost up to 0.1 ms of a request's time to first token.
_IDS = random.Random()


def new_id(prefix: str, digits: int = 24) -> str:
    """`prefix-` and `digits` hex digits (no prefix: the digits alone)."""
    hexa = f"{_IDS.getrandbits(4 * digits):0{digits}x}"
    return f"{prefix}-{hexa}" if prefix else hexa


def now() -> int:
    return int(time.time())


FINISH = {"eos": "stop", "stop_string": "stop", "cancelled": "stop", "max_tokens": "length", "context": "length"}


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """`cached`: prompt tokens whose keys and values came from the prefix cache, not a prefill."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _logprob(p: float) -> float:
    return math.log(p) if p > 0 else -9999.0


def chat_logprob(ev, top_n: int, text: str) -> dict:
    """One token of `choices[].logprobs.content`; `text` is the token's own text."""
    return {"token": text, "logprob": ev.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": t["text"], "logprob": _logprob(t["prob"]), "bytes": list(t["text"].encode())}
                             for t in ev.top[:top_n]]}
