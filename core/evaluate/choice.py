"""Multiple choice, scored as lm-evaluation-harness's `multiple_choice` tasks are by default.

Each choice's score is the log-likelihood of its continuation given the question: context = the question,
continuation = " " + the choice (the harness's default target_delimiter). As the harness's `hf` model does:
trailing spaces of the context move to the continuation; context + continuation is encoded whole and the
continuation is what follows the context's own tokens (so a token that straddles the boundary counts as
the continuation's); the tokenizer adds BOS only if it adds one by default; an empty question is scored
after the start token; a pair longer than the context window keeps its last tokens. `acc` takes the
highest log-likelihood, `acc_norm` the highest per character of the choice (the harness divides by
len(choice)); ties go to the first choice, as numpy's argmax does.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..errors import SolError
from ..introspect.score import start_token

DELIMITER = " "


def encode_pair(tok, config, context: str, continuation: str, where: str) -> tuple[list[int], list[int]]:
    if not context:
        first = start_token(tok, config)
        if first is None:
            raise SolError(f"{where}: the question is empty and this model has no start token to score after; "
                           "write a question")
        return [first], tok.encode_ids(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode_ids(context + continuation)
    ctx = tok.encode_ids(context)
    return ctx, whole[len(ctx):]


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


@torch.no_grad()
def loglikelihoods(lm, question: str, choices: list[str], where: str) -> list[float]:
    """Each choice's log-likelihood, in one forward pass over the choices side by side (padded on the
    right: a causal model's earlier positions never see the padding)."""
    model, limit = lm.model, lm.config.context
    rows, conts = [], []
    for k, choice in enumerate(choices):
        ctx, cont = encode_pair(lm.tokenizer, lm.config, question, DELIMITER + choice, where)
        if not cont:
            raise SolError(f"{where}: choice {k} encodes to no tokens; write some text in it")
        rows.append((ctx + cont)[-(limit + 1):][:-1])   # the last token is only a target
        conts.append(cont)
    width = max(map(len, rows))
    x = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.device)
    logprobs = torch.log_softmax(model(x).float(), dim=-1)
    out = []
    for k, (row, cont) in enumerate(zip(rows, conts)):
        n = len(cont)
        picked = logprobs[k, len(row) - n:len(row)].gather(-1, torch.tensor(cont, device=model.device)[:, None])
        out.append(float(picked.double().sum()))
    return out


def items(lm, records: list[dict], cancel=None) -> Iterator[dict]:
    """Per question: {"i", "loglikelihoods", "acc", "acc_norm"} (acc and acc_norm 1.0 or 0.0)."""
    for i, r in enumerate(records):
        if cancel is not None and cancel.is_set():
            return
        lls = loglikelihoods(lm, r["question"], r["choices"], r["where"])
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, r["choices"])]
        yield {"i": i, "loglikelihoods": lls, "acc": float(argmax(lls) == r["answer"]),
               "acc_norm": float(argmax(norm) == r["answer"])}


def summary(results: list[dict]) -> dict:
    n = len(results)
    return {"n": n, "accuracy": sum(r["acc"] for r in results) / n if n else None,
            "accuracy_norm": sum(r["acc_norm"] for r in results) / n if n else None}
