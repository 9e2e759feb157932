"""InsTag's open-set tagger (docs/sources.md#instag) as the ``instag_tag`` stage, and its reply parser.

An LLM reads each row's instruction (its user turns) with InsTag's prompt
(``synth/prompts/instag.jinja``) and answers a JSON list of ``{"tag", "explanation"}``. Every
call goes through the generation backend interface (``synth/backends``: transformers, any
OpenAI-compatible server, vLLM), so the tagger can be a local model with its own cache
(instead of InsTag's ChatGPT) and a re-run generates nothing already tagged.

Real replies are messier than the format asked for, so ``parse_tags`` tries, in order: the whole
reply as JSON; each ```-fenced block; the first JSON value found inside prose; a Python literal
(single quotes); and last the paper's fallback, a regex over the ``"tag": "..."`` fields (which
also rescues a list cut off at ``max_tokens``). A reply that yields no tag, or a failed generation,
is retried once with a different seed (and, if the first try was greedy, a temperature, since
greedy decoding would repeat the same reply whatever the seed); if the retry fails too the row
keeps no tags and ``meta.instag_tagging.error`` says why. The report counts requests, retries,
unparsable replies and rows left untagged.

Writes ``meta.instag_raw`` (the tags as the model wrote them, each once, in order),
``scores.instag_raw_count`` and ``meta.instag_tagging`` (per attempt: how it parsed, finish
reason, cache hit). ``instag_normalize`` then turns raw tags into ``meta.instag`` and
``scores.instag_count`` (complexity). With ``reject_failed`` the filter half rejects untagged rows.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from ..filters.text import with_scores
from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from ..synth.backends.base import Request, Sample, Sampling
from ..synth.backends.config import BackendConfig, build_backend
from ..synth.templates import render
from .turns import row_part

PROMPT = "instag.jinja"
# 512 new tokens: OpenDataArena's InsTag scorer setting for InsTagger (a 16-tag list with
# explanations fits); temperature 0 and seed 0 are ours: tagging should be repeatable and cached.
DEFAULT_SAMPLING = Sampling(temperature=0.0, max_tokens=512, seed=0)
RETRY_TEMPERATURE = 0.7  # ours: any non-greedy temperature gives the retry a different reply
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS, as the transformers backend
_MAX_LITERAL_CHARS = 100_000  # ast.literal_eval on longer text is not worth its cost
_MAX_DECODE_STARTS = 64  # brackets tried as the start of an embedded JSON value

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|python)?[ \t]*\n?(.*?)```", re.DOTALL)
_TAG_FIELD = re.compile(r"""["']tag["']\s*:\s*(?:"((?:[^"\\\n]|\\.)*)"|'((?:[^'\\\n]|\\.)*)')""")


@dataclass(frozen=True)
class ParsedTags:
    tags: list[str]
    how: str  # json | fenced | embedded | literal | regex | none


def _tags_of(value: Any) -> list[str]:
    """Tags of a parsed value: a list of {"tag": ...} (or of strings), one such dict, or {"tags": [...]}."""
    if isinstance(value, dict):
        value = [value] if "tag" in value else value.get("tags")
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        tag = item.get("tag") if isinstance(item, dict) else item
        if isinstance(tag, str) and tag.strip():
            out.append(" ".join(tag.split()))
    return list(dict.fromkeys(out))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _embedded(text: str) -> list[str]:
    """The first JSON list inside prose that holds tags. Lists only: in a list cut off at
    max_tokens its first complete object would decode, and the regex rescues every tag instead."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"\[", text)][:_MAX_DECODE_STARTS]
    for at in starts:
        try:
            value, _ = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            continue
        tags = _tags_of(value)
        if tags:
            return tags
    return []


def _literal(text: str) -> list[str]:
    """A Python literal list (single-quoted strings) between the first '[' and the last ']'."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start or end - start > _MAX_LITERAL_CHARS:
        return []
    try:
        return _tags_of(ast.literal_eval(text[start:end + 1]))  # literals only: never runs code
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return []


def _regex(text: str) -> list[str]:
    out = []
    for m in _TAG_FIELD.finditer(text):
        raw = m.group(1) if m.group(1) is not None else m.group(2)
        value = _json(f'"{raw}"') if m.group(1) is not None else None
        tag = value if isinstance(value, str) else raw
        if tag.strip():
            out.append(" ".join(tag.split()))
    return list(dict.fromkeys(out))


def parse_tags(text: str) -> ParsedTags:
    """The tags of a tagger reply, and which rule found them (``none``: nothing parsable)."""
    text = (text or "").strip()
    tags = _tags_of(_json(text))
    if tags:
        return ParsedTags(tags, "json")
    for block in _FENCE.findall(text):
        tags = _tags_of(_json(block.strip())) or _embedded(block) or _literal(block)
        if tags:
            return ParsedTags(tags, "fenced")
    for how, find in (("embedded", _embedded), ("literal", _literal), ("regex", _regex)):
        tags = find(text)
        if tags:
            return ParsedTags(tags, how)
    return ParsedTags([], "none")


class InsTagTagConfig(StageConfig):
    backend: BackendConfig
    sampling: Sampling = DEFAULT_SAMPLING
    retry_temperature: float = Field(RETRY_TEMPERATURE, ge=0)  # the retry's temperature when the first try was greedy
    part: Literal["instruction", "conversation"] = "instruction"  # the paper tags the user's query
    reject_failed: bool = False  # True: rows left without tags are rejected with the reason
    batch_size: int = 32  # rows per backend call

    @field_validator("sampling")
    @classmethod
    def _one_reply(cls, sampling: Sampling) -> Sampling:
        if sampling.n != 1:
            raise ValueError("instag_tag takes one reply per request: n must be 1")
        return sampling


@register("instag_tag")
class InsTagTag(Scorer, Filter):
    """Open-set tags for each row from an LLM through any generation backend (InsTag)."""

    Config = InsTagTagConfig
    resources = ("backend",)  # built once per worker, never pickled

    def build(self) -> None:
        self.backend = build_backend(self.config.backend)

    def retry_sampling(self) -> Sampling:
        """The first try's settings with another seed (and a temperature if the first was greedy)."""
        s = self.config.sampling
        update: dict[str, Any] = {"seed": None if s.seed is None else s.seed + 1}
        if s.temperature < GREEDY_BELOW:
            update["temperature"] = self.config.retry_temperature
        return s.model_copy(update=update)

    def _ask(self, rows: list[dict], sampling: Sampling, attempt: int) -> list[Sample]:
        requests = [Request(f"{row['id']}/instag/{attempt}", sampling=sampling, messages=(
            {"role": "user", "content": render(PROMPT, query=row_part(row, self.config.part))},)) for row in rows]
        return [result.samples[0] for result in self.backend.generate(requests)]

    def score(self, rows: list[dict]) -> list[dict]:
        attempts: list[list[tuple[Sample, ParsedTags]]] = [[] for _ in rows]
        todo = list(range(len(rows)))
        for attempt, sampling in enumerate((self.config.sampling, self.retry_sampling())):
            if not todo:
                break
            for i, sample in zip(todo, self._ask([rows[i] for i in todo], sampling, attempt)):
                parsed = parse_tags(sample.text) if sample.finish_reason != "error" else ParsedTags([], "error")
                attempts[i].append((sample, parsed))
            todo = [i for i in todo if not attempts[i][-1][1].tags]
        out = []
        for row, tries in zip(rows, attempts):
            sample, parsed = tries[-1]
            error = None if parsed.tags else "generation_error" if sample.finish_reason == "error" else "tag_parse_failed"
            tagging = {"model": self.backend.model, "error": error,
                       "attempts": [{"parsed_by": p.how, "finish_reason": s.finish_reason, "cached": s.cached,
                                     "tokens": s.tokens} for s, p in tries]}
            new = with_scores(row, {"instag_raw_count": len(parsed.tags)})
            new["meta"] = {**(row.get("meta") or {}), "instag_raw": parsed.tags, "instag_tagging": tagging}
            out.append(new)
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        error = (row.get("meta") or {}).get("instag_tagging", {}).get("error")
        return (False, error) if error and self.config.reject_failed else (True, None)

    def tally(self, rows: list[dict]) -> dict[str, int]:
        """Requests, retries, unparsable replies, generation errors, untagged rows, tags, cache use."""
        counts: Counter = Counter(tag_requests=0, tag_retries=0, tag_parse_failures=0, tag_failed_rows=0)
        for row in rows:
            tagging = (row.get("meta") or {}).get("instag_tagging") or {}
            tries = tagging.get("attempts") or []
            counts["tag_requests"] += len(tries)
            counts["tag_retries"] += max(0, len(tries) - 1)
            for t in tries:
                counts["tag_parse_failures"] += t["parsed_by"] == "none"
                counts["tag_generation_errors"] += t["parsed_by"] == "error"
                counts["cache_hits" if t["cached"] else "cache_misses"] += 1
                if t["parsed_by"] not in ("none", "error"):
                    counts[f"tag_parsed_{t['parsed_by']}"] += 1
            counts["tag_failed_rows"] += bool(tagging.get("error"))
            counts["raw_tags"] += len((row.get("meta") or {}).get("instag_raw") or [])
        return dict(counts)
