"""Heuristic quality stages (docs/sources.md#heuristic-quality-filters): Gopher quality and repetition, C4, FineWeb, line filter.

Each stage is a Scorer that writes every statistic it measures into ``row["scores"]`` (prefixes
``gopher_``, ``c4_``, ``fineweb_``, ``<name>_``) and a Filter whose ``keep`` only compares stored
scores with the thresholds of its config, so a later run can re-apply other thresholds to stored
rows without recomputing anything. A threshold set to None turns its rule off. Statistics are
defined in ``quality_rules.py``.

Defaults are datatrove 0.10.1's (``pipeline/filters/<file>.py``), which take them from Rae et al.
2021 (Gopher, Table A1), Raffel et al. 2020 (C4) and Penedo et al. 2024 (FineWeb). The C4 and line
filter stages rewrite ``text`` (removed lines are counted in scores); rows without a ``text``
field (conversations) are scored on their joined contents and left unchanged.

Checked against datatrove 0.10.1 itself (spaCy tokenizer) on the 127 article bodies of
scrapinghub's article-extraction-benchmark: keep/drop agree on 504 of 508 decisions (the four
differences: tokenizer and sentence-splitter edge cases, one of them a Japanese text).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from ..errors import UserError
from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from . import quality_rules as rules
from .text import row_text, with_scores


def _first_failure(scores: dict, checks: list[tuple[str, str, float | None, str]]) -> tuple[bool, str | None]:
    """checks: (score key, "min" | "max", threshold or None, reason); the first failed check wins."""
    for key, kind, limit, reason in checks:
        if limit is None:
            continue
        value = scores[key]
        if (kind == "min" and value < limit) or (kind == "max" and value > limit):
            return False, reason
    return True, None


class GopherQualityConfig(StageConfig):
    # All defaults: datatrove gopher_quality_filter.py: GopherQualityFilter.__init__ (Rae et al. 2021).
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1  # applies to "#" and to "..."/"…" separately
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8  # datatrove's max_non_alpha_words_ratio (its TODO renames it)
    min_stop_words: int | None = 2
    stop_words: list[str] = list(rules.GOPHER_STOP_WORDS)  # scoring parameter: changes gopher_n_stop_words


@register("gopher_quality")
class GopherQuality(Scorer, Filter):
    """Gopher quality rules: word count, word length, symbols, bullets, ellipses, letters, stop words."""

    Config = GopherQualityConfig

    def score(self, rows: list[dict]) -> list[dict]:
        return [with_scores(r, rules.gopher_quality_stats(row_text(r), self.config.stop_words)) for r in rows]

    def keep(self, row: dict) -> tuple[bool, str | None]:
        c = self.config
        return _first_failure(row["scores"], [
            ("gopher_n_words", "min", c.min_doc_words, "gopher_short_doc"),
            ("gopher_n_words", "max", c.max_doc_words, "gopher_long_doc"),
            ("gopher_mean_word_len", "min", c.min_avg_word_length, "gopher_short_words"),
            ("gopher_mean_word_len", "max", c.max_avg_word_length, "gopher_long_words"),
            ("gopher_hash_word_ratio", "max", c.max_symbol_word_ratio, "gopher_too_many_hashes"),
            ("gopher_ellipsis_word_ratio", "max", c.max_symbol_word_ratio, "gopher_too_many_ellipsis"),
            ("gopher_bullet_line_frac", "max", c.max_bullet_lines_ratio, "gopher_too_many_bullets"),
            ("gopher_ellipsis_line_frac", "max", c.max_ellipsis_lines_ratio, "gopher_too_many_end_ellipsis"),
            ("gopher_alpha_word_frac", "min", c.min_alpha_words_ratio, "gopher_below_alpha_threshold"),
            ("gopher_n_stop_words", "min", c.min_stop_words, "gopher_few_stop_words"),
        ])


# datatrove gopher_repetition_filter.py: GopherRepetitionFilter.__init__ (Rae et al. 2021, Table A1).
_TOP_NGRAMS = {2: 0.2, 3: 0.18, 4: 0.16}
_DUP_NGRAMS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class GopherRepetitionConfig(StageConfig):
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    # n -> max character fraction; the n's listed are the ones scored; a None threshold only scores.
    top_n_grams: dict[int, float | None] = Field(default_factory=lambda: dict(_TOP_NGRAMS))
    dup_n_grams: dict[int, float | None] = Field(default_factory=lambda: dict(_DUP_NGRAMS))

    @field_validator("top_n_grams", "dup_n_grams")
    @classmethod
    def _ns_from_2(cls, value: dict[int, float | None]) -> dict[int, float | None]:
        if any(n < 2 for n in value):
            raise ValueError("n-gram sizes must be >= 2")
        return value


@register("gopher_repetition")
class GopherRepetition(Scorer, Filter):
    """Gopher repetition rules: duplicated lines, paragraphs and n-grams.

    An empty text scores 0 everywhere: emptiness is for the length or gopher_quality stage to
    reject (datatrove rejects it here as "empty")."""

    Config = GopherRepetitionConfig

    def score(self, rows: list[dict]) -> list[dict]:
        c = self.config
        return [with_scores(r, rules.gopher_repetition_stats(row_text(r), c.top_n_grams, c.dup_n_grams)) for r in rows]

    def keep(self, row: dict) -> tuple[bool, str | None]:
        c = self.config
        # datatrove's order: paragraphs, lines, top n-grams, duplicated n-grams.
        return _first_failure(row["scores"], [
            ("gopher_dup_para_frac", "max", c.dup_para_frac, "gopher_dup_para_frac"),
            ("gopher_dup_para_char_frac", "max", c.dup_para_char_frac, "gopher_dup_para_char_frac"),
            ("gopher_dup_line_frac", "max", c.dup_line_frac, "gopher_dup_line_frac"),
            ("gopher_dup_line_char_frac", "max", c.dup_line_char_frac, "gopher_dup_line_char_frac"),
            *((f"gopher_top_{n}gram_frac", "max", t, f"gopher_top_{n}gram") for n, t in sorted(c.top_n_grams.items())),
            *((f"gopher_dup_{n}gram_frac", "max", t, f"gopher_dup_{n}gram") for n, t in sorted(c.dup_n_grams.items())),
        ])


class C4Config(StageConfig):
    # All defaults: datatrove c4_filters.py: C4QualityFilter.__init__ (Raffel et al. 2020). -1 disables.
    # Line rules (applied while scoring, they rewrite text):
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_javascript: bool = True
    filter_policy: bool = True
    # Document rules (decided from scores):
    min_num_sentences: int = 5
    filter_lorem_ipsum: bool = True
    filter_curly_bracket: bool = True


@register("c4")
class C4(Scorer, Filter):
    """C4 rules: the line rules rewrite ``text``; the document rules decide from stored counts.

    The bad-words list of C4 is not part of this stage (a sensitive-content filter is separate).
    """

    Config = C4Config

    def score(self, rows: list[dict]) -> list[dict]:
        c = self.config
        opts = c.model_dump(include={"remove_citations", "filter_no_terminal_punct", "min_words_per_line",
                                     "max_word_length", "filter_javascript", "filter_policy"})
        out = []
        for row in rows:
            text, stats = rules.c4_clean(row_text(row), **opts)
            out.append(with_scores(row, stats, text))
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        s, c = row["scores"], self.config
        if c.filter_lorem_ipsum and s["c4_lorem_ipsum"]:
            return False, "c4_lorem_ipsum"
        if c.filter_curly_bracket and s["c4_curly_bracket"]:
            return False, "c4_curly_bracket"
        if c.min_num_sentences != -1 and s["c4_n_sentences"] < c.min_num_sentences:
            return False, "c4_too_few_sentences"
        return True, None


class FineWebQualityConfig(StageConfig):
    # All defaults: datatrove fineweb_quality_filter.py: FineWebQualityFilter.__init__ (Penedo et al. 2024).
    line_punct_thr: float | None = 0.12
    line_punct_exclude_zero: bool = False  # True: a text with no punctuated line at all passes this rule
    short_line_thr: float | None = 0.67
    short_line_length: int = 30  # scoring parameter: a line of <= this many characters is short
    char_duplicates_ratio: float | None = 0.01
    new_line_ratio: float | None = 0.3
    stop_chars: str | None = None  # scoring parameter; None: rules.TERMINAL_PUNCTUATION


@register("fineweb_quality")
class FineWebQuality(Scorer, Filter):
    """FineWeb rules: punctuated lines, short lines, duplicated-line characters, list-like newlines."""

    Config = FineWebQualityConfig

    def score(self, rows: list[dict]) -> list[dict]:
        c = self.config
        stops = tuple(c.stop_chars) if c.stop_chars else rules.TERMINAL_PUNCTUATION
        return [with_scores(r, rules.fineweb_stats(row_text(r), stops, c.short_line_length)) for r in rows]

    def keep(self, row: dict) -> tuple[bool, str | None]:
        s, c = row["scores"], self.config
        if s["fineweb_n_lines"] == 0:
            return False, "fineweb_empty"
        punct = s["fineweb_line_punct_ratio"]
        if c.line_punct_thr is not None and punct < c.line_punct_thr and not (punct == 0 and c.line_punct_exclude_zero):
            return False, "fineweb_line_punct_ratio"
        return _first_failure(s, [
            ("fineweb_short_line_ratio", "max", c.short_line_thr, "fineweb_short_line_ratio"),
            ("fineweb_char_dup_ratio", "max", c.char_duplicates_ratio, "fineweb_char_dup_ratio"),
            ("fineweb_list_ratio", "max", c.new_line_ratio, "fineweb_list_ratio"),
        ])


# Boilerplate lines seen on web pages (this project's list; the C4 policy phrases are datatrove
# c4_filters.py: POLICY_SUBSTRINGS). Case-insensitive regexes; a user list replaces them.
BOILERPLATE_PATTERNS = (
    r"\b(?:terms of (?:use|service)|privacy policy|cookie policy)\b",
    r"\b(?:uses|use of|use|accept(?: all)?) cookies\b",
    r"\ball rights reserved\b",
    r"^\s*(?:©|\(c\)|copyright\b)",
    r"\b(?:subscribe to|sign up for) (?:our|the) newsletter\b",
    r"\bfollow us on\b",
    r"\bshare (?:this|on) (?:article|story|post|facebook|twitter|x)\b",
    r"^\s*(?:click here|read more|continue reading|skip to (?:main )?content|advertisement)\b",
    r"\b(?:enable|requires?) javascript\b",
    r"^\s*(?:log ?in|sign ?in|sign up|register)\s*(?:[|/]\s*(?:log ?in|sign ?in|sign up|register)\s*)*$",
)


class LineFilterConfig(StageConfig):
    patterns: list[str] = list(BOILERPLATE_PATTERNS)  # case-insensitive regexes; a line matching any is dropped
    patterns_file: str | None = None  # one regex per line (# comments); added to ``patterns``
    max_line_words: int | None = Field(30, ge=1)  # ours: longer lines are prose that mentions a phrase, not boilerplate
    max_removed_frac: float | None = Field(None, ge=0.0, le=1.0)  # reject when more of the lines were boilerplate
    reject_empty: bool = True  # reject rows with no line left

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for p in value:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"bad regex {p!r}: {err}") from None
        return value


@register("line_filter")
class LineFilter(Scorer, Filter):
    """Drops boilerplate lines by regex (step 5 of docs/sources.md#cleaning-pipeline-order).

    Scores ``<name>_lines_removed``, ``<name>_removed_frac`` (of non-blank lines),
    ``<name>_removed_char_frac`` and ``<name>_lines_left``, where <name> is the instance name."""

    Config = LineFilterConfig

    def __init__(self, config: StageConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        patterns = list(self.config.patterns)
        if self.config.patterns_file:
            try:
                lines = Path(self.config.patterns_file).read_text(encoding="utf-8").splitlines()
            except OSError as err:
                raise UserError(f"line_filter: cannot read patterns_file {self.config.patterns_file!r}: {err.strerror}") from None
            patterns += [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
        try:
            # one alternation: a line is scanned once, not once per pattern
            self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns) or r"(?!)", re.IGNORECASE)
        except re.error as err:
            raise UserError(f"line_filter: bad pattern: {err}") from None

    def score(self, rows: list[dict]) -> list[dict]:
        out, prefix = [], self.name
        for row in rows:
            source = row_text(row)
            text, n = rules.drop_lines(source, self.pattern, self.config.max_line_words)
            stats = {
                f"{prefix}_lines_removed": n["lines_removed"],
                f"{prefix}_removed_frac": n["lines_removed"] / n["n_lines"] if n["n_lines"] else 0.0,
                f"{prefix}_removed_char_frac": n["chars_removed"] / len(source) if source else 0.0,
                f"{prefix}_lines_left": n["n_lines"] - n["lines_removed"],
            }
            out.append(with_scores(row, stats, text))
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        s, c, prefix = row["scores"], self.config, self.name
        if c.reject_empty and s[f"{prefix}_lines_left"] == 0:
            return False, f"{prefix}_empty"
        if c.max_removed_frac is not None and s[f"{prefix}_removed_frac"] > c.max_removed_frac:
            return False, f"{prefix}_boilerplate"
        return True, None
