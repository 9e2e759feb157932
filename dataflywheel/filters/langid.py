"""Language ID with fastText lid.176 (docs/sources.md#language-id and #fasttext-lid-model): score, then decide.

Scores ``lang_<code>`` for the top-k labels and sets ``lang``; the filter keeps rows whose top
language is allowed with a score >= ``min_score`` (0.65: datatrove's LanguageFilter default and
FineWeb's setting).
"""

from __future__ import annotations

from collections import Counter

from pydantic import Field

from ..models.lid import load_lid, predict_languages
from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from .text import row_text


class LangIdConfig(StageConfig):
    languages: list[str] = []  # ISO 639 codes to keep; empty keeps every language (score only)
    min_score: float = Field(0.65, ge=0.0, le=1.0)  # datatrove LanguageFilter / FineWeb
    top_k: int = Field(1, ge=1)
    model_path: str | None = None  # lid.176.bin or GlotLID; default: lid.176.ftz from its wheel
    batch_size: int = 512


@register("langid")
class LangId(Scorer, Filter):
    Config = LangIdConfig
    resources = ("model",)

    def build(self) -> None:
        self.model = load_lid(self.config.model_path)

    def score(self, rows: list[dict]) -> list[dict]:
        labels = predict_languages(self.model, [row_text(r) for r in rows], k=self.config.top_k)
        out = []
        for row, preds in zip(rows, labels):  # a hot loop (~100k rows/s per core): no helper calls
            old = row.get("scores")
            scores = dict(old) if old else {}
            if preds:
                for code, p in preds:
                    scores["lang_" + code] = round(p, 4)
                lang = preds[0][0]
                scores["lang_score"] = scores["lang_" + lang]
            else:
                lang, scores["lang_score"] = "und", 0.0
            new = row.copy()
            new["scores"] = scores
            new["lang"] = lang
            out.append(new)
        return out

    def tally(self, rows: list[dict]) -> dict[str, int]:
        """Rows per detected language (``lang/<code>``), for the run report."""
        return {f"lang/{lang}": n for lang, n in Counter(row["lang"] for row in rows).items()}

    def keep(self, row: dict) -> tuple[bool, str | None]:
        if self.config.languages and row["lang"] not in self.config.languages:
            return False, "language"
        if row["scores"]["lang_score"] < self.config.min_score:
            return False, "language_score"
        return True, None
