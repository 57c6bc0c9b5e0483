"""`sol serve`'s app in this process over a deliberately slow model, to watch the engine:
a client that disconnects cancels within a step, and a full queue answers 503 with Retry-After."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

try:
    import httpx2 as httpx
except ImportError:
    import httpx

from conftest import make_tiny_model  # noqa: E402
from serve_helpers import app_server

STEP = 0.05   # seconds each model call takes here


@pytest.fixture
def slow_server(tmp_path):
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.batch import BatchEngine
    from sol.core.serve.app import create_app
    from sol.core.serve.served import Served
    lm = load_model(make_tiny_model(tmp_path / "slow", context=512))
    calls = []
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=1, max_queue=1)
    step = engine.step_fn

    def slow(*args):   # every decode step takes STEP seconds, so "within one step" can be timed
        time.sleep(STEP)
        calls.append(time.perf_counter())
        return step(*args)
    engine.step_fn = slow
    engine.start()
    with app_server(create_app([Served("slow", lm, engine)]), engine) as url:
        yield url, engine, calls


def wait_for(cond, timeout=10.0):
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < timeout
        time.sleep(0.005)
    return time.perf_counter() - t0


def test_a_client_that_disconnects_cancels_within_one_step(slow_server):
    url, engine, calls = slow_server
    # A fixed draw that goes on past the tokens read here: a random one may sample end-of-text within them and
    # leave the engine idle before the check (it failed so once).
    body = {"model": "slow", "prompt": "Speak", "max_tokens": 400, "stream": True, "seed": 1}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got == 3:
                    break
            assert engine.active == 1
            n = len(calls)
        took = wait_for(lambda: engine.active == 0)
    print(f"stream disconnect: {len(calls) - n} steps after, active 0 in {took * 1000:.0f} ms")
    assert len(calls) - n <= 2 and took < 3 * STEP, (len(calls) - n, took)

    # Without streaming too: the server notices the closed connection and cancels.
    payload = json.dumps({**body, "stream": False}).encode()
    host, port = url.rsplit(":", 1)
    sock = socket.create_connection(("127.0.0.1", int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    wait_for(lambda: engine.active == 1)
    sock.close()
    n = len(calls)
    took = wait_for(lambda: engine.active == 0)
    assert took < 0.1 + 3 * STEP and len(calls) - n <= 4


def test_a_full_queue_answers_503_with_retry_after(slow_server):
    url, engine, calls = slow_server
    # A fixed draw: with a random one, an answer that samples end-of-text within its first tokens frees the
    # engine before the third request arrives, and that one is rightly admitted (it failed so once).
    body = {"model": "slow", "prompt": "Speak", "max_tokens": 60, "stream": True, "seed": 1}
    results = []

    def stream():
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            results.append(len(lines) if lines[-1] == "data: [DONE]" else 0)
    first = threading.Thread(target=stream)
    first.start()
    wait_for(lambda: engine.active == 1)
    second = threading.Thread(target=stream)
    second.start()
    wait_for(lambda: engine.queued == 1)
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    health = httpx.get(url + "/health").json()
    assert (health["active"], health["queued"]) == (1, 1)
    first.join(30)
    second.join(30)
    assert len(results) == 2 and all(n >= 2 for n in results)   # the refusal touched neither of the others
    assert results[0] == results[1] >= 20   # one seed, one answer; long enough to hold the engine a second
    assert json.loads(json.dumps(health))["models"] == ["slow"]
