"""Pure preference-pair builders over one prompt's scored candidates (no rows, no Beam).

The ``pairs`` stage (``synth/pairs.py``) turns a row's completions into ``Candidate`` tuples and
calls one of these; keeping them pure makes every pick checkable by hand (tests/test_pairs.py).
Methods (docs/pairs.md#pair-builders):

- ``west_of_n``: best vs worst by reward (Pace et al. 2024, docs/sources.md#west-of-n), kept
  above a per-row margin; the confidence-quantile threshold needs every row and is the
  ``pair_quantile`` global step.
- ``max_min``: RLHFlow's ``max_min`` / ``max_min_p`` (docs/sources.md#rlhflow-iterative-dpo):
  reward minus ``length_penalty x tokens``; with a length ratio the best-margin pair whose lengths
  are within the ratio is taken, not just best/worst, because iterative DPO inflates response
  length (Self-Rewarding 1,092 -> 2,552 tokens, RLHFlow 1,175 -> 2,157).
- ``rso``: statistical rejection sampling (Liu et al. 2024, docs/sources.md#rso), seeded by the
  prompt id.
- ``all_pairs``: every ordered pair of a ranking (K choose 2), for reward-model training.

Every pair then passes the same checks (``check_pair``), which name why a pair is refused:
``identical``, ``tie``, ``below_margin``, ``length_ratio``, ``near_identical``.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..filters.text import normalize_for_hash
from .rouge import rouge_l


class Candidate(NamedTuple):
    index: int  # the completion's index in the row
    text: str
    reward: float | None
    tokens: int


Pair = tuple[Candidate, Candidate]  # (chosen, rejected)


@dataclass(frozen=True)
class PairRules:
    """The checks every built pair passes. Defaults are ours unless a source is named."""

    tie_eps: float = 0.0  # |margin| <= tie_eps is a tie; RLHFlow and Self-Rewarding drop exact ties (docs/sources.md#rlhflow-iterative-dpo)
    min_margin: float = 0.0  # per-row West-of-N threshold (the paper's is a quantile: see pair_quantile)
    max_length_ratio: float | None = 1.5  # longer/shorter tokens; None = off. Ours: RLHFlow warns of length growth, gives no ratio
    near_identical: float | None = 0.9  # ROUGE-L F at or above this is a near copy; None = off. Ours
    length_penalty: float = 0.0  # RLHFlow max_min_p: reward - length_penalty * tokens (docs/sources.md#rlhflow-iterative-dpo)


def adjusted(c: Candidate, rules: PairRules) -> float:
    """The reward a builder ranks by: ``reward - length_penalty * tokens`` (max_min_p)."""
    return float(c.reward) - rules.length_penalty * c.tokens


def length_ratio(a: Candidate, b: Candidate) -> float:
    """Longer over shorter token count (an empty answer counts as one token, so it stays finite)."""
    ta, tb = max(a.tokens, 1), max(b.tokens, 1)
    return max(ta, tb) / min(ta, tb)


def check_pair(chosen: Candidate, rejected: Candidate, rules: PairRules) -> str | None:
    """Why this pair must not be used, or None. Cheap checks first; ROUGE-L last."""
    if normalize_for_hash(chosen.text) == normalize_for_hash(rejected.text):
        return "identical"
    margin = adjusted(chosen, rules) - adjusted(rejected, rules)
    if abs(margin) <= rules.tie_eps:
        return "tie"
    if margin < rules.min_margin:
        return "below_margin"
    if rules.max_length_ratio is not None and length_ratio(chosen, rejected) > rules.max_length_ratio:
        return "length_ratio"
    if rules.near_identical is not None and rouge_l(chosen.text, rejected.text) >= rules.near_identical:
        return "near_identical"
    return None


def scored(cands: Sequence[Candidate]) -> list[Candidate]:
    """Candidates with a finite reward."""
    return [c for c in cands if c.reward is not None and math.isfinite(c.reward)]


def _too_few(cands: Sequence[Candidate]) -> str | None:
    usable = scored(cands)
    if not usable:
        return "no_scores"
    return "too_few_scored" if len(usable) < 2 else None


def _ranked(cands: Sequence[Candidate], rules: PairRules) -> list[Candidate]:
    """Best first; equal rewards in index order, so every pick is deterministic."""
    return sorted(scored(cands), key=lambda c: (-adjusted(c, rules), c.index))


def _one(pair: Pair, rules: PairRules) -> tuple[list[Pair], str | None]:
    reason = check_pair(*pair, rules)
    return ([], reason) if reason else ([pair], None)


def _many(pairs: list[Pair], rules: PairRules) -> tuple[list[Pair], str | None]:
    """Keep the pairs that pass; when none does, the commonest reason (ties broken by name)."""
    kept, reasons = [], Counter()
    for pair in pairs:
        reason = check_pair(*pair, rules)
        if reason:
            reasons[reason] += 1
        else:
            kept.append(pair)
    if kept:
        return kept, None
    return [], min(reasons, key=lambda r: (-reasons[r], r)) if reasons else "no_pairs"


def west_of_n(cands: Sequence[Candidate], rules: PairRules) -> tuple[list[Pair], str | None]:
    """Best vs worst by reward (docs/sources.md#west-of-n); the length ratio only refuses, it does not re-pick."""
    if reason := _too_few(cands):
        return [], reason
    ranked = _ranked(cands, rules)
    return _one((ranked[0], ranked[-1]), rules)


def max_min(cands: Sequence[Candidate], rules: PairRules) -> tuple[list[Pair], str | None]:
    """RLHFlow max_min(_p) (docs/sources.md#rlhflow-iterative-dpo). With ``max_length_ratio`` set,
    the pair with the largest (penalized) margin among pairs within the ratio; ``length_ratio`` when
    no pair is."""
    if reason := _too_few(cands):
        return [], reason
    ranked = _ranked(cands, rules)
    if rules.max_length_ratio is None:
        return _one((ranked[0], ranked[-1]), rules)
    best: Pair | None = None
    best_margin = -math.inf
    # Ranked order and strict '>' make the first pair found at the best margin win: deterministic.
    for i, hi in enumerate(ranked):
        for lo in ranked[i + 1:]:
            if length_ratio(hi, lo) > rules.max_length_ratio:
                continue
            margin = adjusted(hi, rules) - adjusted(lo, rules)
            if margin > best_margin:
                best, best_margin = (hi, lo), margin
    if best is None:
        return [], "length_ratio"
    return _one(best, rules)


def rso_seed(prompt_id: str, seed: int = 0) -> int:
    """A per-prompt RNG seed, stable across processes (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "big")


def rso_sample(rewards: Sequence[float], k: int, beta: float, rng: random.Random) -> list[tuple[int, int]]:
    """RSO's rejection sampler (Liu et al. 2024, Algorithm 1; docs/sources.md#rso): pass over the remaining
    candidates in order, accepting each with probability exp((r - r_max) / beta), r_max the best
    remaining reward; stop at ``k`` accepted; remove the accepted and pass again. Returns
    (position, pass number) in acceptance order. beta -> 0 is top-1 first; beta -> inf is uniform."""
    if beta <= 0:
        raise ValueError("beta must be > 0")
    remaining = list(range(len(rewards)))
    accepted: list[tuple[int, int]] = []
    passes = 0
    while remaining and len(accepted) < k:
        passes += 1
        r_max = max(rewards[i] for i in remaining)
        taken = []
        for i in remaining:
            # The best candidate has probability exp(0) = 1, so every pass accepts at least one.
            if rng.random() < math.exp((rewards[i] - r_max) / beta):
                taken.append(i)
                accepted.append((i, passes))
                if len(accepted) == k:
                    break
        remaining = [i for i in remaining if i not in taken]
    return accepted


def rso(cands: Sequence[Candidate], rules: PairRules, *, k: int, beta: float, seed: int,
        pairing: str = "disjoint") -> tuple[list[Pair], str | None]:
    """Sub-sample ``k`` of N by RSO, then pair the accepted ones, each pair labelled by reward:
    ``disjoint`` takes them two at a time in acceptance order (k/2 pairs), ``all`` every pair among them."""
    if reason := _too_few(cands):
        return [], reason
    usable = sorted(scored(cands), key=lambda c: c.index)
    picks = rso_sample([adjusted(c, rules) for c in usable], k, beta, random.Random(seed))
    accepted = [usable[i] for i, _ in picks]
    if pairing == "disjoint":
        couples = [(accepted[i], accepted[i + 1]) for i in range(0, len(accepted) - 1, 2)]
    elif pairing == "all":
        couples = [(a, b) for i, a in enumerate(accepted) for b in accepted[i + 1:]]
    else:
        raise ValueError(f"unknown RSO pairing {pairing!r}; expected disjoint or all")
    labelled = [(a, b) if (adjusted(a, rules), -a.index) >= (adjusted(b, rules), -b.index) else (b, a)
                for a, b in couples]
    return _many(labelled, rules)


def all_pairs(cands: Sequence[Candidate], rules: PairRules) -> tuple[list[Pair], str | None]:
    """Every (i, j) of the ranking with i above j: K choose 2 pairs before the checks."""
    if reason := _too_few(cands):
        return [], reason
    ranked = _ranked(cands, rules)
    return _many([(hi, lo) for i, hi in enumerate(ranked) for lo in ranked[i + 1:]], rules)


def sigmoid(x: float) -> float:
    """Bradley-Terry P(chosen > rejected) from a reward margin, without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
