"""The ``judge`` scorer: an LLM grades completions, through any generation backend (docs/pairs.md#scorers).

- ``rubric``: Self-Rewarding's additive 5-point prompt (docs/sources.md#self-rewarding-judge, ``prompts/
  self_rewarding_judge.jinja``), judged ``samples`` times per completion (3 in the paper), each sample
  with its own seed; the score is the mean of the parsable 0-5 integers. A completion none of whose
  samples parses scores None and each unparsable sample is counted (``judge_unparsable``).
- ``pairwise``: MT-Bench's pair prompt (``prompts/pairwise_judge.jinja``) over the usable completions
  of a row, every comparison asked in **both orders** so a judge's position bias cancels (Zheng et
  al. 2023 found it in every judge they tried): a judge that always answers "A" gives every
  completion a win rate of 0.5. ``round_robin`` (default) compares every ordered pair,
  N(N-1) x samples calls per row, which is cheap for the N = 4 of Self-Rewarding and the K = 8 of
  RLHFlow; ``pivot`` compares each completion with the first usable one only, 2(N-1) x samples,
  for larger N. The score is the win rate (a tie counts half) over the parsable verdicts.

Raw judge outputs stay on each completion (``judge``: texts, parsed values, cache flags) so a score
can be audited and re-parsed. Cache hits and misses come from the backend's generation cache and are
counted from those flags, so they are right on any engine.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..registry import register
from ..stages import Scorer
from .backends.base import Request, Sample, Sampling
from .backends.config import BackendConfig, build_backend
from .score import ScoreConfig, prompt_messages, provenance, tally_scores, targets, usable, write_scores
from .templates import PROMPTS, render

RUBRIC_TEMPLATE = "self_rewarding_judge.jinja"
PAIRWISE_TEMPLATE = "pairwise_judge.jinja"
RUBRIC_MAX = 5  # the additive rubric's five points (docs/sources.md#self-rewarding-judge)
# Self-Rewarding samples its judge 3 times and averages (docs/sources.md#self-rewarding-judge); the
# paper gives the judge no sampling settings of its own, so ours reuse its response sampling (T 0.7,
# top-p 0.9): samples must differ for the average to mean anything. 256 tokens hold a 100-word
# justification and the score line.
JUDGE_SAMPLES = 3
JUDGE_SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_tokens=256, seed=0)


class JudgeConfig(ScoreConfig):
    backend: BackendConfig
    mode: Literal["rubric", "pairwise"] = "rubric"
    samples: int = Field(JUDGE_SAMPLES, ge=1)  # judge samples per completion (rubric) or per ordered comparison
    sampling: Sampling = JUDGE_SAMPLING  # n must stay 1: use samples; seed None = unseeded and uncached
    pairing: Literal["round_robin", "pivot"] = "round_robin"  # pairwise only
    field: str = "judge"
    batch_size: int = 32  # rows per call of score(), all their judge requests in one backend call

    @field_validator("sampling", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        # a partial `sampling:` ({max_tokens: 64}) changes those keys of JUDGE_SAMPLING, not the rest
        return {**JUDGE_SAMPLING.model_dump(), **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _n(self) -> JudgeConfig:
        if self.sampling.n != 1:
            raise ValueError("judge sampling.n must be 1: set `samples` for several judge samples")
        return self


# -- parsing ----------------------------------------------------------------------------------------

_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
# "score", up to 20 characters that are not digits or a newline ("**: ", " is ", " of "), a sign
# when one touches the number, the number (digits or a word), and an optional "/ d" or "out of d".
_SCORE = re.compile(r"\bscore\b[^0-9\n]{0,20}?(?P<sign>[-\u2212]?)(?P<n>[0-9]+(?:\.[0-9]+)?|"
                    + "|".join(_WORDS) + r")\b(?:\s*(?:/|out\s+of)\s*(?P<d>[0-9]+))?", re.IGNORECASE)
# What may come before "score" on the concluding line: markdown and a "final" / "total" / "overall".
_LINE_START = re.compile(r"[\s*#>_`\-]*(?:(?:final|total|overall)\s+)?", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)


def parse_rubric_score(text: str) -> int | None:
    """The 0-5 integer of a "Score: n" reply, or None.

    The last "Score: n" that opens a line wins (the rubric asks to conclude with it; a justification
    may mention scores before it); without one, the last "score ... n" anywhere. "4/5", "4 out of 5",
    "**4**", "4.0" and "four" read as 4; a value off the 0-5 scale ("7", "8/10", "3.5", "-1") and the
    template's own "Score: <total points>" read as None: a judge that did not follow the scale did not
    give a score on it.
    """
    found = list(_SCORE.finditer(text or ""))
    if not found:
        return None
    anchored = [m for m in found if _LINE_START.fullmatch(text[text.rfind("\n", 0, m.start()) + 1:m.start()])]
    m = (anchored or found)[-1]
    raw = m["n"].lower()
    if m["sign"] or (m["d"] is not None and int(m["d"]) != RUBRIC_MAX):
        return None
    value = float(_WORDS[raw]) if raw in _WORDS else float(raw)
    if not value.is_integer() or not 0 <= value <= RUBRIC_MAX:
        return None
    return int(value)


def parse_pairwise_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from the last "[[A]]" / "[[B]]" / "[[C]]" (or "[[tie]]") of a reply, else None.
    The last one: the verdict closes the reply, after an explanation that may quote the format."""
    found = _VERDICT.findall(text or "")
    if not found:
        return None
    v = found[-1].upper()
    return "tie" if v in ("C", "TIE") else v


# -- the stage --------------------------------------------------------------------------------------


def conversation_text(messages: list[dict]) -> str:
    """The judged prompt: a single user turn as is, a longer conversation as a "Role: text" transcript."""
    if len(messages) == 1:
        return str(messages[0].get("content") or "")
    return "\n\n".join(f"{str(m.get('role', '')).capitalize()}: {m.get('content') or ''}" for m in messages)


def _seed(base: int | None, *parts: Any) -> int | None:
    """A request's base seed from the config seed and what is judged: per-sample seeds then follow
    (``backends.base.sample_seed``), the same on every run, batch and worker."""
    if base is None:
        return None
    digest = hashlib.blake2b(":".join(map(str, (base, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _template_hash(name: str) -> str:
    return hashlib.blake2b((PROMPTS / name).read_bytes(), digest_size=8).hexdigest()


def _record(samples: list[Sample], parse: Any) -> dict:
    return {"texts": [s.text for s in samples],
            "parsed": [None if s.finish_reason == "error" else parse(s.text) for s in samples],
            "errors": sum(s.finish_reason == "error" for s in samples), "cached": [s.cached for s in samples]}


@register("judge")
class Judge(Scorer):
    """LLM-as-a-judge scores: Self-Rewarding's 5-point rubric or pairwise win rates with position swap."""

    Config = JudgeConfig
    resources = ("backend",)  # built once per worker, never pickled

    def build(self) -> None:
        self.backend = build_backend(self.config.backend)

    def _request(self, rid: str, text: str, *key: Any) -> Request:
        c = self.config
        sampling = c.sampling.model_copy(update={"n": c.samples, "seed": _seed(c.sampling.seed, c.mode, *key)})
        return Request(rid, messages=({"role": "user", "content": text},), sampling=sampling)

    def score(self, rows: list[dict]) -> list[dict]:
        c = self.config
        values, extras = self._rubric(rows) if c.mode == "rubric" else self._pairwise(rows)
        template = RUBRIC_TEMPLATE if c.mode == "rubric" else PAIRWISE_TEMPLATE
        settings = {"mode": c.mode, "samples": c.samples, "sampling": c.sampling.model_dump(), "template": template,
                    "template_hash": _template_hash(template), "score_rejected": c.score_rejected}
        if c.mode == "pairwise":
            settings["pairing"] = c.pairing
        prov = provenance(self.name, "judge", self.backend.model, getattr(self.backend, "revision", None), settings)
        return write_scores(rows, values, c, prov, extras)

    def _rubric(self, rows: list[dict]) -> tuple[dict, dict]:
        todo = targets(rows, self.config.score_rejected)
        requests = []
        for i, j in todo:
            row = rows[i]
            text = render(RUBRIC_TEMPLATE, instruction=conversation_text(prompt_messages(row)),
                          response=row["completions"][j]["text"])
            requests.append(self._request(f"{row['id']}#{j}", text, row["id"], j))
        results = self.backend.generate(requests) if requests else []
        values, extras = {}, {}
        for key, result in zip(todo, results):
            rec = _record(result.samples, parse_rubric_score)
            got = [p for p in rec["parsed"] if p is not None]
            values[key] = sum(got) / len(got) if got else None
            extras[key] = {"judge": {"mode": "rubric", **rec}}
        return values, extras

    def _pairwise(self, rows: list[dict]) -> tuple[dict, dict]:
        games, requests = [], []  # (row index, first, second), one per ordered comparison
        points: dict[tuple[int, int], list[float]] = {}
        extras: dict[tuple[int, int], dict] = {}
        for i, row in enumerate(rows):
            idx = [j for r, j in targets([row], self.config.score_rejected)]
            for j in idx:  # every judged completion gets a fresh record, even with no one to play
                points[(i, j)] = []
                extras[(i, j)] = {"judge": {"mode": "pairwise", "comparisons": []}}
            if self.config.pairing == "pivot":
                pairs = [p for b in idx[1:] for p in ((idx[0], b), (b, idx[0]))]
            else:
                pairs = [(a, b) for a in idx for b in idx if a != b]
            question = conversation_text(prompt_messages(row))
            for a, b in pairs:
                text = render(PAIRWISE_TEMPLATE, question=question, answer_a=row["completions"][a]["text"],
                              answer_b=row["completions"][b]["text"])
                games.append((i, a, b))
                requests.append(self._request(f"{row['id']}#{a}v{b}", text, row["id"], a, b))
        results = self.backend.generate(requests) if requests else []
        for (i, a, b), result in zip(games, results):
            rec = _record(result.samples, parse_pairwise_verdict)
            for verdict in rec["parsed"]:
                if verdict is not None:
                    first = {"A": 1.0, "B": 0.0, "tie": 0.5}[verdict]
                    points[(i, a)].append(first)
                    points[(i, b)].append(1.0 - first)
            # each comparison is recorded once, on the completion shown first
            extras[(i, a)]["judge"]["comparisons"].append({"vs": b, **rec})
        values = {k: sum(p) / len(p) if p else None for k, p in points.items()}
        for k, p in points.items():
            extras[k]["judge"].update(games=len(p), wins=sum(p))
        return values, extras

    def tally(self, rows: list[dict]) -> dict[str, int]:
        counts: Counter = tally_scores(rows, self.config)
        for row in rows:
            for c in row.get("completions") or []:
                if not (self.config.score_rejected or usable(c)):
                    continue  # not judged here: a record on it is another stage's
                judged = c.get("judge") or {}
                records = judged.get("comparisons", []) if judged.get("mode") == "pairwise" else [judged]
                for rec in records:
                    if not rec:
                        continue
                    counts["judge_samples"] += len(rec["texts"])
                    counts["judge_errors"] += rec["errors"]
                    counts["judge_unparsable"] += sum(p is None for p in rec["parsed"]) - rec["errors"]
                    counts["judge_cache_hits"] += sum(rec["cached"])
                    counts["judge_cache_misses"] += len(rec["cached"]) - sum(rec["cached"])
        return {k: v for k, v in counts.items() if v}
