"""``diversity`` with the rows on local disk: the candidates' priority order from DuckDB, their
texts embedded chunk by chunk in that order.

The repr filter (Deita's walk) then runs in memory bounded by its budget, not by the pool: it
pulls chunks only until the budget is met, so rows it never reaches are never embedded. k-center,
k-means and facility location compare every candidate with the whole pool, so their vectors
(4 bytes x dimensions a row: 1.5 KB for MiniLM) are held at once; only the rows go to disk.
Decisions are ``Diversity.run``'s for the same vectors: same order (score desc, id, text, then
input order, as Python's stable sort), same selection functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..filters.text import with_scores
from ..spill import CHUNK, Spill, merge_decisions
from ..stages import batches
from .diversity import REPR_CHUNK, repr_filter_chunks
from .embed import text_vectors

if TYPE_CHECKING:
    from .diversity_stage import Diversity

_CAND = pa.schema([("doc", pa.int64()), ("k", pa.float64()), ("id", pa.string()), ("text", pa.string())])


def run_spilled(stage: Diversity, rows: Iterable[dict], memory_mb: int) -> Iterator[tuple[dict, str | None]]:
    c = stage.config
    with Spill(stage.name, memory_mb) as sp:
        sp.insert("cand", pa.table({f.name: [] for f in _CAND}, schema=_CAND))
        for batch in batches(rows, CHUNK):
            first, _ = sp.add(batch)
            facts = [(first + i, -key[0] + 0.0, key[1], key[2]) for i, row in enumerate(batch)
                     if isinstance(key := stage.candidate(row), tuple)]  # + 0.0: -0.0 sorts as 0.0
            sp.insert("cand", pa.table(dict(zip(_CAND.names, zip(*facts) if facts else ([],) * 4)), schema=_CAND))
        n = sp.value("SELECT count(*) FROM cand")
        budget = stage.budget_for(sp.n)
        stats: dict[str, int] = {}
        walk = _Walk(sp, stage, stats)
        if c.method == "repr_filter":
            picks = repr_filter_chunks(walk.chunks(), min(budget, n), c.threshold) if budget > 0 else []
        else:
            vectors = walk.all(n)
            picks = stage.select(vectors, budget) if n and budget > 0 else []
            del vectors
        # The repr filter stops once the budget is met: rows it never reached were not judged similar.
        seen = n if len(picks) < budget else (picks[-1] + 1 if picks else 0)
        sp.insert("picks", pa.table({"pos": pa.array(picks, pa.int64()),
                                     "rank": pa.array(range(1, len(picks) + 1), pa.int64())}))
        decided = sp.stream("SELECT doc, pos, rank FROM cand LEFT JOIN walk USING (doc) LEFT JOIN picks USING (pos) "
                            "ORDER BY doc")
        too_similar = 0

        def decide(row: dict, pos: int | None, rank: int | None) -> tuple[dict, str | None]:
            nonlocal too_similar
            if rank is not None:
                return with_scores(row, {"diversity_rank": rank}), None
            if c.method == "repr_filter" and pos is not None and pos < seen:
                too_similar += 1
                return row, "too_similar"
            return row, "not_selected"

        yield from merge_decisions(sp.rows(), decided, decide, lambda row: (row, stage.candidate(row)))
        stage.bounded_stats = {"selected": len(picks), "too_similar": too_similar, **stats}


class _Walk:
    """The candidates' texts in priority order, embedded chunk by chunk; each chunk's row numbers
    go to the ``walk`` table (position in the order -> row number) as it is pulled."""

    def __init__(self, sp: Spill, stage: Diversity, stats: dict[str, int]):
        self.sp, self.stage, self.stats = sp, stage, stats
        sp.insert("walk", pa.table({"pos": pa.array([], pa.int64()), "doc": pa.array([], pa.int64())}))

    def chunks(self) -> Iterator[np.ndarray]:
        c, pos = self.stage.config, 0
        ordered = self.sp.cursor()  # its own connection, while the walk's facts are written
        try:
            ordered.execute("SELECT doc, text FROM cand ORDER BY k, id, text, doc")
            while batch := ordered.fetchmany(REPR_CHUNK):
                docs, texts = zip(*batch)
                self.sp.insert("walk", pa.table({"pos": pa.array(range(pos, pos + len(docs)), pa.int64()),
                                                 "doc": pa.array(docs, pa.int64())}))
                pos += len(docs)
                yield text_vectors(list(texts), c.part, c.model, self.stage.cache, c.embed_batch_size, self.stats)
        finally:
            ordered.close()

    def all(self, n: int) -> np.ndarray:
        out, pos = None, 0
        for block in self.chunks():
            if out is None:
                out = np.empty((n, block.shape[1]), dtype=np.float32)
            out[pos:pos + len(block)] = block
            pos += len(block)
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)
