"""`sol serve`, driven by the official `openai` client against a real server process.

One server per module (the starter, and a small Sol model with an imported-style Jinja chat
template); the tests that stop a server start their own."""
from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import openai  # noqa: E402
import pytest

try:   # the openai client's own HTTP library (httpx2 in current releases, httpx before)
    import httpx2 as httpx
except ImportError:
    import httpx

from conftest import make_tiny_model  # noqa: E402
from serve_helpers import ServerProcess  # noqa: E402

KEY = "sk-sol-test"
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
CHATML = textwrap.dedent("""\
    {%- for m in messages %}
    {%- if m.role == 'assistant' %}<|im_start|>assistant
    {{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>
    {{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
    </tool_call>{% endfor %}<|im_end|>
    {% elif m.role == 'tool' %}<|im_start|>user
    <tool_response>
    {{ m.content }}
    </tool_response><|im_end|>
    {% else %}<|im_start|>{{ m.role }}
    {{ m.content }}<|im_end|>
    {% endif %}
    {%- endfor %}
    {%- if add_generation_prompt %}<|im_start|>assistant
    {% endif %}""")


def chatml_model(folder):
    d = make_tiny_model(folder, context=512)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|endoftext|>"}))
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("servehome")
    tiny = chatml_model(home / "tiny-chat")
    srv = ServerProcess(["--model", "starter", "--model", str(tiny), "--api-key", KEY,
                         "--cors-origin", "http://example.test"], home)
    srv.tiny = tiny
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, text, model="starter", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_models_are_listed_by_their_names(client):
    assert [m.id for m in client.models.list()] == ["starter", "tiny-chat"]


def test_stream_equals_non_stream_for_the_same_seed(client):
    full = ask(client, "hello! who are you?", temperature=0.9, seed=11, max_tokens=40)
    chunks = list(ask(client, "hello! who are you?", temperature=0.9, seed=11, max_tokens=40, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens > 0
    assert full.usage.prompt_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + \
        full.usage.completion_tokens


def test_seed_reproduces_and_n_gives_choices(client):
    a = ask(client, "tell me a story", temperature=1.0, seed=5, max_tokens=30)
    b = ask(client, "tell me a story", temperature=1.0, seed=5, max_tokens=30)
    assert a.choices[0].message.content == b.choices[0].message.content
    many = ask(client, "tell me a story", temperature=1.0, seed=5, max_tokens=30, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a.choices[0].message.content   # choice i uses seed + i
    assert len({c.message.content for c in many.choices}) > 1


def test_max_tokens_ends_with_length_and_stop_cuts(client):
    r = ask(client, "tell me a story", temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    # tool_choice none: the starter answers this with a calculator call, which the server would run
    # (its sol.json names the calculator); stop strings are about the text.
    full = ask(client, "tell me a story", temperature=0, max_tokens=40, tool_choice="none").choices[0].message.content
    word = full.split()[2]
    cut = ask(client, "tell me a story", temperature=0, max_tokens=40, stop=[word, "zzz"], tool_choice="none")
    assert cut.choices[0].message.content == full[:full.index(word)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       ask(client, "tell me a story", temperature=0, max_tokens=40, stop=word, stream=True,
                                   tool_choice="none"))
    assert streamed == full[:full.index(word)]   # a stop string split across tokens is never streamed


def test_logprobs_equal_sol_generate(client, server):
    prompt = "<|user|>hello<|end|><|assistant|>"
    r = client.completions.create(model="starter", prompt=prompt, max_tokens=6, temperature=0, logprobs=5)
    out = subprocess.run([sys.executable, "-m", "sol.core.cli", "generate", "--model", "starter", "--prompt", prompt,
                          "--max-tokens", "6", "--temperature", "0", "--json"], capture_output=True, text=True,
                         check=True, cwd=str(server.tiny.parent), env={**__import__("os").environ,
                                                                        "SOL_HOME": str(server.tiny.parent)})
    tokens = [json.loads(x) for x in out.stdout.splitlines() if '"token"' in x]
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(tokens) > 0
    for got, top, want in zip(lp.token_logprobs, lp.top_logprobs, tokens):
        assert got == pytest.approx(want["logprob"], abs=1e-5)
        assert list(top) == [t["text"] for t in want["top"][:5]]
        assert list(top.values()) == pytest.approx([math.log(t["prob"]) for t in want["top"][:5]], abs=1e-5)
    chat = ask(client, "hello", temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-6)   # greedy: the top one


def test_tool_call_round_trip(client):
    question = [{"role": "user", "content": "what is 12 times 7?"}]
    r = client.chat.completions.create(model="starter", messages=question, tools=[CALCULATOR], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "12*7"}
    follow = question + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "84"}]
    answer = client.chat.completions.create(model="starter", messages=follow, tools=[CALCULATOR], temperature=0)
    assert answer.choices[0].finish_reason == "stop"
    assert "84" in answer.choices[0].message.content
    # Streamed, the call comes as a tool_calls delta and no markup leaks into the content.
    chunks = list(client.chat.completions.create(model="starter", messages=question, tools=[CALCULATOR],
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert calls[0][0].function.name == "calculator"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_output_validates(client):
    import jsonschema
    number = {"type": "integer", "minimum": 0, "maximum": 100000}
    for seed in range(3):
        r = ask(client, "what is 12 times 7?", seed=seed, temperature=1.0, max_tokens=20,
                response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": number}})
        jsonschema.validate(json.loads(r.choices[0].message.content), number)
    obj = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99},
                                            "sure": {"type": "boolean"}},
           "required": ["answer", "sure"], "additionalProperties": False}
    r = ask(client, "answer in JSON", model="tiny-chat", seed=1, max_tokens=100,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": obj}})
    jsonschema.validate(json.loads(r.choices[0].message.content), obj)
    # The starter's characters include no { or ": an object is refused up front, naming the field.
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"


def test_schemas_are_strict_as_openai_and_vllm_read_them(client):
    import jsonschema
    # pydantic's schema names no additionalProperties: only the listed keys may be written, no whitespace.
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "title": "Person"}
    fmt = {"type": "json_schema", "json_schema": {"name": "Person", "schema": person}}
    for seed in range(4):
        kw = dict(model="tiny-chat", seed=seed, max_tokens=60, response_format=fmt)
        r = ask(client, "who?", **kw)
        text = r.choices[0].message.content
        got = json.loads(text)
        assert set(got) == {"name", "age"} and r.choices[0].finish_reason == "stop"
        jsonschema.validate(got, person)
        assert text == json.dumps(got, separators=(",", ":"), ensure_ascii=False)   # compact: no whitespace
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, "who?", stream=True, **kw))
        assert streamed == text
    # strict: true, as OpenAI would refuse it: a 400 naming the keyword.
    for schema, keyword in ((person, "additionalProperties"),
                            (person | {"additionalProperties": False, "required": ["name"]}, "required"),
                            (person | {"additionalProperties": False, "allOf": [{}]}, "allOf")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, "who?", model="tiny-chat", response_format={"type": "json_schema", "json_schema": {
                "name": "Person", "strict": True, "schema": schema}})
        assert e.value.body["param"] == "response_format" and f"`{keyword}`" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "who?", model="tiny-chat", tools=[{"type": "function", "function": {
            "name": "p", "strict": True, "parameters": person}}])
    assert e.value.body["param"] == "tools[0].function.parameters" and "additionalProperties" in e.value.body["message"]


def test_imported_template_renders_the_prompt(client, server):
    from sol.core.formats.tokenizer import Tokenizer
    tok = Tokenizer.from_file(server.tiny / "tokenizer.json")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=2, temperature=0)
    want = tok.encode_ids(tok.apply_chat_template(msgs), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(want) and "<|im_start|>" in tok.apply_chat_template(msgs)
    # A template that knows tool_calls gets the call structured, and the result as a tool message.
    sent = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "abc123def", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "42"}]
    r = client.chat.completions.create(model="tiny-chat", messages=sent, tools=[CALCULATOR], max_tokens=2,
                                       temperature=0)
    text = tok.apply_chat_template(msgs + [
        {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function",
                                              "function": {"name": "calculator", "arguments": {"expression": "6*7"}}}]},
        {"role": "tool", "tool_call_id": "abc123def", "name": "calculator", "content": "42"}], tools=[CALCULATOR])
    assert '{"name": "calculator", "arguments": {"expression": "6*7"}}' in text and "<tool_response>\n42" in text
    assert r.usage.prompt_tokens == len(tok.encode_ids(text, add_special_tokens=False))


def test_completions_echo_embeddings_and_tokenize(client, server):
    r = client.completions.create(model="starter", prompt="12 times 7", max_tokens=4, temperature=0, echo=True,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("12 times 7") and lp.tokens[:2] == ["1", "2"]
    assert lp.token_logprobs[0] is None and lp.text_offset[:3] == [0, 1, 2]
    assert len(lp.tokens) == len("12 times 7") + r.usage.completion_tokens
    stream = "".join(c.choices[0].text for c in client.completions.create(
        model="starter", prompt="12 times 7", max_tokens=4, temperature=0, stream=True))
    assert "12 times 7" + stream == r.choices[0].text

    e = client.embeddings.create(model="starter", input=["hello", "hello", "goodbye"])
    vecs = [d.embedding for d in e.data]
    assert len(vecs) == 3 and len(vecs[0]) == 128
    assert sum(x * x for x in vecs[0]) == pytest.approx(1.0, abs=1e-4)
    assert vecs[0] == pytest.approx(vecs[1]) and vecs[0] != pytest.approx(vecs[2])
    assert e.usage.prompt_tokens == len("hello") * 2 + len("goodbye")
    plain = httpx.post(server.url + "/v1/embeddings", json={"model": "starter", "input": "hello"},
                       headers={"Authorization": f"Bearer {KEY}"}).json()
    assert plain["data"][0]["embedding"] == pytest.approx(vecs[0], abs=1e-6)

    t = httpx.post(server.url + "/sol/tokenize", json={"model": "starter", "text": "hi you"},
                   headers={"Authorization": f"Bearer {KEY}"})
    cli = subprocess.run([sys.executable, "-m", "sol.core.cli", "tokenize", "--model", "starter", "--text", "hi you",
                          "--json"], capture_output=True, text=True, check=True)
    assert t.status_code == 200 and t.json() == json.loads(cli.stdout)


def test_completions_take_every_prompt_form_one_choice_each_in_order(client, server):
    from sol.core.formats.registry import resolve
    from sol.core.formats.tokenizer import Tokenizer
    tok = Tokenizer.from_file(resolve("starter") / "tokenizer.json")
    texts = ["12 times 7", "hello", "what is 3"]
    ids = [tok.encode_ids(t) for t in texts]
    alone = [client.completions.create(model="starter", prompt=t, max_tokens=6, temperature=0).choices[0].text
             for t in texts]
    for prompt in (texts, ids):
        r = client.completions.create(model="starter", prompt=prompt, max_tokens=6, temperature=0, n=2)
        assert [c.index for c in r.choices] == list(range(6))
        assert [c.text for c in r.choices] == [a for a in alone for _ in range(2)]   # prompt k: choices 2k, 2k+1
        assert r.usage.prompt_tokens == sum(map(len, ids))
        streamed = [""] * 6
        for chunk in client.completions.create(model="starter", prompt=prompt, max_tokens=6, temperature=0, n=2,
                                               stream=True):
            for c in chunk.choices:
                streamed[c.index] += c.text
        assert streamed == [c.text for c in r.choices]
    r = client.completions.create(model="starter", prompt=ids[0], max_tokens=6, temperature=0)
    assert r.choices[0].text == alone[0]
    # Scoring, as lm-evaluation-harness asks: echo, logprobs 1, max_tokens 1 (or 0): every prompt token's
    # log-probability, None for the first, then the generated token's, the end of text included.
    for max_tokens in (0, 1):
        r = client.completions.create(model="starter", prompt=ids, max_tokens=max_tokens, temperature=0, echo=True,
                                      logprobs=1)
        for c, p in zip(r.choices, ids):
            lp = c.logprobs
            assert len(lp.token_logprobs) == len(p) + max_tokens and lp.token_logprobs[0] is None
            assert all(x <= 0 for x in lp.token_logprobs[1:]) and lp.tokens[:len(p)] == [tok.decode([i]) for i in p]
            assert all(lp.token_logprobs[k] <= max(lp.top_logprobs[k].values()) + 1e-6 for k in range(1, len(p)))
        assert r.usage.completion_tokens == max_tokens * len(ids)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="starter", prompt=[[1, 2], "x", 5], max_tokens=1)
    assert e.value.body["param"] == "prompt"


def test_sol_explain_rides_on_every_streamed_token(client):
    chunks = list(ask(client, "hello", temperature=0.8, seed=3, max_tokens=8, stream=True,
                      extra_body={"sol_explain": True}))
    explained = [c.model_extra["sol_explain"] for c in chunks if c.model_extra.get("sol_explain")]
    assert len(explained) == 8
    for e in explained:
        assert 0 <= e["draw"] < 1 and e["ids"][e["index"]] == e["token_id"]
        assert e["cumulative"][e["index"]] >= e["draw"] * (1 - 1e-6) and e["params"]["temperature"] == 0.8


def raw(server, path, body=None, key=KEY, method="POST", **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers=headers,
                         content=body if isinstance(body, (str, bytes)) else json.dumps(body), timeout=30, **kw)


def test_errors_have_their_status_and_shape(server):
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        (raw(server, "/v1/chat/completions", {"model": "starter", "messages": msg}, key=None), 401, None),
        (raw(server, "/v1/chat/completions", {"model": "starter", "messages": msg}, key="wrong"), 401, None),
        (raw(server, "/v1/chat/completions", {"model": "nope", "messages": msg}), 404, "model"),
        (raw(server, "/v1/chat/completions", "{not json"), 400, None),
        (raw(server, "/v1/chat/completions", {"model": "starter", "messages": msg, "temperature": "hot"}), 400,
         "temperature"),
        (raw(server, "/v1/chat/completions", {"model": "starter", "messages": msg, "presence_penalty": 0.5}), 400,
         "presence_penalty"),
        (raw(server, "/v1/chat/completions", {"model": "starter", "messages": msg, "top_logprobs": 25,
                                              "logprobs": True}), 400, "top_logprobs"),
        (raw(server, "/v1/chat/completions", {"model": "starter", "messages": "hi"}), 400, "messages"),
        (raw(server, "/v1/completions", {"model": "starter", "prompt": "hi", "max_tokens": 500}), 400, "prompt"),
    ]
    for r, status, param in cases:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if param:
            assert err["param"] == param, err
    context = cases[-1][0].json()["error"]["message"]
    assert "500" in context and "128" in context   # the numbers: max_tokens and the context
    ok = raw(server, "/health", key=None, method="GET").json()
    assert ok["status"] == "ok" and ok["models"] == ["starter", "tiny-chat"] and ok["active"] >= 0
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.headers.get("access-control-allow-origin") == "http://example.test"
    assert any(e["status"] == 401 for e in server.log())   # the request log has the refusals too


HEALTH_POLLER = """
import json, sys, time, http.client
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection(host, port)
lat = []
while not __import__("os").path.exists(path):
    t0 = time.perf_counter()
    c.request("GET", "/health")
    assert c.getresponse().read()
    lat.append(time.perf_counter() - t0)
    time.sleep(0.02)
print(json.dumps(lat))
"""


def test_sixteen_concurrent_streams_each_equal_their_solo_result(client, server, tmp_path):
    prompts = [f"what is {a} times {b}?" for a, b in zip(range(2, 18), range(3, 19))]
    solo = [ask(client, p, temperature=0, max_tokens=48).choices[0].message.content for p in prompts]
    got: dict[int, str] = {}

    def stream(i):
        parts = ask(client, prompts[i], temperature=0, max_tokens=48, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in parts)

    # /health is timed from another process, so this one's 16 client threads don't slow the clock.
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    flag = tmp_path / "stop"
    poller = subprocess.Popen([sys.executable, "-c", HEALTH_POLLER, host, port, str(flag)], stdout=subprocess.PIPE,
                              text=True)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    flag.write_text("")
    lat = sorted(json.loads(poller.communicate(timeout=30)[0]))
    assert [got.get(i) for i in range(16)] == solo
    # The event loop is never held by generation: a blocked loop shows as whole seconds on every poll. With ~25
    # polls p99 is the slowest one, which a busy host (the rest of the suite beside it) can push past 0.1 s by
    # itself, so the bound is on the 90th percentile, and the slowest must stay well under a second.
    p90 = lat[min(len(lat) - 1, int(0.9 * len(lat)))]
    assert len(lat) > 5 and p90 < 0.1 and lat[-1] < 1.0, (p90, lat[-1], len(lat), lat[len(lat) // 2])


def test_sigterm_during_a_stream_exits_0_within_5_s(tmp_path):
    big = make_tiny_model(tmp_path / "big", d_model=256, n_layer=6, n_head=4, context=2048)
    srv = ServerProcess(["--model", str(big)], tmp_path)
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
    got = []
    # Seeded (seed 1: 93 tokens before any special id). Unseeded, a stop token among the first few (about
    # 3 % of this random model's probability a token) now and then ended the stream before the signal.
    stream = c.completions.create(model="big", prompt="Speak", max_tokens=2000, temperature=1.0, stream=True,
                                  seed=1)

    def read():
        try:
            for chunk in stream:
                got.append(chunk.choices[0].text)
        except Exception:
            pass
    t = threading.Thread(target=read)
    t.start()
    deadline = time.time() + 30
    while len(got) < 5 and time.time() < deadline:
        time.sleep(0.01)
    assert len(got) >= 5
    rc, took = srv.stop()
    t.join(10)
    assert rc == 0 and took < 5.0, (rc, took, srv.proc.stderr.read())
    assert len(got) < 2000


def test_key_from_the_environment_and_a_warning_off_loopback(tmp_path):
    srv = ServerProcess(["--model", "starter", "--host", "0.0.0.0"], tmp_path, env={"SOL_API_KEY": "from-env"})
    port = srv.url.rsplit(":", 1)[1]
    assert srv.url == f"http://0.0.0.0:{port}"
    body = {"model": "starter", "prompt": "hi", "max_tokens": 1}
    assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body).status_code == 401
    ok = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body,
                    headers={"Authorization": "Bearer from-env"})
    assert ok.status_code == 200
    rc, _ = srv.stop()
    assert rc == 0 and "warning" not in srv.proc.stderr.read()   # a key is set: no warning
    bare = ServerProcess(["--model", "starter", "--host", "0.0.0.0"], tmp_path)
    rc, _ = bare.stop(signal.SIGINT)
    err = bare.proc.stderr.read()
    assert rc == 0 and "warning: --host 0.0.0.0" in err
    assert "starter: batched engine: 8 concurrent sequences of up to 128 tokens; KV cache up to 4.0 MB" in err


def test_plugin_tools_run_on_the_server(tmp_path):
    srv = ServerProcess(["--model", "starter", "--plugin-tools"], tmp_path)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = ask(c, "what is 12 times 7?", temperature=0)
        msg = r.choices[0].message
        assert msg.model_extra["sol_tool_rounds"] == [{"name": "calculator", "arguments": {"expression": "12*7"},
                                                        "result": "84"}]
        assert "84" in msg.content and "<|" not in msg.content and r.choices[0].finish_reason == "stop"
        chunks = list(ask(c, "what is 12 times 7?", temperature=0, stream=True))
        assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == msg.content
        assert [x.model_extra.get("sol_tool_round") for x in chunks if x.model_extra.get("sol_tool_round")] == \
            msg.model_extra["sol_tool_rounds"]
        # A request that brings its own tools gets the call back, as without --plugin-tools.
        own = c.chat.completions.create(model="starter", messages=[{"role": "user", "content": "what is 12 times 7?"}],
                                        tools=[CALCULATOR], temperature=0)
        assert own.choices[0].finish_reason == "tool_calls"
    finally:
        srv.stop()


def test_the_readme_example_answers_84_and_without_plugin_tools_returns_the_call(tmp_path):
    """README: `sol serve --model starter`, then its curl request. The starter's sol.json names the
    calculator, so by default the server runs it; with --no-plugin-tools the call comes back."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = json.loads(re.search(r"curl http://127.0.0.1:8000/v1/chat/completions .*?-d '(.*?)'", readme, re.S).group(1))
    assert body["messages"][0]["content"] == "what is 12 times 7?" and "client.chat.completions.create" in readme
    srv = ServerProcess(["--model", "starter"], tmp_path)
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
        msg = r["choices"][0]["message"]
        assert "84" in msg["content"] and "<|" not in msg["content"] and r["choices"][0]["finish_reason"] == "stop"
        # Server-side tool rounds run per choice, for any n; streamed, each choice says the same.
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        kw = dict(model="starter", messages=body["messages"], n=3, seed=5, temperature=0.7)
        whole = c.chat.completions.create(**kw)
        streamed = {}
        for chunk in c.chat.completions.create(**kw, stream=True):
            for ch in chunk.choices:
                streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
        for ch in whole.choices:
            assert ch.message.model_extra["sol_tool_rounds"][0]["name"] == "calculator"
            assert "<|" not in ch.message.content and streamed[ch.index] == ch.message.content
        # A client's stop string inside the call cuts it: the server runs no half call.
        cut = c.chat.completions.create(model="starter", messages=body["messages"], temperature=0, stop=["*"])
        assert cut.choices[0].finish_reason == "stop" and "sol_tool_rounds" not in cut.choices[0].message.model_extra
        assert cut.choices[0].message.content == "calculator: 12" and not cut.choices[0].message.tool_calls
    finally:
        srv.stop()
    srv = ServerProcess(["--model", "starter", "--no-plugin-tools"], tmp_path)
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert choice["message"]["tool_calls"][0]["function"] == {"name": "calculator",
                                                                  "arguments": '{"expression": "12*7"}'}
    finally:
        srv.stop()


def test_a_conversation_reuses_its_earlier_turns_from_the_prefix_cache(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 3 plus 4?"}]
    first = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=8, temperature=0)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "and 5 plus 6?"}]
    second = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens   # the first turn and some of its answer
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1   # all but one


WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}


def test_tool_choice_required_and_named_force_a_valid_call(client):
    import jsonschema
    msgs = [{"role": "user", "content": "hello there"}]
    # The tiny model (random weights) never writes a call on its own ...
    for seed in range(3):
        r = client.chat.completions.create(model="tiny-chat", messages=msgs, tools=[CALCULATOR, WEATHER], seed=seed,
                                           max_tokens=60)
        assert r.choices[0].finish_reason != "tool_calls" and not r.choices[0].message.tool_calls
    # ... named, it writes one to that tool, with arguments its schema validates; streamed the same.
    named = {"type": "function", "function": {"name": "weather"}}
    for seed in range(3):
        kw = dict(model="tiny-chat", messages=msgs, tools=[CALCULATOR, WEATHER], tool_choice=named, seed=seed,
                  max_tokens=80, parallel_tool_calls=False)
        r = client.chat.completions.create(**kw)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"] |
                            {"additionalProperties": False})
        chunks = list(client.chat.completions.create(**kw, stream=True))
        [streamed] = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
        assert streamed[0].function.arguments == call.function.arguments and chunks[-1].choices[0].finish_reason == \
            "tool_calls" and "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    # "required": a call to one of the tools; the starter's calls are Sol's markup, a lone string bare.
    r = client.chat.completions.create(model="tiny-chat", messages=msgs, tools=[CALCULATOR, WEATHER],
                                       tool_choice="required", seed=0, max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls"
    for call in r.choices[0].message.tool_calls:
        tool = {"calculator": CALCULATOR, "weather": WEATHER}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    r = ask(client, "hello!", tools=[WEATHER | {"function": WEATHER["function"] | {"parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}],
        tool_choice={"type": "function", "function": {"name": "weather"}}, temperature=0, max_tokens=40,
        parallel_tool_calls=False)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "weather" and 1 <= len(json.loads(call.function.arguments)["city"]) <= 12
    for bad in ("required", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, "hi", model="tiny-chat", tool_choice=bad,
                **({"tools": [CALCULATOR]} if bad != "required" else {}))
        assert e.value.body["param"] == "tool_choice"
