"""Conversations -> token ids and a target mask.

Sol's chat template (core/formats/tokenizer.py) is rendered piece by piece so we know
which tokens the assistant wrote. The model learns to predict exactly those:
the assistant's words, its tool calls, and the <|end|> that closes its turn.
Headers, the user's words and tool results are inputs only -- a tool result
is forced by the engine at inference, so the model must never learn to make
one up. Every piece is bounded by special tokens, so encoding the pieces one
by one gives the same ids as encoding the whole rendered text.
"""
from __future__ import annotations

from ..formats.tokenizer import Tokenizer

END, ASSISTANT, TOOL_RESULT, TOOL_END = "<|end|>", "<|assistant|>", "<|tool_result|>", "<|tool_end|>"


def pieces(messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """(text, is_target) pieces whose concatenation is the chat template's rendering."""
    out = []
    for i, m in enumerate(messages):
        prev = messages[i - 1]["role"] if i > 0 else ""
        nxt = messages[i + 1]["role"] if i + 1 < len(messages) else ""
        role, content = m["role"], m["content"]
        if role == "tool":
            out.append((f"{TOOL_RESULT}{content}{TOOL_END}", False))
        elif role == "assistant":
            if prev != "tool":
                out.append((ASSISTANT, False))
            out.append((content, True))
            if nxt != "tool":
                out.append((END, True))
        else:
            out.append((f"<|{role}|>{content}{END}", False))
    if add_generation_prompt and (not messages or messages[-1]["role"] != "tool"):
        out.append((ASSISTANT, False))
    return out


def encode(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    texts = [t for t, _ in pieces(messages, add_generation_prompt) if t]
    flags = [f for t, f in pieces(messages, add_generation_prompt) if t]
    ids, mask = [], []
    for piece_ids, flag in zip(tok.encode_batch_ids(texts), flags):
        ids += piece_ids
        mask += [flag] * len(piece_ids)
    return ids, _unmask_tool_results(tok, ids, mask)


def _unmask_tool_results(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[bool]:
    """A tool result written inline in an assistant string is still forced, never a target."""
    start, end = tok.token_to_id(TOOL_RESULT), tok.token_to_id(TOOL_END)
    inside = False
    for i, t in enumerate(ids):
        if t == start:
            inside = True
        if inside:
            mask[i] = False
            if t == end:
                inside = False
    return mask
