"""Cheap, dependency-free stages: length scoring/filtering and exact dedup."""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator

from pydantic import Field

from ..registry import register
from ..stages import Decision, Filter, GlobalStep, Scorer, StageConfig, batches
from .text import normalize_for_hash, row_text, with_scores


class LengthConfig(StageConfig):
    min_words: int = Field(0, ge=0)
    max_words: int | None = Field(None, ge=1)


@register("length")
class Length(Scorer, Filter):
    """Scores ``n_words`` / ``n_chars``; keeps rows with min_words <= n_words <= max_words."""

    Config = LengthConfig

    def score(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            text = row_text(row)
            out.append(with_scores(row, {"n_words": len(text.split()), "n_chars": len(text)}))
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        n = row["scores"]["n_words"]
        if n < self.config.min_words:
            return False, "too_short"
        if self.config.max_words is not None and n > self.config.max_words:
            return False, "too_long"
        return True, None


@register("exact_dedup")
class ExactDedup(GlobalStep):
    """Keeps one row per normalized-text hash: the smallest id, so every engine keeps the same one."""

    def key(self, row: dict) -> str:
        return hashlib.sha1(normalize_for_hash(row_text(row)).encode("utf-8")).hexdigest()

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        keep = min(rows, key=lambda r: r["id"])
        for row in rows:
            yield (row, None) if row is keep else _duplicate(row, keep["id"])

    def run_bounded(self, rows: Iterable[dict], memory_mb: int) -> Iterator[Decision]:
        """``run`` per key over a stream, in bounded memory: (row number, key, id) facts in DuckDB,
        the smallest id per key (the first such row in input order) found by a window over them."""
        import pyarrow as pa

        from ..spill import CHUNK, Spill, merge_decisions

        with Spill(self.name, memory_mb) as sp:
            failed: dict[int, BaseException] = {}
            for batch in batches(rows, CHUNK):
                first, _ = sp.add(batch)
                facts: list[tuple[int, str, str]] = []
                for doc, row in enumerate(batch, first):
                    try:
                        facts.append((doc, self.key(row), str(row["id"])))
                    except Exception as err:  # noqa: BLE001 - a dead letter, as when grouping in memory
                        failed[doc] = err
                docs, keys, ids = zip(*facts) if facts else ((), (), ())
                sp.insert("facts", pa.table({"doc": pa.array(docs, pa.int64()), "key": pa.array(keys, pa.string()),
                                             "id": pa.array(ids, pa.string())}))
            if not sp.n:
                return
            grouped = sp.stream(  # (doc, whether it is the one kept, the id kept) for keys shared by rows
                "SELECT doc, doc = keep, keep_id FROM (SELECT doc, first_value(doc) OVER w AS keep, "
                "first_value(id) OVER w AS keep_id, count(*) OVER (PARTITION BY key) AS n FROM facts "
                "WINDOW w AS (PARTITION BY key ORDER BY id, doc)) WHERE n > 1 ORDER BY doc")
            # rows whose key raised have no facts: merged in by row number, as (doc, None, the error)
            decided = heapq.merge(grouped, ((doc, None, err) for doc, err in sorted(failed.items())),
                                  key=lambda item: item[0])
            yield from merge_decisions(sp.rows(), decided, _decide)


def _decide(row: dict, kept: bool | None, keep_id_or_error) -> Decision:
    if kept is None:  # its key raised: a dead letter
        return row, keep_id_or_error
    return (row, None) if kept else _duplicate(row, keep_id_or_error)


def _duplicate(row: dict, keep_id: str) -> tuple[dict, str]:
    return {**row, "meta": {**(row.get("meta") or {}), "duplicate_of": keep_id}}, "duplicate"
