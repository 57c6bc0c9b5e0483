"""`sol serve` under load, on the CPU: 1, 4 and 16 concurrent streaming clients (the `openai` client,
64 new tokens each) against the starter and a small random GPT-2 (6 layers, d_model 384, vocab 8192,
written with save_pretrained as in decode.py). Reports aggregate tokens/s, time to first token p50/p99,
and /health latency p99 (timed from another process) during the 16-client run.

The reference is a plain transformers loop on the same GPT-2 weights: `generate` for one request after
another (what a server without batching does), 64 greedy tokens each; ratios are Sol's aggregate
tokens/s over it. `transformers serve` is not used: it needs more packages and a model hub.

    python benchmarks/serve.py [--json] [--clients 1,4,16] [--only starter|gpt2_small]
    python benchmarks/serve.py --conversation [--json] [--only words|gpt2_124m] [--reps 3]

--conversation: a 10-turn chat over /v1/chat/completions (streamed, greedy, a plain HTTP client),
each turn sending every earlier turn again as clients do, against `sol serve --prefix-cache-mb 0` and,
side by side, `sol serve` with the prefix cache (the default 512 MB), for the trained words model and
decode.py's GPT-2 124M shape (random weights, a ChatML template). Each of the --reps conversations is a
new one (its own system prompt): turn 10 finds turns 1-9 in the cache and prefills its own message.
After each conversation the server with the cache is sent the same conversation again ("floor"): every
turn then finds all of its prompt but the last token cached, the most any prefix cache can save, so its
time is what a request costs whatever is cached (HTTP, the template, tokenizing, one token's step).
Reports the time to first token of every turn (median of the conversations), turn 10's ratio
with/without and the floor's, the share of the most a cache could save that this one saves
((off - on) / (off - floor)), the cached tokens usage reports (median), and whether the answers are
identical (all three). The last line with --json is
{"words": {"ttft_turn10_s": {"off", "on", "floor"}, "ratio_turn10", "ratio_floor_turn10",
           "saved_share_turn10", "cached_turn10", "cached_floor_turn10", "prompt_turn10", "identical",
           "ttft_s": {"off": [...], "on": [...], "floor": [...]}}, "gpt2_124m": {...}}

The last line with --json is
{"starter": {"1": {"tok_s", "ttft_p50_s", "ttft_p99_s"}, ..., "health_p99_ms"},
 "gpt2_small": {..., "hf_loop_tok_s", "ratio_16_vs_hf_loop"}}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

NEW_TOKENS = 64
SMALL = dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=1024)
PROMPTS = ["First Citizen:", "Before we proceed", "All: Speak, speak.", "What is 12 times 7?",
           "The quality of mercy", "Now is the winter", "To be, or not to be", "O Romeo, Romeo"]


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def start(model: str, home: Path, max_concurrent: int):
    from serve_helpers import ServerProcess
    return ServerProcess(["--model", model, "--device", "cpu", "--max-concurrent", str(max_concurrent)], home)


def run_clients(url: str, model: str, n: int) -> dict:
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    ttft, tokens = [], []
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        t0 = time.perf_counter()
        first = None
        count = 0
        stream = client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=NEW_TOKENS,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - t0
            if chunk.usage:
                count = chunk.usage.completion_tokens
        ttft.append(first if first is not None else time.perf_counter() - t0)
        tokens.append(count)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tok_s": round(sum(tokens) / wall, 1), "tokens": sum(tokens), "wall_s": round(wall, 2),
            "ttft_p50_s": round(statistics.median(ttft), 4), "ttft_p99_s": round(quantile(ttft, 0.99), 4)}


POLLER = """
import json, os, sys, time, http.client
host, port, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection(host, port)
lat = []
while not os.path.exists(flag):
    t0 = time.perf_counter()
    c.request("GET", "/health")
    c.getresponse().read()
    lat.append(time.perf_counter() - t0)
    time.sleep(0.02)
print(json.dumps(lat))
"""


def bench_model(model: str, name: str, clients: list[int], log) -> dict:
    home = Path(tempfile.mkdtemp(prefix="sol-serve-bench-"))
    srv = start(model, home, max(clients))
    out = {}
    try:
        run_clients(srv.url, name, 1)   # warm-up
        for n in clients:
            poller = None
            if n == max(clients):
                host, port = srv.url.rsplit("/", 1)[-1].split(":")
                flag = home / "stop"
                poller = subprocess.Popen([sys.executable, "-c", POLLER, host, port, str(flag)],
                                          stdout=subprocess.PIPE, text=True)
            r = run_clients(srv.url, name, n)
            if poller is not None:
                flag.write_text("")
                lat = json.loads(poller.communicate(timeout=60)[0])
                out["health_p99_ms"] = round(quantile(lat, 0.99) * 1000, 1)
                out["health_samples"] = len(lat)
            out[str(n)] = r
            log(f"{name}: {n} clients: {r}")
    finally:
        srv.stop()
    return out


# ---- --conversation: the prefix cache over a 10-turn chat ---------------------------------------
TURNS = 10
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# (system prompt of conversation k, user text of turn i, max_tokens): the words model's context is 128 tokens,
# so its turns are short. Each conversation has its own system prompt: a conversation that repeated an
# earlier one would find all of its turn in the cache, where a real next turn finds the turns before it.
CONVERSATIONS = {
    "words": (lambda k: f"Speak. ({k:02d})", lambda i: "Go on.", 4),
    # Its 300-token BPE vocabulary spends about a token a character: turn 10 is ~600 tokens of its 1024.
    "gpt2_124m": (lambda k: "You are a careful assistant. Answer briefly and plainly, in one sentence. " * 2
                  + f"({k:02d})", lambda i: f"And fact {i + 1}?", 8),
}


def conversation(url: str, model: str, system: str, user, max_tokens: int) -> tuple[list[float], list[str], list]:
    """One TURNS-turn chat, streamed: each turn's time to first token, its answer, its usage. A plain HTTP
    client on one keep-alive connection, so the times are the server's more than a client library's."""
    import http.client
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    messages = [{"role": "system", "content": system}]
    ttft, answers, usages = [], [], []
    for i in range(TURNS):
        messages.append({"role": "user", "content": user(i)})
        body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}})
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first, text, use = None, "", None
        while True:
            line = resp.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if piece:
                first = first if first is not None else time.perf_counter() - t0
                text += piece
            if chunk.get("usage"):
                use = chunk["usage"]
        resp.read()
        ttft.append(first if first is not None else time.perf_counter() - t0)
        answers.append(text)
        usages.append(use)
        messages.append({"role": "assistant", "content": text})
    conn.close()
    return ttft, answers, usages


def bench_conversation(folder: str, name: str, reps: int, log) -> dict:
    """Both servers run side by side and take turns, one conversation each, so that the machine's drift
    (other tenants of a shared host) falls on both alike; every conversation is new to both."""
    from serve_helpers import ServerProcess
    system, user, max_tokens = CONVERSATIONS[name]
    settings = (("off", "0"), ("on", "512"))
    servers = {}
    try:
        for label, mb in settings:
            home = Path(tempfile.mkdtemp(prefix="sol-serve-conv-"))
            servers[label] = ServerProcess(["--model", folder, "--device", "cpu", "--prefix-cache-mb", mb], home)
        runs = {label: [] for label, _ in settings}
        for label, srv in servers.items():   # first requests pay one-time costs
            conversation(srv.url, name, "warm up", lambda i: "hello", 2)
        runs["floor"] = []
        for k in range(reps):
            for label, srv in servers.items():
                runs[label].append(conversation(srv.url, name, system(k), user, max_tokens))
            # The same conversation again on the server with the cache: every turn finds all of its prompt
            # but the last token cached, the most a prefix cache can save. What is left is the request's
            # own cost (HTTP, the template, tokenizing, one token's step, sending it).
            runs["floor"].append(conversation(servers["on"].url, name, system(k), user, max_tokens))
    finally:
        for srv in servers.values():
            srv.stop()
    out = {"ttft_s": {}, "ttft_turn10_s": {}}
    for label in runs:
        ttft = [statistics.median(r[0][i] for r in runs[label]) for i in range(TURNS)]
        out["ttft_s"][label] = [round(t, 4) for t in ttft]
        out["ttft_turn10_s"][label] = round(ttft[-1], 4)
        log(f"{name}: prefix cache {label}: time to first token per turn {out['ttft_s'][label]}")
    last = [r[2][-1] for r in runs["on"]]
    out["prompt_turn10"] = statistics.median(u["prompt_tokens"] for u in last)
    out["cached_turn10"] = statistics.median(u["prompt_tokens_details"]["cached_tokens"] for u in last)
    out["cached_floor_turn10"] = statistics.median(r[2][-1]["prompt_tokens_details"]["cached_tokens"]
                                                   for r in runs["floor"])
    turn10 = out["ttft_turn10_s"]
    out["ratio_turn10"] = round(turn10["on"] / turn10["off"], 3)
    out["ratio_floor_turn10"] = round(turn10["floor"] / turn10["off"], 3)
    # The share of what a prefix cache could save at most that this one saves.
    out["saved_share_turn10"] = round((turn10["off"] - turn10["on"]) / (turn10["off"] - turn10["floor"]), 3)
    out["identical"] = [r[1] for r in runs["on"]] == [r[1] for r in runs["off"]] == [r[1] for r in runs["floor"]]
    log(f"{name}: turn 10 ({out['prompt_turn10']} prompt tokens, {out['cached_turn10']} cached): "
        f"{turn10['on']} s with the prefix cache, {turn10['off']} s without (ratio {out['ratio_turn10']}); "
        f"replayed, {out['cached_floor_turn10']} cached: {turn10['floor']} s (ratio {out['ratio_floor_turn10']}, "
        f"the floor: the cache saves {out['saved_share_turn10']:.0%} of what it could); "
        f"answers identical: {out['identical']}")
    return out


def main_conversation(args, log) -> dict:
    result = {}
    if args.only in (None, "words"):
        result["words"] = bench_conversation(str(ROOT / "resources" / "models" / "words"), "words", args.reps, log)
    if args.only in (None, "gpt2_124m"):
        from decode import SHAPES, write_hf_model
        folder = Path(tempfile.mkdtemp(prefix="sol-serve-gpt2-")) / "gpt2_124m"
        folder.mkdir(parents=True)
        write_hf_model(folder, SHAPES["gpt2_124m"])
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
        result["gpt2_124m"] = bench_conversation(str(folder), "gpt2_124m", args.reps, log)
    return result


def fill_vocabulary(folder: Path, size: int) -> None:
    """decode.py's tokenizer has ~300 tokens for the model's 8192: ids past it decode to nothing, and
    a stream of empty pieces would hide when the first token came. Name the rest `<tN>`."""
    from sol.core.formats.tokenizer import Tokenizer
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    tok.hf.add_tokens([f"<t{i}>" for i in range(tok.vocab_size, size)])
    tok.save(folder / "tokenizer.json")


def hf_loop(folder: Path, n: int) -> float:
    """Tokens/s of transformers' generate serving n requests one after another."""
    import torch
    from transformers import AutoModelForCausalLM

    from sol.core.formats.tokenizer import Tokenizer
    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    prompts = [torch.tensor([tok.encode_ids(PROMPTS[i % len(PROMPTS)])]) for i in range(n)]
    hf.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), max_new_tokens=4, do_sample=False,
                pad_token_id=0)
    t0 = time.perf_counter()
    total = 0
    for p in prompts:
        out = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0)
        total += out.shape[1] - p.shape[1]
    return total / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--only", choices=["starter", "gpt2_small", "words", "gpt2_124m"])
    ap.add_argument("--conversation", action="store_true", help="the 10-turn chat, prefix cache on and off")
    ap.add_argument("--reps", type=int, default=3, help="conversations per setting (--conversation)")
    args = ap.parse_args(argv)
    clients = [int(x) for x in args.clients.split(",")]

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)
    log(f"load average: {os.getloadavg()}")
    result = {}
    if args.conversation:
        result = main_conversation(args, log)
        log(f"load average: {os.getloadavg()}")
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    if args.only in (None, "starter"):
        result["starter"] = bench_model(str(ROOT / "resources" / "models" / "starter"), "starter", clients, log)
    if args.only in (None, "gpt2_small"):
        from decode import write_hf_model
        folder = Path(tempfile.mkdtemp(prefix="sol-serve-gpt2-")) / "gpt2_small"
        folder.mkdir(parents=True)
        write_hf_model(folder, SMALL)
        fill_vocabulary(folder, SMALL["vocab_size"])
        r = bench_model(str(folder), "gpt2_small", clients, log)
        r["hf_loop_tok_s"] = round(hf_loop(folder, max(clients)), 1)
        r["ratio_16_vs_hf_loop"] = round(r[str(max(clients))]["tok_s"] / r["hf_loop_tok_s"], 2)
        r["ratio_1_vs_hf_loop"] = round(r[str(min(clients))]["tok_s"] / r["hf_loop_tok_s"], 2)
        result["gpt2_small"] = r
        log(f"gpt2_small: transformers loop {r['hf_loop_tok_s']} tok/s")
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
