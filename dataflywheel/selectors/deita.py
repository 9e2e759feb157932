"""Deita's LLM scorers (docs/sources.md#deita), read in one batched prefill pass, and score combination.

``deita_score`` asks a causal LM for a complexity score of each user turn and a quality score of
each (user turn, answer) pair, with Deita's prompts (``synth/prompts/deita_*.jinja``, verbatim from
``hkust-nlp/deita:src/deita/selection/scorer/llama_scorer.py``). The score is the expected value
over the digit tokens "1".."6" at the first generated position: a softmax over those six logits
only, score = sum_j j * p_j (``scorer/base.py:infer_score``). Deita runs ``generate`` once per
prompt; here the next-token logits of a whole batch come from one forward (left padding, explicit
position ids, logits kept for the last position only). The raw logits are read (Deita's HF path
reads ``generate``'s processed scores, which equal them under greedy decoding with no logits
processors).

Multi-turn (Deita's ``score_pipeline.py`` + ``filter/combined_filter.py``): turn t's complexity
reads only its user message, its quality that message and the answer; the row's final score is
sum_t c_t * q_t. Scores: ``deita_complexity`` and ``deita_quality`` (means over turns) and
``deita_score`` (the sum of products; with one scorer, the sum of its per-turn scores, as Deita's
``sort_key`` with one key); per-turn lists in ``meta.deita``.

Deita uses two fine-tuned LLaMA-1-7B models, ``hkust-nlp/deita-complexity-scorer`` and
``hkust-nlp/deita-quality-scorer``; one model may serve both. Values are cached by (model,
settings, rendered prompt) in a ``ScoreCache`` when ``cache`` is set, so a re-run computes nothing.

``combine_scores`` turns named score fields into one ranking score (product, or weighted sum), for
score-first selection (docs/selection.md#select-methods; e.g. ifd x instag_count, reward).
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from ..errors import UserError
from ..models.fingerprint import model_fingerprint
from ..models.lm_score import DEFAULT_BATCH_SIZE, model_context, resolve_device, torch_dtype
from ..models.score_cache import cache_key
from ..registry import register
from ..stages import Filter, Scorer, StageConfig, retry_singly
from ..synth.templates import render
from .turns import assistant_turns

DEITA_FALLBACK = 3.0  # scorer/base.py: infer_score returns 3.0 when a digit's log-prob is missing
SCORE_VALUES = (1, 2, 3, 4, 5, 6)  # scorer/base.py: score_template
FALLBACK_CONTEXT = 2048  # Deita's scorers are LLaMA-1-7B fine-tunes: a 2048-token context (docs/sources.md#deita)
PROMPTS = {"complexity": "deita_complexity.jinja", "quality": "deita_quality.jinja"}
Kind = Literal["complexity", "quality"]


def digit_token_ids(tokenizer: Any) -> list[int]:
    """The ids of "1".."6" as single tokens; UserError naming the digit that is not one.

    ``encode`` first; SentencePiece tokenizers (LLaMA, Mistral) encode "1" as ["▁", "1"], so the
    vocabulary entry "1" is tried next (Deita's LLaMA ids 29896.. are those entries).
    """
    ids = []
    for value in SCORE_VALUES:
        digit = str(value)
        encoded = list(tokenizer.encode(digit, add_special_tokens=False))
        if len(encoded) == 1:
            ids.append(int(encoded[0]))
            continue
        vocab_id = tokenizer.convert_tokens_to_ids(digit)
        if vocab_id is None or vocab_id == getattr(tokenizer, "unk_token_id", None):
            raise UserError(f"the digit {digit!r} is not a single token of this tokenizer (encodes to {encoded}); "
                            "Deita's expected score needs one token per digit: pass digit_token_ids")
        ids.append(int(vocab_id))
    if len(set(ids)) != len(ids):
        raise UserError(f"digit token ids are not distinct: {ids}")
    return ids


def deita_prompt(kind: str, instruction: str, output: str = "") -> str:
    """Deita's complexity prompt (``output`` unused) or quality prompt, as the scorer reads it."""
    if kind == "complexity":
        return render(PROMPTS[kind], instruction=instruction)
    if kind == "quality":
        return render(PROMPTS[kind], instruction=instruction, output=output)
    raise ValueError(f"kind must be complexity or quality, got {kind!r}")


def expected_score(digit_logits: Sequence[float]) -> float | None:
    """sum_j j * softmax(digit_logits)_j over the six digits; None when a logit is not finite."""
    if len(digit_logits) != len(SCORE_VALUES) or not all(math.isfinite(x) for x in digit_logits):
        return None
    top = max(digit_logits)
    weights = [math.exp(x - top) for x in digit_logits]  # float64, shifted: no overflow
    return sum(v * w for v, w in zip(SCORE_VALUES, weights)) / sum(weights)


def _keeps_last_logits_only(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def next_token_logits(model: Any, sequences: Sequence[Sequence[int]], token_ids: Sequence[int],
                      batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[float]]:
    """The logits of ``token_ids`` at the position after each sequence, batched.

    Left padding puts every sequence's last token at index -1, so ``logits_to_keep=1`` (when the
    model takes it) computes the LM head for that position only: a 32k vocabulary over a 2k
    prompt would otherwise cost a (batch, 2048, 32000) float tensor. Explicit ``position_ids``
    start at 0 after the padding, so absolute-position models (GPT-2) see what they see unpadded.
    Sequences are sorted by length (longest first) so a batch pads little; results in input order.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("an empty token sequence has no next-token logits")
    out: list[list[float]] = [[] for _ in sequences]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    device = next(model.parameters()).device
    extra = {"logits_to_keep": 1} if _keeps_last_logits_only(model) else {}
    pick = torch.as_tensor(list(token_ids), dtype=torch.long)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            chunk = order[b: b + batch_size]
            width = len(sequences[chunk[0]])
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)  # pad id 0: masked, never read
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = sequences[i]
                input_ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
                mask[row, width - len(seq):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=False, **extra).logits[:, -1, :]
            chosen = logits.float()[:, pick.to(logits.device)].double().cpu().tolist()
            for row, i in enumerate(chunk):
                out[i] = chosen[row]
    return out


def _cut_middle(ids: list[int], max_length: int) -> list[int]:
    """Keep the first and last tokens: the task preamble and the "##Quality: " cue both stay."""
    if len(ids) <= max_length:
        return ids
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head):]


class DigitScorer:
    """One loaded model: rendered prompts -> (expected score | None, truncated), with an optional cache."""

    def __init__(self, model_name: str, template: str, max_length: int | None, batch_size: int,
                 dtype: str, device: str, digit_ids: Sequence[int] | None, cache: Any = None):
        from ..models.tiny_lm import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(model_name, dtype=torch_dtype(dtype), device=resolve_device(device))
        self.template, self.batch_size, self.cache = template, batch_size, cache
        self.counts: Counter = Counter()  # model work since the stage's last tally
        if template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"template 'chat': the tokenizer of {model_name} has no chat template; use template 'deita'")
        if digit_ids is not None and len(digit_ids) != len(SCORE_VALUES):
            raise UserError(f"digit_token_ids needs {len(SCORE_VALUES)} ids (for '1'..'6'), got {len(digit_ids)}")
        self.digit_ids = list(digit_ids) if digit_ids is not None else digit_token_ids(self.tokenizer)
        context = model_context(self.model)
        self.max_length = max_length or context or FALLBACK_CONTEXT
        if context is not None and self.max_length > context:
            raise UserError(f"max_length {self.max_length} exceeds the context of {model_name} ({context} positions)")
        self.what = f"deita:{template}:max_length={self.max_length}:dtype={dtype}:digits={self.digit_ids}"
        self.model_id = model_fingerprint(model_name, self.model)  # a retrained folder gets new keys

    def encode(self, prompt: str) -> list[int]:
        """Token ids as the scorer reads them: Deita's ``tokenizer.encode`` (special tokens on), or the
        prompt as one user turn of the chat template, with its generation header."""
        if self.template == "chat":
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def score(self, prompts: Sequence[str]) -> list[tuple[float | None, bool]]:
        unique = list(dict.fromkeys(prompts))  # a repeated user turn is scored once
        keys = {p: cache_key(self.model_id, self.what, p) for p in unique}
        hits = self.cache.get_json(list(keys.values())) if self.cache is not None else {}
        found = {p: tuple(hits[k]) for p, k in keys.items() if k in hits}
        todo = [p for p in unique if p not in found]
        self.counts["cache_hits"] += len(unique) - len(todo)
        self.counts["prompts_scored"] += len(todo)
        if todo:
            full = [self.encode(p) for p in todo]
            seqs = [_cut_middle(ids, self.max_length) for ids in full]
            logits = next_token_logits(self.model, seqs, self.digit_ids, self.batch_size)
            fresh = {p: (expected_score(lg), len(ids) > self.max_length) for p, lg, ids in zip(todo, logits, full)}
            if self.cache is not None:
                self.cache.put_json([(keys[p], list(v)) for p, v in fresh.items()])
            found.update(fresh)
        return [found[p] for p in prompts]  # type: ignore[misc]


class DeitaScoreConfig(StageConfig):
    scorers: list[Kind] = Field(default_factory=lambda: ["complexity", "quality"])  # Deita's sort_key: both
    model: str | None = None  # one model for every scorer (Hub name or local folder)
    complexity_model: str | None = None  # overrides model; Deita: hkust-nlp/deita-complexity-scorer
    quality_model: str | None = None  # overrides model; Deita: hkust-nlp/deita-quality-scorer
    template: Literal["deita", "chat"] = "deita"  # deita: its literal prompt; chat: that prompt as a user turn
    max_length: int | None = Field(None, ge=8)  # prompt tokens; None: the model's context (else 2048)
    forward_batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)  # prompts per forward
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # Deita's HF path loads the default fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    digit_token_ids: list[int] | None = None  # ids of "1".."6"; None: found from the tokenizer
    fallback: float = DEITA_FALLBACK  # a turn whose digit logits are not finite
    on_error: Literal["dead_letter", "fallback"] = "dead_letter"  # fallback: Deita's 3.0 when scoring raises
    cache: str | None = None  # ScoreCache sqlite path; None: no cache

    @model_validator(mode="after")
    def _models(self) -> DeitaScoreConfig:
        if not self.scorers or len(set(self.scorers)) != len(self.scorers):
            raise ValueError(f"scorers must name complexity and/or quality once each, got {self.scorers}")
        for kind in self.scorers:
            if self.model_for(kind) is None:
                raise ValueError(f"no model for the {kind} scorer: set model or {kind}_model")
        return self

    def model_for(self, kind: str) -> str | None:
        return getattr(self, f"{kind}_model") or self.model


def _user_turn(context: list[dict]) -> str:
    """The user message an assistant turn answers (Deita scores each turn on its own question)."""
    return next((m.get("content") or "" for m in reversed(context) if m.get("role") == "user"), "")


@register("deita_score")
class DeitaScore(Scorer):
    """Deita complexity / quality scores per assistant turn; deita_score = sum_t c_t * q_t."""

    Config = DeitaScoreConfig
    resources = ("scorers",)

    def build(self) -> None:
        from ..models.score_cache import ScoreCache

        c = self.config
        cache = ScoreCache(c.cache) if c.cache else None
        self.scorers = {kind: DigitScorer(c.model_for(kind), c.template, c.max_length, c.forward_batch_size,
                                          c.dtype, c.device, c.digit_token_ids, cache) for kind in c.scorers}

    def teardown(self) -> None:
        caches = {id(s.cache): s.cache for s in self.__dict__.get("scorers", {}).values() if s.cache is not None}
        for cache in caches.values():  # one cache, shared by the scorers
            cache.close()
        super().teardown()

    def _turn_scores(self, kind: str, prompts: list[str]) -> list[tuple[float | None, bool]]:
        score = self.scorers[kind].score
        if self.config.on_error != "fallback":
            return score(prompts)  # raises: the run retries the batch row by row and dead-letters failing rows
        # a failing batch is scored prompt by prompt, so only the failing prompts fall back (Deita's
        # 3.0: value None, counted in meta and tally)
        return retry_singly(score, prompts, lambda prompt, err: [(None, False)])

    def score(self, rows: list[dict]) -> list[dict]:
        turns = [[(_user_turn(ctx), answer) for ctx, answer in assistant_turns(row)] for row in rows]
        flat = [t for row_turns in turns for t in row_turns]
        per_kind = {}
        for kind in self.config.scorers:
            prompts = [deita_prompt(kind, q, a) for q, a in flat]
            per_kind[kind] = self._turn_scores(kind, prompts)
        out, at = [], 0
        for row, row_turns in zip(rows, turns):
            n = len(row_turns)
            meta: dict[str, Any] = {"fallback": 0, "truncated": 0}
            products = [1.0] * n
            scores: dict[str, float] = {}
            for kind, results in per_kind.items():
                values = []
                for value, cut in results[at: at + n]:
                    meta["fallback"] += value is None
                    meta["truncated"] += cut
                    values.append(self.config.fallback if value is None else value)
                meta[kind] = values
                products = [p * v for p, v in zip(products, values)]
                if values:
                    scores[f"deita_{kind}"] = sum(values) / n
            if n:
                scores["deita_score"] = sum(products)
            at += n
            out.append({**row, "scores": {**(row.get("scores") or {}), **scores},
                        "meta": {**(row.get("meta") or {}), "deita": meta}})
        return out

    def tally(self, rows: list[dict]) -> dict[str, int]:
        metas = [(r.get("meta") or {}).get("deita") or {} for r in rows]
        work: Counter = Counter()
        for scorer in self.__dict__.get("scorers", {}).values():  # what the last score() call did (none if unbuilt)
            work.update(scorer.counts)
            scorer.counts = Counter()
        return {"fallback": sum(m.get("fallback", 0) for m in metas),
                "truncated": sum(m.get("truncated", 0) for m in metas), **work}


class CombineScoresConfig(StageConfig):
    fields: list[str] = Field(min_length=1)  # score names in row["scores"], e.g. [deita_complexity, deita_quality]
    op: Literal["product", "sum"] = "product"  # Deita ranks by complexity x quality (docs/sources.md#deita)
    weights: list[float] | None = None  # sum: w_i * x_i; product: x_i ** w_i; None: all 1
    out: str = "combined"  # the score written, row["scores"][out]

    @model_validator(mode="after")
    def _weights(self) -> CombineScoresConfig:
        if self.weights is not None and len(self.weights) != len(self.fields):
            raise ValueError(f"{len(self.weights)} weights for {len(self.fields)} fields")
        if self.out in self.fields:
            raise ValueError(f"out {self.out!r} would overwrite one of its inputs")
        return self


def _number(scores: dict, name: str) -> float | None:
    value = scores.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@register("combine_scores")
class CombineScores(Scorer, Filter):
    """scores.<out> = product (or weighted sum) of named scores; a row missing one is rejected missing_score."""

    Config = CombineScoresConfig

    def combine(self, scores: dict) -> float | None:
        c = self.config
        values = [_number(scores, f) for f in c.fields]
        if any(v is None for v in values):
            return None
        weights = c.weights or [1.0] * len(values)
        if c.op == "sum":
            return sum(w * v for w, v in zip(weights, values))  # type: ignore[operator]
        result = 1.0
        for w, v in zip(weights, values):
            result *= v ** w  # type: ignore[operator]
        return result if isinstance(result, float) and math.isfinite(result) else None

    def score(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            scores = {k: v for k, v in (row.get("scores") or {}).items() if k != self.config.out}
            value = self.combine(scores)
            if value is not None:
                scores[self.config.out] = value
            out.append({**row, "scores": scores})
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        if _number(row.get("scores") or {}, self.config.out) is None:
            return False, "missing_score"
        return True, None
