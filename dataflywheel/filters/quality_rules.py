"""Pure statistics behind the heuristic quality stages (docs/sources.md#heuristic-quality-filters); no stage, no config.

Each function measures one family's statistics on a text and returns them as plain numbers, so
the stages in ``quality.py`` can store them in ``row["scores"]`` and decide later. The
definitions follow datatrove 0.10.1 ``pipeline/filters/`` (which follows Rae et al. 2021 for
Gopher, Raffel et al. 2020 for C4, Penedo et al. 2024 for FineWeb), with two stated deviations:

- words come from a regex tokenizer (letter/digit runs, inner apostrophes kept, numbers and URLs
  whole; every other non-space character its own token, ``...`` one token) instead of spaCy, so
  nothing needs installing; a "symbol token" is one without a letter or digit;
- C4 counts sentences with a regex (terminal punctuation followed by space and a capital, digit
  or quote) instead of a punkt/spaCy sentence splitter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

# Close to spaCy's English tokenizer (what datatrove uses): URLs and numbers such as 1,000 or 2:55
# stay one token, inner apostrophes stay, every other non-space, non-alphanumeric character
# (and "..." as a whole) is a symbol token.
_TOKEN = re.compile(r"(https?://\S+|\d+(?:[.,:/-]\d+)+|[^\W_]+(?:['’][^\W_]+)*)|(\.{2,}|[^\w\s]|_)")

# A sentence boundary inside a line: terminal mark, optional closing quote/bracket, space, then
# something that starts a sentence. Cheaper than punkt; over-counts after "Mr." and "e.g. A".
_SENTENCE_BREAK = re.compile(r"[.!?…]['\"”’)\]]*\s+(?=[A-Z0-9\"“‘'(\[])")

# Sentence-final marks of the major scripts: a subset of the Unicode Sentence_Terminal set that
# datatrove utils/text.py: TERMINAL_PUNCTUATION lists (used by its FineWeb filter).
TERMINAL_PUNCTUATION = tuple(".!?։؟۔܀܁܂।॥။።፧፨᙮។៕᠃᠉‼‽⁇⁈⁉。！？．｡")

# datatrove gopher_quality_filter.py: STOP_WORDS (Rae et al. 2021, Table A1: "at least two of").
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")

# datatrove c4_filters.py: CITATION_REGEX, END_PUNCTUATION, POLICY_SUBSTRINGS (from TFDS c4_utils).
C4_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def tokenize(text: str) -> tuple[list[str], int]:
    """All tokens (words and symbols) in order, and how many of them hold a letter or digit."""
    tokens, n_words = [], 0
    for word, symbol in _TOKEN.findall(text):
        tokens.append(word or symbol)
        n_words += bool(word)
    return tokens, n_words


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def gopher_quality_stats(text: str, stop_words: Iterable[str] = GOPHER_STOP_WORDS) -> dict[str, float]:
    """Rae et al. 2021 quality statistics, as datatrove gopher_quality_filter.py measures them.

    Word count and mean length use word tokens only; the symbol and alphabetic ratios divide by
    all tokens; stop words are counted once each, case-sensitively (as datatrove does).
    """
    tokens, _ = tokenize(text)
    words = [t for t in tokens if t[0].isalnum()]
    lines = text.splitlines()
    return {
        "gopher_n_words": len(words),
        "gopher_mean_word_len": _ratio(sum(map(len, words)), len(words)),
        "gopher_hash_word_ratio": _ratio(text.count("#"), len(tokens)),
        "gopher_ellipsis_word_ratio": _ratio(text.count("...") + text.count("…"), len(tokens)),
        "gopher_bullet_line_frac": _ratio(sum(ln.lstrip().startswith(("•", "-")) for ln in lines), len(lines)),
        "gopher_ellipsis_line_frac": _ratio(sum(ln.rstrip().endswith(("...", "…")) for ln in lines), len(lines)),
        "gopher_alpha_word_frac": _ratio(sum(any(c.isalpha() for c in t) for t in tokens), len(tokens)),
        "gopher_n_stop_words": len(set(stop_words).intersection(tokens)),
    }


def duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their total characters): datatrove find_duplicates."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


def ngram_classes(tokens: list[str], max_n: int) -> dict[int, np.ndarray]:
    """For n = 2..max_n, one dense int per n-gram start position, equal iff the n-grams are equal.

    Built by refinement: the class of an n-gram is the class of (its (n-1)-gram, its last token),
    one numpy sort per n and no string joins, so repeated n-grams are found exactly (no hash
    collisions) in vectorized time.
    """
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in tokens), dtype=np.int64, count=len(tokens))
    classes, prev = {}, ids
    for n in range(2, max_n + 1):
        if len(ids) < n:
            break
        pair = prev[:-1] * (len(vocab) + 1) + ids[n - 1:]
        prev = np.unique(pair, return_inverse=True)[1].astype(np.int64)
        classes[n] = prev
    return classes


def _span_chars(lens_cumsum: np.ndarray, n: int) -> np.ndarray:
    """Characters of the tokens in each n-token window (no separators)."""
    return lens_cumsum[n:] - lens_cumsum[:-n]


def top_ngram_chars(cls: np.ndarray, span_chars: np.ndarray, n: int) -> int:
    """Characters of the most frequent n-gram (joined by spaces) times its count.

    Ties go to the n-gram seen first, as ``Counter.most_common`` in datatrove find_top_duplicate.
    """
    counts = np.bincount(cls)
    first = np.full(len(counts), len(cls), dtype=np.int64)
    np.minimum.at(first, cls, np.arange(len(cls)))
    top = counts.max()
    pos = first[counts == top].min()
    return int((span_chars[pos] + n - 1) * top)


def dup_ngram_chars(cls: np.ndarray, span_chars: np.ndarray, n: int) -> int:
    """Characters of n-grams that repeat an earlier one, windows not overlapping a counted repeat.

    The greedy left-to-right scan of datatrove find_all_duplicate (after a match it jumps n tokens,
    and jumped-over n-grams are not remembered), run on integer classes; skipped entirely when no
    n-gram occurs twice, the usual case for clean text.
    """
    if len(cls) == 0 or np.bincount(cls).max() < 2:
        return 0
    seen: set[int] = set()
    chars, i, end = 0, 0, len(cls)
    classes = cls.tolist()
    while i < end:
        c = classes[i]
        if c in seen:
            chars += int(span_chars[i])
            i += n
        else:
            seen.add(c)
            i += 1
    return chars


def gopher_repetition_stats(text: str, top_ns: Iterable[int] = (2, 3, 4), dup_ns: Iterable[int] = range(5, 11)) -> dict[str, float]:
    """Rae et al. 2021 repetition statistics, as datatrove gopher_repetition_filter.py measures them.

    Paragraphs split on 2+ newlines, lines on 1+; character fractions divide by ``len(text)``.
    """
    top_ns, dup_ns = tuple(top_ns), tuple(dup_ns)
    n_chars = len(text)
    paragraphs = re.split(r"\n{2,}", text.strip())
    lines = re.split(r"\n+", text)
    para_dups, para_chars = duplicates(paragraphs)
    line_dups, line_chars = duplicates(lines)
    stats = {
        "gopher_dup_para_frac": _ratio(para_dups, len(paragraphs)),
        "gopher_dup_para_char_frac": _ratio(para_chars, n_chars),
        "gopher_dup_line_frac": _ratio(line_dups, len(lines)),
        "gopher_dup_line_char_frac": _ratio(line_chars, n_chars),
    }
    tokens, _ = tokenize(text)
    classes = ngram_classes(tokens, max((*top_ns, *dup_ns), default=1))
    cumsum = np.concatenate(([0], np.cumsum([len(t) for t in tokens], dtype=np.int64)))
    for n in top_ns:
        chars = top_ngram_chars(classes[n], _span_chars(cumsum, n), n) if n in classes else 0
        stats[f"gopher_top_{n}gram_frac"] = _ratio(chars, n_chars)
    for n in dup_ns:
        chars = dup_ngram_chars(classes[n], _span_chars(cumsum, n), n) if n in classes else 0
        stats[f"gopher_dup_{n}gram_frac"] = _ratio(chars, n_chars)
    return stats


def count_sentences(line: str) -> int:
    return len(_SENTENCE_BREAK.findall(line)) + 1 if line.strip() else 0


def c4_clean(text: str, *, remove_citations: bool = True, filter_no_terminal_punct: bool = True,
             min_words_per_line: int = 3, max_word_length: int = 1000, filter_javascript: bool = True,
             filter_policy: bool = True) -> tuple[str, dict[str, float]]:
    """C4's line rules (Raffel et al. 2020; datatrove c4_filters.py C4QualityFilter, in its order).

    Returns the cleaned text (kept lines, stripped, joined by newlines) and the counts: lines seen
    (non-blank), removed per rule, sentences left, and whether "lorem ipsum" or "{" occurs in a
    line that survives the punctuation and word-count rules (the lines datatrove checks them on).
    ``-1`` disables the numeric rules, as in datatrove.
    """
    removed = dict.fromkeys(("long_word", "no_terminal_punct", "too_few_words", "javascript", "policy"), 0)
    kept: list[str] = []
    n_lines = chars_in = sentences = lorem = curly = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue  # blank lines are paragraph breaks, not content: not counted as removed
        n_lines += 1
        chars_in += len(line)
        words = line.split()
        if max_word_length != -1 and any(len(w) > max_word_length for w in words):
            removed["long_word"] += 1
            continue
        if remove_citations:
            line = C4_CITATION.sub("", line)
        if filter_no_terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
            removed["no_terminal_punct"] += 1
            continue
        if len(words) < min_words_per_line:
            removed["too_few_words"] += 1
            continue
        lower = line.lower()
        lorem |= "lorem ipsum" in lower
        if filter_javascript and "javascript" in lower:
            removed["javascript"] += 1
            continue
        curly |= "{" in line
        if filter_policy and any(p in lower for p in C4_POLICY_PHRASES):
            removed["policy"] += 1
            continue
        sentences += count_sentences(line)
        kept.append(line)
    n_removed = sum(removed.values())
    cleaned = "\n".join(kept).strip()
    stats: dict[str, float] = {
        "c4_n_lines": n_lines,
        "c4_lines_removed": n_removed,
        "c4_removed_line_frac": _ratio(n_removed, n_lines),
        "c4_removed_char_frac": _ratio(chars_in - sum(map(len, kept)), chars_in),
        **{f"c4_lines_{k}": v for k, v in removed.items()},
        "c4_n_sentences": sentences,
        "c4_lorem_ipsum": int(lorem),
        "c4_curly_bracket": int(curly),
    }
    return cleaned, stats


def fineweb_stats(text: str, stop_chars: tuple[str, ...] = TERMINAL_PUNCTUATION, short_line_length: int = 30) -> dict[str, float]:
    """Penedo et al. 2024 statistics, as datatrove fineweb_quality_filter.py measures them.

    Lines are the non-blank ``\\n``-separated lines, taken as they are (not stripped); the
    duplicate-character share divides by the text without newlines; the list ratio is newlines
    per token.
    """
    lines = [ln for ln in text.split("\n") if ln.strip()]
    tokens, _ = tokenize(text)
    return {
        "fineweb_n_lines": len(lines),
        "fineweb_line_punct_ratio": _ratio(sum(ln.endswith(stop_chars) for ln in lines), len(lines)),
        "fineweb_short_line_ratio": _ratio(sum(len(ln) <= short_line_length for ln in lines), len(lines)),
        "fineweb_char_dup_ratio": _ratio(duplicates(lines)[1], len(text) - text.count("\n")),
        "fineweb_list_ratio": _ratio(text.count("\n"), len(tokens)),
    }


def drop_lines(text: str, pattern: re.Pattern, max_words: int | None) -> tuple[str, dict[str, int]]:
    """Remove the lines ``pattern`` finds something in (only lines of <= max_words words, if set).

    Blank lines stay, so paragraphs stay paragraphs; runs of 3+ newlines left behind by removed
    lines collapse to one blank line.
    """
    kept, n_lines, n_removed, chars_removed = [], 0, 0, 0
    for line in text.split("\n"):
        if line.strip():
            n_lines += 1
            if pattern.search(line) and (max_words is None or len(line.split()) <= max_words):
                n_removed += 1
                chars_removed += len(line)
                continue
        kept.append(line)
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip() if n_removed else text
    return cleaned, {"n_lines": n_lines, "lines_removed": n_removed, "chars_removed": chars_removed}
