"""The ``diversity`` stage: embed rows, then select a diverse subset to a budget (docs/selection.md#embedding-diversity).

One global step over the whole pool (key None) running one objective of ``selectors/diversity.py``:
``repr_filter`` (Deita), ``kcenter``, ``kmeans`` or ``facility_location`` (Superfiltering.D).
``order_by`` names a stored score (descending) that sets the candidates' priority: the walk order
of the repr filter, the start of k-center, the pick order inside a k-means cluster, and ties
everywhere. Deita ranks by its score first and then runs the repr filter (docs/sources.md#deita), so
``method: repr_filter, order_by: deita_score`` *is* Deita's selector. Rows are sorted by
(score desc, id, text) before anything else, so every engine and any input order select the same
rows. The step only reads stored scores and cached embeddings: re-running it with another budget,
threshold or method recomputes nothing (``cache``).

Rejections: ``missing_score`` (no finite ``order_by`` score), ``no_text`` (not a conversation or a
document), ``too_similar`` (the repr filter saw the row and found a selected row with cosine above
the threshold), ``not_selected`` (the budget ran out first). Kept rows get
``scores.diversity_rank``: 1 for the first row selected, 2 for the next...
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ..filters.text import score_value, with_scores
from ..models.score_cache import ScoreCache
from ..registry import register
from ..stages import GlobalStep, StageConfig
from .diversity import REPR_THRESHOLD, Kernel, facility_location, k_center_greedy, kmeans_sample, repr_filter
from .embed import EMBED_BATCH, row_texts, text_vectors

KMEANS_CLUSTERS = 100  # Cherry_LLM data_by_cluster.py: kmeans_num_clusters=100 (docs/sources.md#embedding-diversity)
KMEANS_SEED = 0  # Cherry_LLM: random_state=0 (docs/sources.md#embedding-diversity)
METHOD_OPTIONS = {"threshold": "repr_filter", "n_clusters": "kmeans", "kmeans_mode": "kmeans", "seed": "kmeans",
                  "kernel": "facility_location"}


class DiversityConfig(StageConfig):
    method: Literal["repr_filter", "kcenter", "kmeans", "facility_location"] = "repr_filter"  # Deita's (docs/sources.md#deita)
    # What is embedded. Deita embeds the whole conversation and Superfiltering.D instruction + input +
    # output (its emb_type "whole"): the two reference recipes both judge redundancy on the full sample.
    part: Literal["instruction", "conversation", "response"] = "conversation"
    model: str | None = None  # sentence-transformers name or folder; None: the bundled MiniLM (docs/sources.md#minilm-embedder)
    embed_batch_size: int = Field(EMBED_BATCH, ge=1)
    cache: str | None = None  # sqlite file of vectors (models/score_cache.py); None: embed every run
    budget: int | None = Field(None, gt=0)  # rows to select
    fraction: float | None = Field(None, gt=0, le=1)  # or this share of the rows reaching the stage (floor)
    order_by: str | None = None  # score field giving priority, highest first; None: by id
    threshold: float = Field(REPR_THRESHOLD, ge=-1, le=1)  # repr_filter: max cosine to any selected row
    n_clusters: int = Field(KMEANS_CLUSTERS, ge=1)  # kmeans; capped at the number of rows
    kmeans_mode: Literal["uniform", "proportional"] = "uniform"  # Cherry takes 10 per cluster: uniform
    seed: int = KMEANS_SEED  # kmeans random_state
    kernel: Kernel = "cosine"  # facility_location: (1+cos)/2, or Superfiltering.D's submodlib_euclidean

    @model_validator(mode="after")
    def _check(self) -> DiversityConfig:
        if (self.budget is None) == (self.fraction is None):
            raise ValueError("give exactly one of budget or fraction")
        for option, method in METHOD_OPTIONS.items():
            if option in self.model_fields_set and self.method != method:
                raise ValueError(f"{option} applies to method {method}, not {self.method}")
        return self


@register("diversity")
class Diversity(GlobalStep):
    """Embedding-diversity selection to a budget: repr_filter (Deita), kcenter, kmeans, facility_location."""

    Config = DiversityConfig
    resources = ("cache",)
    whole_tally = True
    spill_factor = 2.3  # the rows, and each candidate's text again in DuckDB (its sort key)

    def __init__(self, config: DiversityConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self._counts: dict[str, int] = {}

    def build(self) -> None:
        # The embedder loads on first use (once per process): a re-run served by the cache loads none.
        self.cache = ScoreCache(self.config.cache) if self.config.cache else None

    def teardown(self) -> None:
        if self.__dict__.get("cache") is not None:  # only a built cache: teardown never builds one
            self.cache.close()
        super().teardown()

    def key(self, row: dict) -> None:
        return None

    def budget_for(self, rows_in: int) -> int:
        c = self.config
        if c.budget is not None:
            return c.budget
        return math.floor(c.fraction * rows_in + 1e-9)  # floor, as Cherry_LLM's int(len * rate); 1e-9: 0.29*100

    def select(self, vectors: np.ndarray, budget: int) -> list[int]:
        """Indices into ``vectors`` (rows in priority order) in the order they were selected."""
        c, n = self.config, len(vectors)
        if c.method == "repr_filter":
            return repr_filter(vectors, np.arange(n), budget, c.threshold)
        if c.method == "kcenter":
            return k_center_greedy(vectors, budget)
        if c.method == "kmeans":
            order = np.arange(n) if c.order_by else None
            return kmeans_sample(vectors, budget, c.n_clusters, c.seed, c.kmeans_mode, order)
        return facility_location(vectors, budget, c.kernel)

    def candidate(self, row: dict) -> tuple[float, str, str] | str:
        """(score, id, text) of a row that can be selected, else why not (``missing_score``, ``no_text``)."""
        score = score_value(row, self.config.order_by) if self.config.order_by else 0.0
        if score is None:
            return "missing_score"
        try:
            return score, str(row.get("id", "")), row_texts([row], self.config.part)[0]
        except ValueError:
            return "no_text"

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        c = self.config
        budget = self.budget_for(len(rows))
        candidates = []  # (sort key, row, text)
        for row in rows:
            key = self.candidate(row)
            if isinstance(key, str):
                yield row, key
                continue
            score, rid, text = key
            candidates.append(((-score, rid, text), row, text))
        candidates.sort(key=lambda item: item[0])
        stats: dict[str, int] = {}
        texts = [text for _, _, text in candidates]
        vectors = text_vectors(texts, c.part, c.model, self.cache, c.embed_batch_size, stats) if texts else None
        picks = self.select(vectors, budget) if texts and budget > 0 else []
        rank = {i: r for r, i in enumerate(picks, start=1)}
        # The repr filter stops once the budget is met: rows it never reached were not judged similar.
        seen = len(candidates) if len(picks) < budget else (picks[-1] + 1 if picks else 0)
        too_similar = 0
        for i, (_, row, _) in enumerate(candidates):
            if i in rank:
                yield with_scores(row, {"diversity_rank": rank[i]}), None
            elif c.method == "repr_filter" and i < seen:
                too_similar += 1
                yield row, "too_similar"
            else:
                yield row, "not_selected"
        self._counts = {"selected": len(picks), "too_similar": too_similar, **stats}

    def tally(self, rows: list[dict]) -> dict[str, int]:
        # counted by run() on the group just decided (key None: one group per run)
        return dict(self._counts)

    def run_bounded(self, rows: Iterable[dict], memory_mb: int) -> Iterator[tuple[dict, str | None]]:
        """``run`` with the rows on local disk (``diversity_spill.py``)."""
        from .diversity_spill import run_spilled

        return run_spilled(self, rows, memory_mb)
