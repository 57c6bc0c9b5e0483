"""The markup of tool calls in a model's text: Sol's `<|tool_call|>name: args<|tool_end|>` and the
`<tool_call>{json}</tool_call>` of Qwen's and Hermes' templates. Plain text work, no torch: the GUI reads
answers with it before any model is loaded."""
from __future__ import annotations

import re

SOL_CALL = re.compile(r"<\|tool_call\|>(.*?)<\|tool_end\|>", re.S)
JSON_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
END_MARKERS = {"sol": "<|tool_end|>", "json": "</tool_call>"}
OPEN_MARKERS = ("<|tool_call|>", "<tool_call>")


def without_calls(text: str, streaming: bool = False) -> str:
    """An answer as a reader sees it: its complete tool calls taken out (a chat shows each as a card) and
    an unfinished one cut off. `streaming`: the answer is still coming in, so an end that may yet become a
    call's opening ("<|tool") is held back too. The conversation keeps the markup: the model reads its own
    calls back."""
    text = JSON_CALL.sub("", SOL_CALL.sub("", text))
    cuts = [text.find(m) for m in OPEN_MARKERS if m in text]
    if cuts:
        return text[:min(cuts)]
    if streaming:
        for m in OPEN_MARKERS:
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    return text[:-k]
    return text
