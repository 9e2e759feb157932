"""Stages from scored samples to training rows: ``pairs`` (preference pairs), ``best_of_n``
(rejection-sampled SFT) and ``pair_quantile`` (West-of-N's confidence threshold over all rows).

Input rows are prompt rows after ``generate`` and a scorer: ``completions`` with per-sample
``scores`` (``reward`` by default), ``tokens`` and ``rejected`` (a sample ``generate`` refused is
never a candidate), ``meta.generation`` and ``meta.scorers``. Score, then decide
(docs/concepts.md#stages-score-then-decide): the scorer half builds the output row (or records why
it cannot on ``meta.pairing``), the filter half rejects with that reason, so a refused prompt goes
to ``_rejected`` with its samples for audit.

Provenance (so every pair can be audited) on every output row's ``meta``: prompt id, method, policy model,
round, sampling, scorers, the picked indices and every candidate's reward, tokens and raw scores,
so a pair can be re-thresholded without regenerating. Methods yielding several pairs put them
under ``pairs`` (one row out per row in, as a Scorer must); ``explode_pairs`` splits them later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Literal

import numpy as np

from ..registry import register
from ..stages import Filter, GlobalStep, Scorer, StageConfig
from .generate import prompt_messages
from .pair_builders import Candidate, Pair, PairRules, all_pairs, max_min, rso, rso_seed, sigmoid, west_of_n

_DEFAULT = PairRules()


def candidates(row: dict, field: str = "reward") -> list[Candidate]:
    """The row's usable samples (not refused by ``generate``) with their ``scores[field]``."""
    out = []
    for i, c in enumerate(row.get("completions") or []):
        if c.get("rejected"):
            continue
        value = (c.get("scores") or {}).get(field)
        out.append(Candidate(int(c.get("index", i)), c.get("text") or "",
                             None if value is None else float(value), int(c.get("tokens") or 0)))
    return out


def audit(row: dict, field: str) -> list[dict]:
    """Every sample's index, reward, tokens, raw scores and refusal reason, for the output's meta."""
    return [{"index": int(c.get("index", i)), "reward": (c.get("scores") or {}).get(field),
             "tokens": c.get("tokens"), "scores": c.get("scores") or {}, "rejected": c.get("rejected")}
            for i, c in enumerate(row.get("completions") or [])]


def provenance(row: dict, method: str, round_: int | None, field: str) -> dict:
    """The meta every output row carries; the input's other meta keys (source, lineage) stay."""
    meta = row.get("meta") or {}
    gen = meta.get("generation") or {}
    rest = {k: v for k, v in meta.items() if k not in ("generation", "scorers", "pairing")}
    return {**rest, "prompt_id": str(row.get("id")), "method": method, "policy": gen.get("model"),
            "round": meta.get("round", round_), "sampling": gen.get("sampling"),
            "scorers": meta.get("scorers") or [], "reward_field": field, "candidates": audit(row, field)}


def refusal(row: dict) -> tuple[bool, str | None]:
    """Keep a built row; refuse one whose ``meta.pairing`` says why it could not be built
    (``provenance`` drops that key from built rows)."""
    pairing = (row.get("meta") or {}).get("pairing")
    return (True, None) if pairing is None else (False, pairing["reason"])


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def preference(row: dict, pair: Pair, base_meta: dict, rules: PairRules, pair_id: str) -> dict:
    """One Preference row in TRL's conversational explicit form."""
    chosen, rejected = pair
    margin = chosen.reward - rejected.reward
    scores = {"reward_chosen": chosen.reward, "reward_rejected": rejected.reward, "margin": margin,
              "confidence": sigmoid(margin), "tokens_chosen": chosen.tokens, "tokens_rejected": rejected.tokens}
    if rules.length_penalty:
        scores["margin_penalized"] = margin - rules.length_penalty * (chosen.tokens - rejected.tokens)
    return {"id": pair_id, "prompt": prompt_messages(row), "chosen": _assistant(chosen.text),
            "rejected": _assistant(rejected.text), "scores": scores,
            "meta": {**base_meta, "chosen_index": chosen.index, "rejected_index": rejected.index}}


class PairsConfig(StageConfig):
    method: Literal["west_of_n", "max_min", "rso", "all_pairs"] = "west_of_n"
    reward_field: str = "reward"  # the per-sample score pair builders rank by (scorers write it by default)
    tie_eps: float = _DEFAULT.tie_eps
    min_margin: float = _DEFAULT.min_margin
    max_length_ratio: float | None = _DEFAULT.max_length_ratio
    near_identical: float | None = _DEFAULT.near_identical
    length_penalty: float = _DEFAULT.length_penalty
    min_candidates: int = 2  # RLHFlow skips prompts with fewer than K samples (docs/sources.md#rlhflow-iterative-dpo); set K to match
    rso_k: int = 8  # RSO sub-samples 8 of its 64 candidates (docs/sources.md#rso)
    # RSO's beta (0.5, the same beta as its loss; docs/sources.md#rso); it is on the reward's scale, so retune per RM.
    rso_beta: float = 0.5
    # Two at a time in acceptance order (k/2 pairs); ours: how RSO pairs its 8 samples is not specified by the paper.
    rso_pairing: Literal["disjoint", "all"] = "disjoint"
    seed: int = 0  # RSO's RNG is seeded by (seed, prompt id): reruns and retries pick the same samples
    round: int | None = None  # used when a row has no meta.round


@register("pairs")
class Pairs(Scorer, Filter):
    """West-of-N / max-min / RSO / all-pairs preference rows from scored samples."""

    Config = PairsConfig

    @property
    def rules(self) -> PairRules:
        c = self.config
        return PairRules(tie_eps=c.tie_eps, min_margin=c.min_margin, max_length_ratio=c.max_length_ratio,
                         near_identical=c.near_identical, length_penalty=c.length_penalty)

    def build(self, row: dict) -> tuple[list[Pair], str | None]:
        c, rules = self.config, self.rules
        cands = candidates(row, c.reward_field)
        if not cands:
            return [], "no_candidates"
        if sum(x.reward is not None for x in cands) < c.min_candidates and any(x.reward is not None for x in cands):
            return [], "too_few_scored"
        if c.method == "west_of_n":
            return west_of_n(cands, rules)
        if c.method == "max_min":
            return max_min(cands, rules)
        if c.method == "all_pairs":
            return all_pairs(cands, rules)
        return rso(cands, rules, k=c.rso_k, beta=c.rso_beta, seed=rso_seed(str(row.get("id")), c.seed),
                   pairing=c.rso_pairing)

    def score(self, rows: list[dict]) -> list[dict]:
        c, rules, out = self.config, self.rules, []
        for row in rows:
            found, reason = self.build(row)
            base = provenance(row, c.method, c.round, c.reward_field)
            if reason:
                out.append({**row, "meta": {**(row.get("meta") or {}),
                                            "pairing": {"method": c.method, "reason": reason}}})
                continue
            pid = base["prompt_id"]
            if c.method in ("west_of_n", "max_min"):
                out.append(preference(row, found[0], base, rules, pid))
            else:
                pairs = [preference(row, p, base, rules, f"{pid}/{p[0].index}>{p[1].index}") for p in found]
                out.append({"id": pid, "pairs": pairs, "meta": {**base, "pairs": len(pairs)}})
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        return refusal(row)

    def tally(self, rows: list[dict]) -> dict[str, int]:
        counts: Counter = Counter()
        for row in rows:
            counts["pairs_built"] += len(row["pairs"]) if "pairs" in row else int("chosen" in row)
            counts["candidates"] += len(row.get("completions") or row.get("meta", {}).get("candidates") or [])
        return dict(counts)


def explode_pairs(row: dict) -> list[dict]:
    """A multi-pair row's preference rows (a single-pair row as itself)."""
    return list(row["pairs"]) if "pairs" in row else [row]


class BestOfNConfig(StageConfig):
    field: str = "reward"  # the score ranked on: "reward", or a verifier's field (e.g. "verifier")
    # Keep the best only at or above this; None keeps any scored best (Llama 2 keeps the top sample).
    min_score: float | None = None
    round: int | None = None  # used when a row has no meta.round


def best_candidate(row: dict, field: str) -> Candidate | None:
    """The highest-scoring usable sample (the lowest index among equals), or None when none is scored."""
    usable = [c for c in candidates(row, field) if c.reward is not None]
    return min(usable, key=lambda c: (-c.reward, c.index)) if usable else None


@register("best_of_n")
class BestOfN(Scorer, Filter):
    """Rejection sampling for SFT (Llama 2 §3.2.3): the best sample as a Conversation row."""

    Config = BestOfNConfig

    def score(self, rows: list[dict]) -> list[dict]:
        c, out = self.config, []
        for row in rows:
            best = best_candidate(row, c.field)
            reason = None
            if best is None:
                reason = "no_candidates" if not candidates(row, c.field) else "no_scores"
            elif c.min_score is not None and best.reward < c.min_score:
                reason = "below_threshold"
            if reason:
                out.append({**row, "meta": {**(row.get("meta") or {}),
                                            "pairing": {"method": "best_of_n", "reason": reason}}})
                continue
            meta = {**provenance(row, "best_of_n", c.round, c.field), "chosen_index": best.index}
            out.append({"id": str(row.get("id")), "messages": [*prompt_messages(row), *_assistant(best.text)],
                        "scores": {c.field: best.reward, "reward": best.reward, "tokens": best.tokens},
                        "meta": meta})
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        return refusal(row)


class PairQuantileConfig(StageConfig):
    field: str = "confidence"  # West-of-N filters on P(y+ > y-) = sigmoid(margin) (docs/sources.md#west-of-n)
    # Keep pairs at or above this quantile of all pairs' field. The paper's value is unverified (docs/sources.md#west-of-n): ours.
    quantile: float = 0.5


@register("pair_quantile")
class PairQuantile(GlobalStep):
    """West-of-N's confidence filter: needs every pair's score, so one group over all rows.
    Run it on single-pair rows (after ``explode_pairs`` for multi-pair methods)."""

    Config = PairQuantileConfig

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        f = self.config.field
        values = [(r.get("scores") or {}).get(f) for r in rows]
        present = [float(v) for v in values if v is not None]
        # numpy's default "linear" quantile: the same threshold whatever order rows arrive in.
        threshold = float(np.quantile(present, self.config.quantile)) if present else None
        for row, value in zip(rows, values):
            if value is None:
                yield row, "no_scores"
            elif float(value) < threshold:
                yield row, "below_quantile"
            else:
                meta = {**(row.get("meta") or {}),
                        "pair_quantile": {"field": f, "quantile": self.config.quantile, "threshold": threshold}}
                yield {**row, "meta": meta}, None
