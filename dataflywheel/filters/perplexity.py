"""Perplexity under a causal LM (docs/sources.md#perplexity-filter), and a percentile band over any stored score.

``perplexity`` scores each row with a Hugging Face causal LM (any name or local folder; the
scoring core is ``models/lm_score.py``) and writes ``ppl`` (exp of the token-averaged NLL),
``nll`` (token-averaged, nats), ``ppl_tokens`` (tokens scored) and ``ppl_truncated`` (1 when the
text was cut to ``max_length``) into ``row["scores"]``. Its filter compares stored scores only,
so other thresholds can be re-applied later without running the model again (dolma's
tag-then-mix, docs/sources.md#score-then-decide). A text with no tokens gets no ppl (never NaN) and is rejected
``no_tokens``.

No default thresholds: data-juicer's ``max_ppl=1500`` is for its KenLM models and does not carry
over to a neural LM, whose scale depends on the model and tokenizer. Use ``score_band`` to cut at
percentiles of the run's own distribution instead (Cherry_LLM keeps instruction perplexity between
the 25th and 75th percentiles, docs/sources.md#ifd).

``score_band`` lives here for now because perplexity is its first user; it is generic over any
numeric score field.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

from pydantic import Field, model_validator

from ..models.lm_score import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, CausalLMScorer, LMScoreSettings
from ..registry import register
from ..spill import CHUNK, Spill
from ..stages import Filter, GlobalStep, Scorer, StageConfig, batches
from .text import row_text, score_value, with_scores


class PerplexityConfig(StageConfig):
    model: str  # Hub name or local folder (safetensors only); required: there is no sensible default model
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=2)  # tokens per forward, start token included
    forward_batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)  # sequences per forward (batch_size: rows per call)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # see LMScoreSettings.dtype
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when visible
    prefix: Literal["bos", "none"] = "bos"  # start token before the text, so its first token is scored
    long_text: Literal["truncate", "window"] = "truncate"  # window: sliding windows score every token
    stride: int | None = Field(None, ge=1)  # window mode; default max_length // 2
    part: Literal["all", "prompt", "response"] = "all"  # conversations: score the prompt or last answer alone
    scores_prefix: str = ""  # e.g. "response_" -> scores.response_ppl, so two perplexity stages can coexist
    min_ppl: float | None = Field(None, gt=0)  # None: rule off
    max_ppl: float | None = Field(None, gt=0)  # None: rule off
    reject_truncated: bool = False  # True: a text cut to max_length is rejected "truncated"


def _part_text(row: dict, part: str) -> str:
    """The text to score: the whole row, or for a conversation its prompt or its last answer."""
    if part == "all":
        return row_text(row)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"part={part!r} needs a conversation row ending with an assistant turn")
    if part == "response":
        return messages[-1].get("content") or ""
    return "\n".join(m.get("content") or "" for m in messages[:-1])


@register("perplexity")
class Perplexity(Scorer, Filter):
    """Causal-LM perplexity (scores ppl, nll, ppl_tokens, ppl_truncated); optional min/max thresholds."""

    Config = PerplexityConfig
    resources = ("scorer",)

    def build(self) -> None:
        c = self.config
        settings = LMScoreSettings(model=c.model, max_length=c.max_length, batch_size=c.forward_batch_size,
                                   dtype=c.dtype, device=c.device, prefix=c.prefix, long_text=c.long_text,
                                   stride=c.stride)
        # load_causal_lm caches through models.cache.shared: one copy per worker process
        self.scorer = CausalLMScorer(settings)

    def score(self, rows: list[dict]) -> list[dict]:
        texts = [_part_text(row, self.config.part) for row in rows]
        scores = self.scorer.score_texts(texts, prefix=self.config.scores_prefix)
        return [with_scores(row, s) for row, s in zip(rows, scores)]

    def keep(self, row: dict) -> tuple[bool, str | None]:
        c, p, scores = self.config, self.config.scores_prefix, row["scores"]
        if not scores[f"{p}ppl_tokens"]:
            return False, "no_tokens"
        if c.reject_truncated and scores[f"{p}ppl_truncated"]:
            return False, "truncated"
        if c.min_ppl is not None and scores[f"{p}ppl"] < c.min_ppl:
            return False, "ppl_low"
        if c.max_ppl is not None and scores[f"{p}ppl"] > c.max_ppl:
            return False, "ppl_high"
        return True, None

    def tally(self, rows: list[dict]) -> dict[str, int]:
        # truncation is never silent: the run report counts the rows scored on a cut text
        key = f"{self.config.scores_prefix}ppl_truncated"
        return {"truncated": sum(1 for r in rows if (r.get("scores") or {}).get(key))}


class ScoreBandConfig(StageConfig):
    field: str  # the score to band, e.g. "ppl" (read from row["scores"])
    lower_pct: float | None = Field(None, ge=0, le=100)  # keep values >= this percentile (None: no lower cut)
    upper_pct: float | None = Field(None, ge=0, le=100)  # keep values <= this percentile
    min_value: float | None = None  # absolute bounds, applied together with the percentiles
    max_value: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ScoreBandConfig:
        if all(v is None for v in (self.lower_pct, self.upper_pct, self.min_value, self.max_value)):
            raise ValueError("give at least one of lower_pct, upper_pct, min_value, max_value")
        if self.lower_pct is not None and self.upper_pct is not None and self.lower_pct > self.upper_pct:
            raise ValueError(f"lower_pct {self.lower_pct} > upper_pct {self.upper_pct}")
        return self


@register("score_band")
class ScoreBand(GlobalStep):
    """Keeps rows whose scores.<field> lies between percentiles of the whole run and/or absolute bounds.

    Percentiles are numpy's exact ``percentile`` (linear interpolation, its default) over the rows
    that have the field; rows without it (or with a non-finite value) are rejected
    ``missing_score`` and do not shift the cut. Bounds are inclusive, so every row tied with a
    bound is kept and the kept share can exceed upper - lower; the cut depends only on the
    multiset of values, never on row order. Needs the whole distribution (key None): on Beam the
    single group is gathered on one worker, so it must fit in that worker's memory; the local
    engines spill the rows to disk and keep only the values (8 bytes a row, ``run_bounded``).
    """

    Config = ScoreBandConfig

    def key(self, row: dict) -> None:
        return None

    def bounds(self, values: Sequence[float]) -> tuple[float, float]:
        """(low, high) for these values: the tighter of the percentile and absolute bounds."""
        import numpy as np

        c = self.config
        low, high = -math.inf, math.inf
        if len(values) and c.lower_pct is not None:
            low = float(np.percentile(values, c.lower_pct))
        if len(values) and c.upper_pct is not None:
            high = float(np.percentile(values, c.upper_pct))
        if c.min_value is not None:
            low = max(low, c.min_value)
        if c.max_value is not None:
            high = min(high, c.max_value)
        return low, high

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        low, high = self.bounds([v for r in rows if (v := score_value(r, self.config.field)) is not None])
        for row in rows:
            yield row, _band(score_value(row, self.config.field), low, high)

    def run_bounded(self, rows: Iterable[dict], memory_mb: int) -> Iterator[tuple[dict, str | None]]:
        import numpy as np

        with Spill(self.name, memory_mb) as sp:
            values = array("d")  # what numpy's exact percentile needs: every value, not every row
            for batch in batches(rows, CHUNK):
                sp.add(batch)
                values.extend(v for r in batch if (v := score_value(r, self.config.field)) is not None)
            low, high = self.bounds(np.frombuffer(values, dtype=np.float64))
            for row in sp.rows():
                yield row, _band(score_value(row, self.config.field), low, high)


def _band(value: float | None, low: float, high: float) -> str | None:
    if value is None:
        return "missing_score"
    if value < low:
        return "below_band"
    if value > high:
        return "above_band"
    return None
