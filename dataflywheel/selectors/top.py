"""Top-k selection by any stored score: the last step of IFD selection (Cherry_LLM's, docs/sources.md#ifd:
sort, keep the top k%), and as generic for reward, ``deita_score`` or tag count.

``select_top`` keeps the ``budget`` rows, or the ``fraction`` of the rows it is given, with the
highest ``scores.<field>`` (lowest with ``ascending``). The count is of the actual input:
Superfiltering's ``select_data.py`` hard-codes ``int(52002 * sample_rate)`` (all of Alpaca) and
so over-selects on any other pool (docs/sources.md#superfiltering). A fraction rounds down, as their ``int()``.

Ties are broken by row id (ascending), so the selection depends only on the set of rows, never on
their order (Beam gives a group's rows in no fixed order). Rows without the field, or with a
non-numeric or non-finite value, are rejected ``missing_score`` and do not count against the
budget; the others not chosen are rejected ``not_selected``. It reads stored scores only: change
the budget and run it again, no model is needed. Needs the whole set (key None): on Beam the one
group is gathered on one worker, so it must fit in that worker's memory. The local engines spill
the rows to disk and rank (score, id, row number) with DuckDB instead (``run_bounded``): the same
order as Python's sort (UTF-8 byte order is code point order), in bounded memory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator

import pyarrow as pa
from pydantic import Field, model_validator

from ..filters.text import score_value
from ..registry import register
from ..spill import CHUNK, Spill, keep_as_is, merge_decisions
from ..stages import GlobalStep, StageConfig, batches

_ROUNDING_SLACK = 1e-9  # fraction * n in floats: 0.29 * 100 = 28.999999999999996 must still give 29


class SelectTopConfig(StageConfig):
    field: str  # the score to rank by, read from row["scores"], e.g. "ifd", "reward", "deita_score"
    budget: int | None = Field(None, ge=0)  # keep this many rows ...
    fraction: float | None = Field(None, ge=0, le=1)  # ... or this share of the input rows (exactly one)
    ascending: bool = False  # False: highest first (IFD, reward); True: lowest first (e.g. perplexity)

    @model_validator(mode="after")
    def _one_budget(self) -> SelectTopConfig:
        if (self.budget is None) == (self.fraction is None):
            raise ValueError("give exactly one of budget (rows) or fraction (of the input rows)")
        return self


@register("select_top")
class SelectTop(GlobalStep):
    """Keeps the top ``budget`` rows (or ``fraction`` of the input) by ``scores.<field>``; ties by id."""

    Config = SelectTopConfig
    whole_tally = True

    def key(self, row: dict) -> None:
        return None

    def target(self, n_rows: int) -> int:
        """How many rows to keep out of ``n_rows`` input rows."""
        c = self.config
        if c.budget is not None:
            return c.budget
        return math.floor(n_rows * c.fraction + _ROUNDING_SLACK)  # type: ignore[operator]

    def selected(self, rows: list[dict]) -> set[int]:
        """Positions (in ``rows``) of the rows kept."""
        sign = 1.0 if self.config.ascending else -1.0
        ranked = [(sign * v, str(row.get("id", "")), i) for i, row in enumerate(rows)
                  if (v := score_value(row, self.config.field)) is not None]
        ranked.sort()
        return {i for _, _, i in ranked[: self.target(len(rows))]}

    def not_chosen(self, row: dict) -> str:
        return "missing_score" if score_value(row, self.config.field) is None else "not_selected"

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        chosen = self.selected(rows)
        for i, row in enumerate(rows):
            yield row, (None if i in chosen else self.not_chosen(row))

    def tally(self, rows: list[dict]) -> dict[str, int]:
        # the budget beside what was met: fewer rows with the score than asked for shows here
        return {"selected": len(self.selected(rows)), "budget": self.target(len(rows))}

    # -- bounded memory: rows on disk, the ranking in DuckDB ------------------------------------------

    ORDER = "v, id, doc"  # the columns of ``ranking`` in ``selected``'s order: (sign * score, id, position)

    def ranking(self, rows: list[dict], first: int) -> pa.Table:
        """The sort key of each ranked row (row number ``doc``), as ``selected`` sorts them."""
        sign = 1.0 if self.config.ascending else -1.0
        ranked = [(first + i, sign * v + 0.0, str(row.get("id", ""))) for i, row in enumerate(rows)
                  if (v := score_value(row, self.config.field)) is not None]  # + 0.0: -0.0 sorts as 0.0
        doc, v, rid = zip(*ranked) if ranked else ((), (), ())
        return pa.table({"doc": pa.array(doc, pa.int64()), "v": pa.array(v, pa.float64()),
                         "id": pa.array(rid, pa.string())})

    def run_bounded(self, rows: Iterable[dict], memory_mb: int) -> Iterator[tuple[dict, str | None]]:
        with Spill(self.name, memory_mb) as sp:
            sp.insert("ranked", self.ranking([], 0))  # the table exists when no row comes
            for batch in batches(rows, CHUNK):
                first, _ = sp.add(batch)
                sp.insert("ranked", self.ranking(batch, first))
            budget = self.target(sp.n)
            chosen = sp.stream(f"SELECT doc FROM (SELECT doc FROM ranked ORDER BY {self.ORDER} LIMIT {budget}) "
                               "ORDER BY doc")
            self.bounded_stats = {"selected": min(budget, sp.value("SELECT count(*) FROM ranked")), "budget": budget}
            yield from merge_decisions(sp.rows(), chosen, keep_as_is, lambda row: (row, self.not_chosen(row)))


class SelectRandomConfig(StageConfig):
    budget: int | None = Field(None, ge=0)
    fraction: float | None = Field(None, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_budget(self) -> SelectRandomConfig:
        if (self.budget is None) == (self.fraction is None):
            raise ValueError("give exactly one of budget (rows) or fraction (of the input rows)")
        return self


@register("select_random")
class SelectRandom(SelectTop):
    """A seeded uniform sample of ``budget`` rows (or ``fraction``): the random baseline every selection
    method is compared with at equal budget. Rows are ranked by a hash of (seed, id), so the sample
    depends only on the set of rows and the seed, never on their order."""

    Config = SelectRandomConfig

    ORDER = "h, doc"

    def _hash(self, row: dict) -> bytes:
        return hashlib.sha256(f"{self.config.seed}:{row.get('id', '')}".encode()).digest()

    def selected(self, rows: list[dict]) -> set[int]:
        ranked = sorted((self._hash(row), i) for i, row in enumerate(rows))
        return {i for _, i in ranked[: self.target(len(rows))]}

    def not_chosen(self, row: dict) -> str:
        return "not_selected"

    def ranking(self, rows: list[dict], first: int) -> pa.Table:
        return pa.table({"doc": pa.array(range(first, first + len(rows)), pa.int64()),
                         "h": pa.array([self._hash(row) for row in rows], pa.binary())})
