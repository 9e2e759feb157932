"""Main-content extraction from raw HTML with trafilatura (REFERENCES §2.4).

Modes map to trafilatura's switches: ``precision`` (favor_precision), ``recall`` (favor_recall),
``balanced`` (default) and ``fast`` (no fallback extractors). Pages over ``max_html_bytes`` are
rejected before parsing, because parse time grows with page size.
"""

from __future__ import annotations

from typing import Literal

import trafilatura
from pydantic import Field

from ..registry import register
from ..stages import Filter, Scorer, StageConfig


class ExtractConfig(StageConfig):
    mode: Literal["balanced", "precision", "recall", "fast"] = "balanced"
    include_comments: bool = False
    include_tables: bool = True
    max_html_bytes: int = Field(5_000_000, gt=0)
    keep_html: bool = False  # raw HTML is large; drop it once the text is out
    batch_size: int = 32


@register("extract")
class Extract(Scorer, Filter):
    """``html`` -> ``text`` (+ ``meta.title``/``meta.date``); rejects pages with no main text."""

    Config = ExtractConfig

    def _extract(self, row: dict) -> dict:
        html = row.get("html") or ""
        meta = dict(row.get("meta") or {})
        if len(html.encode("utf-8", errors="ignore")) > self.config.max_html_bytes:
            meta["extract_error"] = "too_large"
            text = ""
        else:
            mode = self.config.mode
            doc = trafilatura.bare_extraction(
                html, url=row.get("url"), with_metadata=True,
                include_comments=self.config.include_comments, include_tables=self.config.include_tables,
                favor_precision=mode == "precision", favor_recall=mode == "recall", fast=mode == "fast",
            )
            text = (getattr(doc, "text", None) or "").strip() if doc is not None else ""
            for key in ("title", "date"):
                value = getattr(doc, key, None) if doc is not None else None
                if value:
                    meta[key] = value
        out = {**row, "text": text, "meta": meta}
        if not self.config.keep_html:
            out.pop("html", None)
        return out

    def score(self, rows: list[dict]) -> list[dict]:
        return [self._extract(row) for row in rows]

    def keep(self, row: dict) -> tuple[bool, str | None]:
        if row["meta"].get("extract_error"):
            return False, row["meta"]["extract_error"]
        return (True, None) if row["text"] else (False, "no_text")
