"""Choosing the next token, and explaining the choice.

The book (§2.8, Box 3, Figs. 55-57) picks a token the way a person can check
by hand: sort the probabilities, add them up one by one, draw a random
number between 0 and 1, and take the first token whose running sum passes
the draw. We sample exactly that way, so the explanation we return *is* the
computation, not a story told after it.

Order of operations (as Hugging Face's generate): repetition penalty,
temperature, then top-k, top-p and min-p filters, then renormalise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels import pick

SHOWN = 20  # candidates listed in an explanation (more if the draw lands further down)
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 means greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1: off
    min_p: float = 0.0            # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        import math

        from ..errors import SolError
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            # NaN fails every comparison; 1e-45 divides the logits into infinities: both drew nothing
            raise SolError(f"--temperature {self.temperature}: must be 0 (greedy) or from {MIN_TEMPERATURE} "
                           f"to {MAX_TEMPERATURE}")
        if self.top_k < 0:
            raise SolError(f"--top-k {self.top_k}: must be 0 (off) or more")
        if not 0 < self.top_p <= 1:
            raise SolError(f"--top-p {self.top_p}: must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise SolError(f"--min-p {self.min_p}: must be in [0, 1)")
        if not (0 < self.repetition_penalty <= 100 and math.isfinite(self.repetition_penalty)):
            raise SolError(f"--repetition-penalty {self.repetition_penalty}: must be more than 0 and at most "
                           "100 (1 is off)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SolError(f"--seed {self.seed}: must be from 0 to 2**63-1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Explanation:
    """How one token was chosen. probs + rest == 1 (the candidates not listed carry `rest`)."""
    ids: list[int]            # candidates, most probable first, after filters
    probs: list[float]        # their probabilities after temperature and filters
    cumulative: list[float]   # running sum of probs
    draw: float | None        # the uniform random number in [0, 1); None when greedy
    index: int                # position of the chosen token in `ids`
    token_id: int
    rest: float = 0.0         # probability of candidates past the listed ones
    candidates: int = 0       # how many tokens survived the filters
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ids": self.ids, "probs": self.probs, "cumulative": self.cumulative, "draw": self.draw,
                "index": self.index, "token_id": self.token_id, "rest": self.rest,
                "candidates": self.candidates, "params": self.params}


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's penalty: make tokens already seen less likely (divide positive logits, multiply negative ones)."""
    if penalty == 1.0 or history is None or history.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits.gather(0, history)
    logits.scatter_(0, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, renormalised (1-D, float32)."""
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_k and p.top_k < probs.numel():
        kth = probs.topk(p.top_k).values[-1]
        keep &= probs >= kth
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p       # mass of strictly better tokens
        drop_sorted = before >= p.top_p              # already covered: drop (the first is always kept)
        keep &= ~drop_sorted.scatter(0, order, drop_sorted)
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
    probs = probs * keep
    return probs / probs.sum()


def choose(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
           history: torch.Tensor | None = None, explain: bool = True) -> tuple[int, Explanation | None]:
    """Pick the next token from 1-D logits. Returns (token id, explanation)."""
    logits = apply_repetition_penalty(logits.float(), history, p.repetition_penalty)
    params = {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
              "repetition_penalty": p.repetition_penalty}
    if p.greedy:
        token = pick.argmax(logits)
        if not explain:
            return token, None
        # Greedy is "temperature → 0": all probability on the best token.
        return token, Explanation([token], [1.0], [1.0], None, 0, token, 0.0, 1, params)
    probs = filtered_probs(logits, p)
    sorted_p, order = probs.sort(descending=True)
    n = int((sorted_p > 0).sum())
    sorted_p, order = sorted_p[:n], order[:n]
    cum = sorted_p.cumsum(0)
    draw = float(torch.rand((), generator=generator))
    # First running sum that passes the draw; guard against float round-off at the end.
    index = min(int(torch.searchsorted(cum, torch.tensor(draw * float(cum[-1])), right=True)), n - 1)
    token = int(order[index])
    if not explain:
        return token, None
    shown = max(SHOWN, index + 1)
    probs_list = sorted_p[:shown].tolist()
    return token, Explanation(order[:shown].tolist(), probs_list, cum[:shown].tolist(), draw, index, token,
                              float(sorted_p[shown:].sum()), n, params)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
