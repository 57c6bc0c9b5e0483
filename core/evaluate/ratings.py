"""Win rates and Elo ratings from pairwise votes.

A battle is (model a, model b, outcome) with outcome "a", "b", "tie" or "both_bad" (Store.battles()).
Win rates are counted per pair. Ratings are the Bradley-Terry model's, fitted by maximum likelihood (a tie
or "both bad" counts half a win to each side, as in LMSYS's arena) and put on the Elo scale: a 400-point
gap means 10 to 1 odds, the mean is 1000. One virtual tie between every two models keeps a model that
never won finite. The uncertainty is a bootstrap: the battles resampled with replacement, refitted, and
the 2.5th and 97.5th percentiles of each model's rating kept (a 95 % interval). With fewer than MIN_VOTES
battles no rating is given: a few votes say little.
"""
from __future__ import annotations

import math
import random

MIN_VOTES = 10
SCALE, MEAN = 400.0, 1000.0


def win_rates(battles: list[tuple[str, str, str]]) -> list[dict]:
    """Per pair of models (names sorted): {"a", "b", "n", "a_wins", "b_wins", "ties", "both_bad",
    "a_rate", "b_rate"} where a rate is wins / n."""
    pairs: dict[tuple[str, str], dict] = {}
    for a, b, outcome in battles:
        if a == b:
            continue
        if a > b:
            a, b, outcome = b, a, {"a": "b", "b": "a"}.get(outcome, outcome)
        p = pairs.setdefault((a, b), {"a": a, "b": b, "n": 0, "a_wins": 0, "b_wins": 0, "ties": 0, "both_bad": 0})
        p["n"] += 1
        p[{"a": "a_wins", "b": "b_wins", "tie": "ties", "both_bad": "both_bad"}[outcome]] += 1
    for p in pairs.values():
        p["a_rate"], p["b_rate"] = p["a_wins"] / p["n"], p["b_wins"] / p["n"]
    return [pairs[k] for k in sorted(pairs)]


def bradley_terry(battles: list[tuple[str, str, str]], models: list[str] | None = None,
                  iterations: int = 2000) -> dict[str, float]:
    """Elo-scale ratings by Hunter's MM algorithm: p_i = W_i / sum_j n_ij / (p_i + p_j)."""
    names = sorted(set(models or []) | {m for a, b, _ in battles for m in (a, b)})
    wins = {m: 0.0 for m in names}
    games: dict[tuple[str, str], float] = {}
    for i, a in enumerate(names):            # the virtual tie between every two models
        for b in names[i + 1:]:
            games[(a, b)] = 1.0
            wins[a] += 0.5
            wins[b] += 0.5
    for a, b, outcome in battles:
        if a == b:
            continue
        key = (a, b) if a < b else (b, a)
        games[key] += 1.0
        share = {"a": (1.0, 0.0), "b": (0.0, 1.0)}.get(outcome, (0.5, 0.5))
        wins[a] += share[0]
        wins[b] += share[1]
    p = {m: 1.0 for m in names}
    for _ in range(iterations):
        new = {}
        for m in names:
            denom = sum(n / (p[a] + p[b]) for (a, b), n in games.items() if m in (a, b))
            new[m] = wins[m] / denom if denom else 1.0
        mean_log = sum(math.log(v) for v in new.values()) / len(new) if new else 0.0
        new = {m: v / math.exp(mean_log) for m, v in new.items()}
        done = all(abs(new[m] - p[m]) < 1e-12 for m in names)
        p = new
        if done:
            break
    return {m: MEAN + SCALE * math.log10(v) for m, v in p.items()}


def elo(battles: list[tuple[str, str, str]], rounds: int = 200, seed: int = 0) -> list[dict] | None:
    """[{"model", "rating", "low", "high", "votes"}] best first, or None below MIN_VOTES battles."""
    battles = [b for b in battles if b[0] != b[1]]
    if len(battles) < MIN_VOTES:
        return None
    names = sorted({m for a, b, _ in battles for m in (a, b)})
    rating = bradley_terry(battles, names)
    rng = random.Random(seed)
    samples = {m: [] for m in names}
    for _ in range(rounds):
        fit = bradley_terry([rng.choice(battles) for _ in battles], names)
        for m in names:
            samples[m].append(fit[m])
    votes = {m: sum(m in (a, b) for a, b, _ in battles) for m in names}
    out = []
    for m in names:
        s = sorted(samples[m])
        out.append({"model": m, "rating": rating[m], "low": s[int(0.025 * (len(s) - 1))],
                    "high": s[math.ceil(0.975 * (len(s) - 1))], "votes": votes[m]})
    return sorted(out, key=lambda r: -r["rating"])
