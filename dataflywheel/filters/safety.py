"""Sensitive-content filter (the last step of docs/sources.md#cleaning-pipeline-order): keyword and regex lists from files.

Scores first (docs/concepts.md#stages-score-then-decide): ``sensitive_hits`` (all lists),
``sensitive_<list>`` per list (the file's stem) and ``sensitive_ratio`` (hits per whitespace word);
then keeps a row when ``sensitive_hits <= max_hits``, or, when ``max_hit_ratio`` is set, when
``sensitive_ratio <= max_hit_ratio`` instead.

Keywords: one word or phrase per line, matched as whole words, case-insensitively (casefold, so
``STRASSE`` matches ``straße``), after NFKC normalization, with any run of whitespace between the
words of a phrase. All keyword lists go into one Aho-Corasick automaton, so a document is scanned
once whatever the list sizes; a match counts when it is not glued to a word character on a side
where the entry itself starts or ends with one, and overlapping matches count once (leftmost,
longest). Regexes: one Python pattern per line, matched case-insensitively on the NFKC text; the
patterns of one file are compiled into one alternation, scanned once per document.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import ahocorasick
from pydantic import Field

from ..errors import UserError
from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from .text import row_text, with_scores
from .url import list_files, read_list

_SPACE = re.compile(r"\s+")
_NUMBERED_BACKREF = re.compile(r"(?<!\\)(?:\\\\)*\\[1-9]")


def normalize_text(text: str) -> str:
    """NFKC, casefolded, whitespace runs as one space: the keyword haystack and entry form."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold())


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def keyword_automaton(lists: list[list[str]]) -> ahocorasick.Automaton | None:
    """One automaton over the phrases of all lists; each phrase knows which lists hold it."""
    owners: dict[str, list[int]] = {}
    for i, phrases in enumerate(lists):
        for phrase in phrases:
            key = normalize_text(phrase).strip()
            if key and i not in owners.setdefault(key, []):
                owners[key].append(i)
    if not owners:
        return None
    auto = ahocorasick.Automaton()
    for key, idx in owners.items():
        auto.add_word(key, (len(key), tuple(idx), _is_word(key[0]), _is_word(key[-1])))
    auto.make_automaton()
    return auto


def keyword_counts(auto: ahocorasick.Automaton | None, text: str, n_lists: int) -> tuple[int, list[int]]:
    """Whole-word, non-overlapping keyword matches in ``text``: in all, and per list (a phrase on
    two lists counts once in all and once for each list)."""
    counts = [0] * n_lists
    if auto is None or not text:
        return 0, counts
    hay = normalize_text(text)
    spans = []
    for end, (length, owners, word_start, word_end) in auto.iter(hay):
        start = end - length + 1
        if word_start and start > 0 and _is_word(hay[start - 1]):
            continue
        if word_end and end + 1 < len(hay) and _is_word(hay[end + 1]):
            continue
        spans.append((start, -end, owners))
    last, total = -1, 0
    for start, neg_end, owners in sorted(spans):  # leftmost first, then longest
        if start <= last:
            continue
        last, total = -neg_end, total + 1
        for i in owners:
            counts[i] += 1
    return total, counts


def compile_regex_list(path: str | Path) -> re.Pattern | None:
    """A regex file's patterns as one case-insensitive alternation; UserError names a bad line."""
    patterns = read_list(path)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"{path}: bad regex {pattern!r}: {err}") from None
        if _NUMBERED_BACKREF.search(pattern):
            raise UserError(f"{path}: regex {pattern!r} uses a numbered back-reference; use (?P<name>...) and (?P=name)")
    if not patterns:
        return None
    try:
        return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    except re.error as err:  # e.g. a group name used on two lines, or a global (?i) flag mid-pattern
        raise UserError(f"{path}: its patterns do not combine into one alternation: {err}") from None


def regex_count(pattern: re.Pattern | None, text: str) -> int:
    if pattern is None:
        return 0
    return sum(1 for m in pattern.finditer(unicodedata.normalize("NFKC", text)) if m.end() > m.start())


def score_names(paths: list[str]) -> list[str]:
    """``sensitive_<stem>`` per list file (``sensitive_words.txt`` -> ``sensitive_words``), made unique."""
    names: list[str] = []
    for path in paths:
        stem = re.sub(r"\W+", "_", Path(path).stem).strip("_").lower().removeprefix("sensitive_")
        name = f"sensitive_{stem}"
        while name in names or name in ("sensitive_hits", "sensitive_ratio"):
            name += "_"
        names.append(name)
    return names


class SensitiveContentConfig(StageConfig):
    # None: the project's small illustrative lists in dataflywheel/data/blocklists (see its README.md)
    keyword_files: list[str] | None = None
    regex_files: list[str] | None = None
    max_hits: int = Field(0, ge=0)  # C4's bad-words rule drops a page on any listed word (docs/sources.md#heuristic-quality-filters)
    max_hit_ratio: float | None = Field(None, ge=0.0, le=1.0)  # when set, decide by hits per word instead
    batch_size: int = 256


@register("sensitive_content")
class SensitiveContent(Scorer, Filter):
    """Counts keyword and regex hits in the row's text (module doc) and keeps rows under the limit."""

    Config = SensitiveContentConfig
    resources = ("keywords", "regexes", "names")  # the lists, read on each worker

    def build(self) -> None:
        cfg = self.config
        keyword_files = list_files(cfg.keyword_files, "sensitive_words.txt")
        regex_files = list_files(cfg.regex_files, "sensitive_regex.txt")
        self.keywords = keyword_automaton([read_list(p) for p in keyword_files])
        self.regexes = [compile_regex_list(p) for p in regex_files]
        self.names = score_names(keyword_files + regex_files)

    def score_text(self, text: str) -> dict[str, float]:
        hits, counts = keyword_counts(self.keywords, text, len(self.names) - len(self.regexes))
        regex_counts = [regex_count(p, text) for p in self.regexes]
        hits, counts = hits + sum(regex_counts), counts + regex_counts
        return {
            **{name: float(n) for name, n in zip(self.names, counts)},
            "sensitive_hits": float(hits),
            "sensitive_ratio": round(hits / max(1, len(text.split())), 6),
        }

    def score(self, rows: list[dict]) -> list[dict]:
        return [with_scores(row, self.score_text(row_text(row))) for row in rows]

    def keep(self, row: dict) -> tuple[bool, str | None]:
        s = row["scores"]
        if self.config.max_hit_ratio is not None:
            ok = s["sensitive_ratio"] <= self.config.max_hit_ratio
        else:
            ok = s["sensitive_hits"] <= self.config.max_hits
        return (True, None) if ok else (False, "sensitive_content")
