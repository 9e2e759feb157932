"""Cheap, dependency-free stages: length scoring/filtering and exact dedup."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from pydantic import Field

from ..registry import register
from ..stages import Filter, GlobalStep, Scorer, StageConfig
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
            if row is keep:
                yield row, None
            else:
                yield {**row, "meta": {**(row.get("meta") or {}), "duplicate_of": keep["id"]}}, "duplicate"
