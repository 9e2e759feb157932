"""``mixture`` in bounded memory: rows spilled to local disk, the plan made by DuckDB.

One pass writes each row to the spill file and its facts (group, units, tokens, priority key) to
DuckDB. The per-group pools are one GROUP BY, and the targets come from the same
``Mixture.targets`` as in memory. Within a group the rows are taken in priority order while the
running sum of their units stays within the target: a window sum over (priority, row number),
which is ``plan``'s "stop at the first row that does not fit" because units are never negative.
The decisions stream back by row number and meet the rows in a sequential re-read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from ..spill import CHUNK, Spill
from ..stages import batches

if TYPE_CHECKING:
    from .mixture import Mixture

_FACTS = pa.schema([("doc", pa.int64()), ("grp", pa.string()), ("units", pa.int64()), ("tokens", pa.int64()),
                    ("p0", pa.int64()), ("p1", pa.float64()), ("p2", pa.string())])


def run_spilled(stage: Mixture, rows: Iterable[dict], memory_mb: int) -> Iterator[tuple[dict, str | None]]:
    with Spill(stage.name, memory_mb) as sp:
        sp.insert("facts", _facts(stage, [], 0))  # the table exists when no row comes
        for batch in batches(rows, CHUNK):
            first, _ = sp.add(batch)
            sp.insert("facts", _facts(stage, batch, first))
        pools = {g: (n, tokens, units) for g, n, tokens, units in sp.stream(
            "SELECT grp, count(*), sum(tokens)::BIGINT, sum(units)::BIGINT FROM facts WHERE grp IS NOT NULL "
            "GROUP BY grp ORDER BY min(doc)")}
        total = sp.value("SELECT coalesce(sum(units), 0)::BIGINT FROM facts")
        plan = stage.targets(stage.budget_of(int(total)), pools)
        sp.insert("targets", pa.table({
            "grp": pa.array(list(plan.groups), pa.string()),
            "target": pa.array([p.target for p in plan.groups.values()], pa.int64()),
            "excluded": pa.array([g in plan.excluded for g in plan.groups], pa.bool_())}))
        sp.materialize(
            "decided", "SELECT doc, grp, tokens, CASE WHEN grp IS NULL THEN 'missing_group' "
            "WHEN excluded THEN 'excluded_group' WHEN cum <= target THEN NULL ELSE 'over_budget' END AS reason "
            "FROM (SELECT doc, grp, tokens, sum(units) OVER (PARTITION BY grp ORDER BY p0, p1, p2, doc "
            "ROWS UNBOUNDED PRECEDING) AS cum FROM facts) LEFT JOIN targets USING (grp)")
        for g, n, tokens in sp.stream("SELECT grp, count(*), sum(tokens)::BIGINT FROM decided WHERE reason IS NULL GROUP BY grp"):
            plan.groups[g].taken_rows, plan.groups[g].taken_tokens = n, tokens
        stage.last_plan, stage.bounded_stats = plan, plan.stats()
        decisions = sp.stream("SELECT grp, reason FROM decided ORDER BY doc")
        for row, (g, reason) in zip(sp.rows(), decisions):
            yield stage.with_group(row, g), reason


def _facts(stage: Mixture, rows: list[dict], first: int) -> pa.Table:
    """Each row's group, size and priority key: ``Mixture._priority`` as three sortable columns."""
    tokens = stage.token_counts(rows)
    units = tokens if stage.config.unit == "tokens" else [1] * len(rows)
    keys = [_key(stage._priority(row)) for row in rows]
    return pa.table({"doc": range(first, first + len(rows)), "grp": [stage.group(r) for r in rows],
                     "units": units, "tokens": tokens, "p0": [k[0] for k in keys], "p1": [k[1] for k in keys],
                     "p2": [k[2] for k in keys]}, schema=_FACTS)


def _key(priority: tuple) -> tuple[int, float, str]:
    """(hash,) or (0 | 1, value, id | hash) as one (int, float, str) key that sorts the same way."""
    if len(priority) == 1:
        return 0, 0.0, priority[0]
    flag, value, tie = priority
    return flag, float(value) + 0.0, tie  # + 0.0: -0.0 sorts as 0.0, as in Python

