"""Sampling for training: samples for the event stream, and RL rollouts with the tool loop.

RL samples k answers to the same prompt. They run as one batch through the
KV cache, in lock-step: at every position each sequence either takes the
token it sampled or, right after it closed a tool call, the next token of the
tool's result, which the engine forces exactly as the chat loop does at
inference. Forced tokens are marked, so the RL loss never trains on them.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..formats.tokenizer import Tokenizer
from ..generation.threads import one_thread
from ..model.transformer import Transformer

CALL, RESULT, TOOL_END, END = "<|tool_call|>", "<|tool_result|>", "<|tool_end|>", "<|end|>"
MAX_TOOL_CALLS = 3


def run_tool(text: str) -> str:
    """`calculator: 12*7` -> "84". A failing tool answers with its error, as in the chat."""
    name, _, arg = text.partition(":")
    name, arg = name.strip(), arg.strip()
    if name != "calculator":
        return f"error: unknown tool {name!r}"
    import warnings

    from ..data.synthetic import calculate
    try:
        with warnings.catch_warnings():   # ast.parse warns about text like "12*7x"; the error says enough
            warnings.simplefilter("ignore")
            return calculate(arg)
    except Exception as e:  # the calculator refuses anything that is not arithmetic
        return f"error: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}"


@contextmanager
def single_thread(device):
    """Decoding runs many tiny matrix products; on a CPU one thread beats two (no barrier between them),
    by far on a busy machine."""
    if getattr(device, "type", "cpu") != "cpu":
        yield
        return
    with one_thread():
        yield


@dataclass
class Rollout:
    prompt: list[int]
    ids: list[int] = field(default_factory=list)       # what followed the prompt (sampled and forced)
    forced: list[bool] = field(default_factory=list)
    finished: bool = False                              # ended with an end-of-turn token
    tool_calls: int = 0


def _open_call(ids: list[int], call: int | None, tend: int | None) -> int | None:
    """Where the text of a tool call still open at the end of `ids` starts, if one is."""
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] == tend:
            return None
        if ids[j] == call:
            return j + 1
    return None


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    logits = logits.float().cpu()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def rollout(model: Transformer, tok: Tokenizer, prompts: list[list[int]], max_new: int, temperature: float,
            gen: torch.Generator, stop_ids: tuple[int, ...], tools: bool = True) -> list[Rollout]:
    """Continue every prompt (all the same length) in one batch, running tool calls as they close."""
    with torch.no_grad(), single_thread(model.device):
        return _rollout(model, tok, prompts, max_new, temperature, gen, stop_ids, tools)


def _rollout(model, tok, prompts, max_new, temperature, gen, stop_ids, tools):
    assert len({len(p) for p in prompts}) == 1, "rollout() batches prompts of one length"
    n, plen = len(prompts), len(prompts[0])
    limit = min(plen + max_new, model.cfg.context)
    if plen >= limit:
        return [Rollout(list(p)) for p in prompts]
    call, tend, res = tok.token_to_id(CALL), tok.token_to_id(TOOL_END), tok.token_to_id(RESULT)
    pad = stop_ids[0] if stop_ids else 0
    cache = model.new_cache(n, limit)
    logits = model(torch.tensor(prompts, device=model.device), cache=cache, last_only=True)[:, -1]
    outs = [Rollout(list(p)) for p in prompts]
    pending = [deque() for _ in range(n)]
    call_start = [_open_call(p, call, tend) for p in prompts]   # a prompt may end inside a call
    while True:
        sampled = _sample(logits, temperature, gen).tolist()
        nxt = []
        for i, r in enumerate(outs):
            if r.finished:
                nxt.append(pad)
                continue
            forced = bool(pending[i])
            t = pending[i].popleft() if forced else sampled[i]
            r.ids.append(t)
            r.forced.append(forced)
            nxt.append(t)
            if forced:
                continue
            if t in stop_ids:
                r.finished = True
            elif tools and t == call:
                call_start[i] = plen + len(r.ids)
            elif tools and t == tend and call_start[i] is not None and r.tool_calls < MAX_TOOL_CALLS:
                r.tool_calls += 1
                result = run_tool(tok.decode((r.prompt + r.ids)[call_start[i]:-1]))
                call_start[i] = None
                pending[i].extend([res] + tok.encode_ids(result, add_special_tokens=False) + [tend])
        if all(r.finished for r in outs):
            break
        if cache.pos + 1 >= limit:   # the sequences fill the window: no room for another token
            break
        logits = model(torch.tensor(nxt, device=model.device)[:, None], cache=cache, last_only=True)[:, -1]
    return outs


def complete(model: Transformer, prompt: list[int], max_new: int, temperature: float = 0.8, seed: int = 0,
             stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Plain sampling of one continuation (the samples shown every N steps)."""
    with torch.no_grad(), single_thread(model.device):
        return _complete(model, prompt, max_new, temperature, seed, stop_ids)


def _complete(model, prompt, max_new, temperature, seed, stop_ids):
    gen = torch.Generator().manual_seed(seed)
    prompt = prompt[-(model.cfg.context - 1):]
    limit = min(len(prompt) + max_new, model.cfg.context)
    cache = model.new_cache(1, limit)
    logits = model(torch.tensor([prompt], device=model.device), cache=cache, last_only=True)[:, -1]
    ids = []
    while len(prompt) + len(ids) < limit:
        t = int(_sample(logits, temperature, gen)[0])
        if t in stop_ids:
            break
        ids.append(t)
        if len(prompt) + len(ids) >= limit:
            break
        logits = model(torch.tensor([[t]], device=model.device), cache=cache, last_only=True)[:, -1]
    return ids
