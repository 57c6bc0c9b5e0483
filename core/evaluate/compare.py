"""Several models answering one prompt at once, each exactly as it would alone.

Each model runs in its own thread with its own engine, so all answers stream together, and each one is the
answer `sol generate` (raw text) or `sol chat` (`chat=True`: the prompt as a user message through the
model's chat template, tools included) gives that model with the same seed and sampling: the same code
path, a generator of its own seeded by the same seed. Events come back on the caller's thread, tagged
with the model's index:

    {"type": "token", "model": i, "name", "id", "text"}
    {"type": "done", "model": i, "name", "text", "tokens", "ids", "tokens_per_s", "stop_reason",
     "conversation_id"}                                          (conversation_id: chat only, else None)
    {"type": "error", "model": i, "name", "message"}

A set `cancel` (threading.Event) stops every answer at its next token; closing the generator does too.
"""
from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import replace
from typing import Iterator

from ..chat.session import ChatSession
from ..chat.store import Store
from ..errors import SolError
from ..generation.engine import DoneEvent, Engine, GenerationParams, stop_ids_for
from ..generation.threads import settle

MAX_MODELS = 4


def lineage(lm) -> dict:
    """What a vote keeps about a model: where it is, its stage and the parent sol.json names."""
    meta = lm.meta or {}
    return {"path": str(lm.path), "format": lm.format, "stage": meta.get("stage"), "parent": meta.get("parent"),
            "base": meta.get("base")}


def load(name: str, device="cpu"):
    """A model to compare, by its name in `sol models list` or its folder; an adapter folder loads on its
    base with the adapter on (each column its own copy, so one column's adapter never shows in another)."""
    from ..formats.adapter import load_with_adapter
    from ..formats.checkpoint import load_model
    from ..formats.registry import resolve
    return load_with_adapter(name, lambda n: load_model(resolve(n), device=device))


def blind_order(n: int, rng: random.Random | None = None) -> list[int]:
    """A random order of n columns, for blind mode: column k shows model order[k]."""
    order = list(range(n))
    (rng or random.Random()).shuffle(order)
    return order


def _raw(i: int, name: str, lm, prompt: str, params: GenerationParams, cancel, put) -> None:
    """As `sol generate`: the prompt encoded as the tokenizer does by default, the model's end-of-text ids."""
    engine = Engine(lm.model, lm.tokenizer)
    session = engine.session(lm.tokenizer.encode_ids(prompt))
    p = replace(params, stop_ids=stop_ids_for(lm.tokenizer, lm.config.extra))
    for ev in engine.generate(session, p, cancel):
        if isinstance(ev, DoneEvent):
            put({"type": "done", "model": i, "name": name, "text": ev.text, "tokens": ev.completion_tokens,
                 "ids": list(ev.token_ids), "tokens_per_s": ev.tokens_per_s, "stop_reason": ev.stop_reason,
                 "conversation_id": None})
        else:
            put({"type": "token", "model": i, "name": name, "id": ev.id, "text": ev.text})


def _chat(i: int, name: str, lm, prompt: str, params: GenerationParams, cancel, put, plugins, store) -> None:
    """As `sol chat --message`: one user turn, tool rounds included; ids are the sampled tokens (a tool's
    result, forced into the sequence, is not the model's), text the final assistant message."""
    chat = ChatSession(lm, plugins, store if store is not None else Store(":memory:"))
    ids, text, reason, t0 = [], "", "eos", time.perf_counter()
    for ev in chat.send(prompt, params, cancel):
        if ev["type"] == "error":
            raise SolError(ev["message"])
        if ev["type"] == "token" and not ev.get("forced"):
            ids.append(ev["id"])
            put({"type": "token", "model": i, "name": name, "id": ev["id"], "text": ev["text"]})
        elif ev["type"] == "message" and ev["role"] == "assistant":
            text = ev["content"]
    elapsed = time.perf_counter() - t0
    if cancel is not None and cancel.is_set():
        reason = "cancelled"
    put({"type": "done", "model": i, "name": name, "text": text, "tokens": len(ids), "ids": ids,
         "tokens_per_s": len(ids) / elapsed if elapsed > 0 else 0.0, "stop_reason": reason,
         "conversation_id": chat.conversation_id})


def compare(models: list[tuple[str, object]], prompt: str, params: GenerationParams, chat: bool = False,
            plugins=None, store: Store | None = None, cancel: threading.Event | None = None) -> Iterator[dict]:
    """Stream the answers of `models` ([(name, LoadedModel)], 1 to 4) to `prompt`; see the module's text.
    `plugins` and `store` are the chat's (chat=True): its tools, and where its conversations are kept."""
    if not 1 <= len(models) <= MAX_MODELS:
        raise SolError(f"{len(models)} models: compare takes 1 to {MAX_MODELS}")
    if not isinstance(prompt, str) or not prompt:
        raise SolError("--prompt: empty; give a prompt")
    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()

    def work(i, name, lm):
        try:
            settle()   # before a neighbour's small model holds torch at one thread (generation/threads.py)
            if chat:
                _chat(i, name, lm, prompt, params, cancel, events.put, plugins, store)
            else:
                _raw(i, name, lm, prompt, params, cancel, events.put)
        except SolError as e:
            events.put({"type": "error", "model": i, "name": name, "message": str(e)})
        except Exception as e:   # a bug: still an event naming the model, never a dead thread and a hang
            first = (str(e).splitlines() or [""])[0]
            events.put({"type": "error", "model": i, "name": name,
                        "message": f"unexpected {type(e).__name__}: {first}"})
        finally:
            events.put(None)
    threads = [threading.Thread(target=work, args=(i, name, lm), daemon=True, name=f"compare-{i}")
               for i, (name, lm) in enumerate(models)]
    for t in threads:
        t.start()
    running = len(threads)
    try:
        while running:
            ev = events.get()
            if ev is None:
                running -= 1
            else:
                yield ev
    finally:
        if running:   # closed early: stop the answers still going
            cancel.set()
        for t in threads:
            t.join()
