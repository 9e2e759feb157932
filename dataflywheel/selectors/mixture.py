"""Mixtures: a training set built from several groups (source, tag, language) to a row or token budget.

Label-based rebalancing ("rebalance by label distribution", docs/sources.md#score-then-decide):
rows are grouped by a dotted path into the row (``source``, ``meta.source``, ``lang``,
``scores.x``; a list such as ``tags`` gives its first element, ``tags.1`` another), and each group
gets a share of the budget:

- ``proportional``: p_g ∝ n_g, the group's natural size (rows or tokens, the budget's unit);
- ``weights``: p_g ∝ the given weight (groups not named get none: rejected ``excluded_group``);
- ``temperature``: p_g ∝ n_g^(1/T), the temperature sampling of multilingual training
  (Arivazhagan et al. 2019, "Massively Multilingual Neural Machine Translation in the Wild";
  XLM-R and mT5 write it q ∝ p^α, α = 1/T = 0.3); T = 1 is proportional, large T near uniform;
- ``capped``: proportional, but no group above its cap (``cap``, or per group ``caps``).

A group with fewer rows than its share is a *shortfall*: with ``redistribute`` (default) what it
cannot give goes to the groups with rows left, in proportion to their own shares (water-filling),
so the budget is met while rows last; the report shows each group's requested and realized part.
Rows are never repeated (no upsampling): a budget above the pool takes the whole pool.

``replay`` keeps a named general-data group at ``replay_share`` of the budget beside the domain
groups, to limit forgetting (docs/sources.md#data-mixture: about 5% when distributions are close,
10-20% when far, Ibrahim et al. 2024; no default share). The strategy splits the rest among the
other groups. If the replay group runs short, its shortfall goes to the domain groups; a domain
shortfall is never given to the replay group, so its share never exceeds the one asked for.

Within a group rows are taken in priority order: ``order_by`` (a score, highest first, ties by
id; rows without it last) or a seeded shuffle (sha256 of seed and row id: no global RNG, the same
on every engine, run and input order).
Token budgets: a group takes rows in order while its tokens stay within its target (it stops at
the first row that does not fit, so priority is kept; the gap is under one row). Tokens are
whitespace words x 4/3 (OpenAI's rule of thumb, 1 token ~ 3/4 of an English word) unless a
``tokenizer`` is named. Integer shares are rounded by largest remainder, ties by group name.

Needs the whole set (key None): on Beam the one group is gathered on one worker. The local engines
spill the rows to disk and plan with DuckDB instead (``mixture_spill.py``), in bounded memory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from ..filters.text import row_text
from ..registry import register
from ..stages import GlobalStep, StageConfig

TOKENS_PER_WORD = 4 / 3  # OpenAI, "What are tokens and how to count them?": 1 token ~ 0.75 words
DEFAULT_TEMPERATURE = 5.0  # Arivazhagan et al. 2019: T=5 balances high- and low-resource languages
_ROUNDING_SLACK = 1e-9  # as selectors/top.py: 0.29 * 100 must give 29


class MixtureConfig(StageConfig):
    group_by: str  # dotted path into the row: "source", "meta.source", "lang", "tags" (first tag), "tags.1"
    missing_group: str | None = None  # group for rows without the field; None: rejected "missing_group"
    strategy: Literal["proportional", "weights", "temperature", "capped"] = "proportional"
    weights: dict[str, float] | None = None  # strategy "weights": relative share per group
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0)  # strategy "temperature": p ∝ n^(1/T)
    cap: int | None = Field(None, ge=0)  # strategy "capped": most units (rows or tokens) from any one group
    caps: dict[str, int] | None = None  # strategy "capped": per-group caps, overriding cap
    budget: int | None = Field(None, ge=0)  # units (rows or tokens) in the mixture ...
    fraction: float | None = Field(None, ge=0, le=1)  # ... or this share of the input's units (exactly one)
    unit: Literal["rows", "tokens"] = "rows"
    tokenizer: str | None = None  # Hub name or local folder counting tokens; None: words x 4/3
    replay_group: str | None = None  # the general-data group kept at replay_share
    replay_share: float | None = Field(None, gt=0, lt=1)  # of the budget; Ibrahim et al. 2024: ~0.05 close, 0.1-0.2 far
    order_by: str | None = None  # score taken first within a group (highest first); None: seeded shuffle
    ascending: bool = False  # order_by lowest first (e.g. perplexity)
    seed: int = 0  # the shuffle's seed
    redistribute: bool = True  # a group's shortfall goes to groups with rows left

    @model_validator(mode="after")
    def _check(self) -> MixtureConfig:
        if (self.budget is None) == (self.fraction is None):
            raise ValueError("give exactly one of budget (units) or fraction (of the input's units)")
        if (self.weights is not None) != (self.strategy == "weights"):
            raise ValueError("weights go with strategy 'weights' (and it needs them)")
        if self.weights is not None and (any(w < 0 for w in self.weights.values()) or not any(self.weights.values())):
            raise ValueError("weights must be >= 0 with at least one > 0")
        if self.strategy == "capped" and self.cap is None and not self.caps:
            raise ValueError("strategy 'capped' needs cap or caps")
        if self.strategy != "capped" and (self.cap is not None or self.caps):
            raise ValueError("cap / caps go with strategy 'capped'")
        if (self.replay_group is None) != (self.replay_share is None):
            raise ValueError("give replay_group and replay_share together")
        if self.weights and self.replay_group in self.weights:
            raise ValueError(f"the replay group {self.replay_group!r} takes replay_share; do not weight it")
        return self


def field_path(row: dict, path: str) -> Any:
    """The value at a dotted path (list items by index); a list at the end gives its first item."""
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else None
        else:
            return None
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integers summing to ``total`` in proportion to ``weights`` (Hamilton's method; ties by name)."""
    positive = {g: w for g, w in weights.items() if w > 0}
    out = dict.fromkeys(weights, 0)
    if total <= 0 or not positive:
        return out
    scale = sum(positive.values())
    quotas = {g: total * w / scale for g, w in positive.items()}
    for g, q in quotas.items():
        out[g] = math.floor(q + _ROUNDING_SLACK)
    left = total - sum(out.values())
    for g in sorted(positive, key=lambda g: (-(quotas[g] - out[g]), g))[:max(left, 0)]:
        out[g] += 1
    return out


def allocate(budget: int, weights: dict[str, float], limits: dict[str, int], redistribute: bool = True) -> dict[str, int]:
    """Units per group: ``budget`` split by ``weights``, none above its limit.

    With ``redistribute``, a group whose share exceeds its limit gets its limit and the rest is
    split again among the groups with room (water-filling), so the total is
    min(budget, sum of limits over weighted groups); without, shares are only clipped.
    """
    if not redistribute:
        ideal = largest_remainder(budget, weights)
        return {g: min(n, limits.get(g, 0)) for g, n in ideal.items()}
    alloc = dict.fromkeys(weights, 0)
    active = {g for g, w in weights.items() if w > 0 and limits.get(g, 0) > 0}
    remaining = min(budget, sum(limits[g] for g in active))
    while active and remaining > 0:
        scale = sum(weights[g] for g in active)
        full = sorted(g for g in active if remaining * weights[g] / scale >= limits[g] - alloc[g])
        if not full:
            for g, n in largest_remainder(remaining, {g: weights[g] for g in active}).items():
                alloc[g] += n
            break
        for g in full:  # these fill up; the others share what is left, in the same proportions
            remaining -= limits[g] - alloc[g]
            alloc[g] = limits[g]
            active.discard(g)
    return alloc


@dataclass
class GroupPlan:
    rows: int = 0  # available
    tokens: int = 0  # available
    requested: int = 0  # units asked for before limits (the strategy's share of the budget)
    target: int = 0  # units after caps and redistribution
    taken_rows: int = 0
    taken_tokens: int = 0


@dataclass
class MixturePlan:
    unit: str
    budget: int
    groups: dict[str, GroupPlan] = field(default_factory=dict)
    decisions: list[str | None] = field(default_factory=list)  # per input row: None kept, else reason
    excluded: set[str] = field(default_factory=set)  # groups given no weight: rejected excluded_group

    def stats(self) -> dict[str, int]:
        """Counters for the run report (``Stage.tally``); ``describe_mixture`` renders them."""
        out = {"budget": self.budget}
        for g, p in self.groups.items():
            out.update({f"pool/{g}": p.rows, f"pool_tokens/{g}": p.tokens, f"requested/{g}": p.requested,
                        f"mix/{g}": p.taken_rows, f"mix_tokens/{g}": p.taken_tokens})
        return out


def describe_mixture(stats: dict[str, int], unit: str = "rows") -> str:
    """The requested beside the realized mixture, from ``MixturePlan.stats()`` (or the run report's counts)."""
    groups = sorted({k.split("/", 1)[1] for k in stats if k.startswith("pool/")})
    taken, pool = ("mix", "pool") if unit == "rows" else ("mix_tokens", "pool_tokens")
    requested = sum(stats.get(f"requested/{g}", 0) for g in groups)
    realized = sum(stats.get(f"{taken}/{g}", 0) for g in groups)
    lines = [f"mixture: budget {stats.get('budget', 0)} {unit}, realized {realized} (requested in {unit})",
             f"{'group':<20} {'pool rows':>10} {'pool tokens':>12} {'requested':>10} {'share':>7} "
             f"{'rows':>8} {'tokens':>10} {'share':>7}"]
    for g in groups:
        asked, got = stats.get(f"requested/{g}", 0), stats.get(f"{taken}/{g}", 0)
        lines.append(f"{g:<20} {stats.get(f'pool/{g}', 0):>10} {stats.get(f'pool_tokens/{g}', 0):>12} {asked:>10} "
                     f"{asked / max(requested, 1):>7.1%} {stats.get(f'mix/{g}', 0):>8} "
                     f"{stats.get(f'mix_tokens/{g}', 0):>10} {got / max(realized, 1):>7.1%}")
    short = [f"{g} ({stats.get(f'{pool}/{g}', 0)} < {stats.get(f'requested/{g}', 0)})" for g in groups
             if stats.get(f"{pool}/{g}", 0) < stats.get(f"requested/{g}", 0)]
    if short:
        lines.append(f"ran short, pool below request (the rest went to other groups if redistribute): {', '.join(short)}")
    return "\n".join(lines)


def _hash_rank(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


@register("mixture")
class Mixture(GlobalStep):
    """Builds the output from groups by proportional / weights / temperature / capped shares, with replay."""

    Config = MixtureConfig
    resources = ("_tokenizer",)  # None when sizes are counted in words
    whole_tally = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.last_plan: MixturePlan | None = None

    def build(self) -> None:
        self._tokenizer = _load_tokenizer(self.config.tokenizer) if self.config.tokenizer is not None else None

    def key(self, row: dict) -> None:
        return None

    def group(self, row: dict) -> str | None:
        value = field_path(row, self.config.group_by)
        return self.config.missing_group if value is None or value == "" else str(value)

    def token_counts(self, rows: list[dict]) -> list[int]:
        texts = [row_text(r) for r in rows]
        if self.config.tokenizer is None:
            return [math.ceil(len(t.split()) * TOKENS_PER_WORD) for t in texts]
        return [len(ids) for ids in self._tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def _priority(self, row: dict) -> tuple:
        rid = str(row.get("id", ""))
        if self.config.order_by is None:
            return (_hash_rank(self.config.seed, rid),)
        value = (row.get("scores") or {}).get(self.config.order_by)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return (1, 0.0, _hash_rank(self.config.seed, rid))  # unscored rows last, shuffled
        return (0, value if self.config.ascending else -value, rid)

    def _weights(self, sizes: dict[str, int]) -> dict[str, float]:
        c = self.config
        if c.strategy == "weights":
            return {g: float((c.weights or {}).get(g, 0.0)) for g in sizes}
        if c.strategy == "temperature":
            return {g: float(n) ** (1.0 / c.temperature) if n > 0 else 0.0 for g, n in sizes.items()}
        return {g: float(n) for g, n in sizes.items()}  # proportional, capped

    def targets(self, budget: int, pools: dict[str, tuple[int, int, int]]) -> MixturePlan:
        """The plan's per-group targets from each group's pool: (rows, tokens, units) available."""
        c = self.config
        plan = MixturePlan(c.unit, budget)
        extra = (set(c.weights or {}) | ({c.replay_group} if c.replay_group else set())) - set(pools)
        names = [*pools, *sorted(extra)]  # pools in order of first appearance, as the report lists them
        for g in names:
            rows, tokens, _ = pools.get(g, (0, 0, 0))
            plan.groups[g] = GroupPlan(rows=rows, tokens=tokens)
        size = {g: pools.get(g, (0, 0, 0))[2] for g in names}
        domain = sorted(g for g in names if g != c.replay_group)
        domain_budget = budget
        if c.replay_group is not None:
            replay = plan.groups[c.replay_group]
            replay.requested = math.floor(budget * c.replay_share + 0.5)  # type: ignore[operator]
            replay.target = min(replay.requested, size[c.replay_group])
            domain_budget = budget - (replay.target if c.redistribute else replay.requested)
        weights = self._weights({g: size[g] for g in domain})
        limits = {g: size[g] for g in domain}
        if c.strategy == "capped":
            limits = {g: min(n, (c.caps or {}).get(g, c.cap if c.cap is not None else n)) for g, n in limits.items()}
        requested = largest_remainder(budget - (plan.groups[c.replay_group].requested if c.replay_group else 0), weights)
        for g, n in allocate(domain_budget, weights, limits, c.redistribute).items():
            plan.groups[g].requested, plan.groups[g].target = requested[g], n
        plan.excluded = {g for g in names if c.strategy == "weights" and g != c.replay_group and weights.get(g, 0) <= 0}
        return plan

    def budget_of(self, units: int) -> int:
        c = self.config
        return c.budget if c.budget is not None else math.floor(units * c.fraction + _ROUNDING_SLACK)

    def plan(self, rows: list[dict]) -> MixturePlan:
        """Every decision for these rows, with the per-group accounting."""
        groups = [self.group(r) for r in rows]
        tokens = self.token_counts(rows)
        units = tokens if self.config.unit == "tokens" else [1] * len(rows)
        members: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            if g is not None:
                members.setdefault(g, []).append(i)
        pools = {g: (len(idx), sum(tokens[i] for i in idx), sum(units[i] for i in idx)) for g, idx in members.items()}
        plan = self.targets(self.budget_of(sum(units)), pools)
        plan.decisions = ["missing_group" if g is None else None for g in groups]
        for g, idx in members.items():
            p = plan.groups[g]
            if g in plan.excluded:
                for i in idx:
                    plan.decisions[i] = "excluded_group"
                continue
            ranked = sorted(idx, key=lambda i: self._priority(rows[i]))
            used = 0
            for i in ranked:
                if used + units[i] > p.target:
                    break  # the first row that does not fit ends the group: priority order is kept
                used += units[i]
                p.taken_rows, p.taken_tokens = p.taken_rows + 1, p.taken_tokens + tokens[i]
            for i in ranked[p.taken_rows:]:
                plan.decisions[i] = "over_budget"
        return plan

    def with_group(self, row: dict, g: str | None) -> dict:
        return row if g is None else {**row, "meta": {**(row.get("meta") or {}), "mixture_group": g}}

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        plan = self.plan(rows)
        self.last_plan = plan  # for tally() and describe() right after, on the same worker
        for row, reason in zip(rows, plan.decisions):
            yield self.with_group(row, self.group(row)), reason

    def run_bounded(self, rows: Iterable[dict], memory_mb: int) -> Iterator[tuple[dict, str | None]]:
        """``run`` with the rows on disk and the plan in DuckDB (``mixture_spill.py``)."""
        from .mixture_spill import run_spilled

        return run_spilled(self, rows, memory_mb)

    def tally(self, rows: list[dict]) -> dict[str, int]:
        plan = self.last_plan
        if plan is None or len(plan.decisions) != len(rows):
            plan = self.plan(rows)
        return plan.stats()

    def describe(self) -> str:
        """The plan before a run (the CLI prints it first; ``summarize`` gives the realized mixture after)."""
        c = self.config
        size = f"budget {c.budget}" if c.budget is not None else f"fraction {c.fraction}"
        line = f"{self.name}: groups by {c.group_by}, strategy {c.strategy}, {size} {c.unit}"
        if c.replay_group:
            line += f", replay {c.replay_group} at {c.replay_share:.0%}"
        return line

    def summarize(self, stats: dict[str, int] | None = None) -> str:
        """The requested vs realized mixture: from the run report's counts, or from the last run here."""
        if stats is None:
            stats = self.last_plan.stats() if self.last_plan is not None else {}
        return describe_mixture(stats, self.config.unit)

    def realized(self, rows: list[dict]) -> dict[str, tuple[int, int]]:
        """(rows, tokens) per group of a set of rows (e.g. the kept output)."""
        out: dict[str, tuple[int, int]] = {}
        for row, n in zip(rows, self.token_counts(rows)):
            g = self.group(row) or "(none)"
            r, t = out.get(g, (0, 0))
            out[g] = (r + 1, t + n)
        return out


def _load_tokenizer(name: str) -> Any:
    """A tokenizer only (no model), once per process; a local folder loads with the Hub offline."""
    import contextlib
    from pathlib import Path

    from ..models.cache import hub_offline, shared

    def load() -> Any:
        from transformers import AutoTokenizer

        local = Path(name).expanduser().is_dir()
        with hub_offline() if local else contextlib.nullcontext():
            return AutoTokenizer.from_pretrained(name)

    return shared(f"tokenizer:{name}", load)
