"""Benchmark decontamination (docs/sources.md#decontamination): drop rows sharing a long word n-gram with an eval set.

Training on a benchmark's questions or answers inflates its scores, so rows that repeat an
evaluation text are removed before training. The method is datatrove's
``pipeline/decont/n_grams.py`` (NGramsDecontIndexer / NGramsDecontFilter): hash every word n-gram
of the eval texts into one index, then look up every n-gram of each row.

Normalization (applied to eval texts and rows alike; switches default to datatrove's
``utils/text.py:TextNormConfig``): NFKC; ``lowercase``: ``str.lower``; ``strip_diacritics``: NFD,
combining marks (category Mn) dropped, NFC again; ``strip_punctuation``: every punctuation (P*)
and symbol (S*) character and every invisible control/format character (Cc, Cf, e.g. zero-width
spaces) is deleted, not replaced by a space, as datatrove does ("don't" -> "dont", "U.S." ->
"us"); ``digits_to_zero``: each run of decimal digits becomes "0" (datatrove's norm_numbers).
Tokens are the whitespace-separated words of the result (datatrove uses nltk's word_tokenize,
which after punctuation removal mostly splits on whitespace too, but also splits "cannot").

An n-gram is its ``n`` tokens joined by one space, hashed with xxh64 (64 bits; datatrove's
xxhash64). The text of an eval row is the contents of its ``fields`` in order (messages: every
content), concatenated, so n-grams spanning question and answer are indexed too (datatrove's
``find_overlap_ngrams``; we also index question-only n-grams, its ``find_query_ngrams``, since a
copied question is contamination too). An eval text shorter than ``n`` words yields no n-gram,
as in datatrove (``nltk.ngrams`` of a short list is empty); such rows are counted in
``index_stats``. The score ``contam_ngrams`` is the number of distinct n-grams of the row found in
the index; ``meta.contaminated_by`` names the eval set of the row's first matching n-gram and
``meta.contaminated_ngram`` holds that n-gram (normalized), as datatrove records them.

Rows are checked on a document's text, a conversation's message contents, or a preference row's
prompt, chosen and rejected messages; ``fields`` and ``roles`` narrow that (``roles: [user]``
checks prompts only). ``setup()`` reads the eval sets once per process into sorted numpy arrays
(8 bytes per n-gram plus its set number), looked up once per batch.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
import unicodedata
from functools import cache
from itertools import accumulate
from typing import Literal

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import UserError
from ..io import DeadLetter, read
from ..models.cache import shared
from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from .text import with_scores

log = logging.getLogger(__name__)
_DIGITS = re.compile(r"\d+")


class TextNorm(BaseModel):
    """Defaults: datatrove utils/text.py TextNormConfig (lowercase, remove_punctuation,
    norm_unicode_diacritics, norm_numbers all True)."""

    model_config = ConfigDict(extra="forbid")

    lowercase: bool = True
    strip_punctuation: bool = True
    strip_diacritics: bool = True
    digits_to_zero: bool = True


class EvalSet(BaseModel):
    """One evaluation set; a plain string in a config is its ``path``."""

    model_config = ConfigDict(extra="forbid")

    path: str  # file, folder or glob that dataflywheel.io.read accepts (JSONL, Parquet, HF folder)
    name: str | None = None  # in meta.contaminated_by; default: the file name without its extension(s)
    fields: list[str] = []  # e.g. ["question", "answer"]; empty: text, messages, or prompt/chosen/rejected
    format: Literal["auto", "jsonl", "parquet", "hf"] = "auto"

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [p for p in self.path.rstrip("/").split("/") if p and not glob.has_magic(p)]
        base = parts[-1] if parts else self.path  # a glob is named by its folder
        for compression in (".gz", ".zst"):
            base = base.removesuffix(compression)
        return os.path.splitext(base)[0] or base


class DecontamConfig(StageConfig):
    eval_sets: list[EvalSet] = Field(min_length=1)
    # 13 words: GPT-3 (Brown et al. 2020, App. C) and NeMo Curator TaskDecontamination max_ngram_size;
    # datatrove's NGramsDecontConfig uses 12.
    n: int = Field(13, ge=1)
    min_matches: int = Field(1, ge=1)  # datatrove rejects on the first matching n-gram
    normalization: TextNorm = TextNorm()
    fields: list[str] = []  # row fields checked; empty: text, messages, or prompt/chosen/rejected
    roles: list[str] = []  # message roles checked (["user"]: prompts, ["assistant"]: answers); empty: all

    @field_validator("eval_sets", mode="before")
    @classmethod
    def _paths_as_sets(cls, value: object) -> object:
        if isinstance(value, str | dict):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


@cache
def _deletions(punctuation: bool, marks: bool) -> dict[int, None]:
    """str.translate table deleting punctuation, symbols and invisible control/format characters
    (``punctuation``) and combining marks, category Mn (``marks``)."""
    table: dict[int, None] = {}
    for code in range(sys.maxunicode + 1):
        cat = unicodedata.category(chr(code))
        if punctuation and (cat[0] in "PS" or (cat in ("Cc", "Cf") and not chr(code).isspace())):
            table[code] = None
        elif marks and cat == "Mn":
            table[code] = None
    return table


def normalize(text: str, norm: TextNorm) -> str:
    """The text as it is compared (see the module docstring for each step)."""
    ascii_only = text.isascii()  # ASCII is already NFKC/NFD and has no combining marks
    if not ascii_only:
        text = unicodedata.normalize("NFKC", text)
    if norm.lowercase:
        text = text.lower()
    marks = norm.strip_diacritics and not ascii_only
    if marks:
        text = unicodedata.normalize("NFD", text)
    if norm.strip_punctuation or marks:
        text = text.translate(_deletions(norm.strip_punctuation, marks))
    if marks:
        text = unicodedata.normalize("NFC", text)
    if norm.digits_to_zero:
        text = _DIGITS.sub("0", text)
    return text


def tokens(text: str, norm: TextNorm) -> list[str]:
    """The words of ``text`` after normalization."""
    return normalize(text, norm).split()


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """xxh64 of each n-gram of ``words`` (its words joined by one space); empty when fewer than ``n`` words."""
    count = len(words) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    # Encode the joined words once and hash byte slices of it: cheaper than joining n words per position.
    joined = " ".join(words)
    data = joined.encode("utf-8")
    lengths = map(len, words) if len(data) == len(joined) else (len(w.encode("utf-8")) for w in words)
    starts = list(accumulate((size + 1 for size in lengths), initial=0))  # byte offset of each word, and the end
    grams = [data[a : b - 1] for a, b in zip(starts, starts[n:])]
    return np.fromiter(map(xxhash.xxh64_intdigest, grams), dtype=np.uint64, count=count)


def _contents(value: object, roles: list[str]) -> list[str]:
    """Texts inside a field value: a string, a number, a list of strings or of {role, content} messages."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, int | float):
        return [str(value)]
    if isinstance(value, dict):
        if "content" not in value or (roles and value.get("role") not in roles):
            return []
        return _contents(value["content"], [])
    if isinstance(value, list | tuple):
        return [text for item in value for text in _contents(item, roles)]
    return []


def row_fields(row: dict) -> list[str]:
    """Default fields: a document's text, a conversation's messages, a preference row's three parts."""
    if "text" in row:
        return ["text"]
    if "messages" in row:
        return ["messages"]
    return ["prompt", "chosen", "rejected"]


def field_text(row: dict, fields: list[str], roles: list[str]) -> str:
    """The checked text of a row: the contents of ``fields`` in order, joined by newlines."""
    return "\n".join(text for name in fields or row_fields(row) for text in _contents(row.get(name), roles))


class NgramIndex:
    """Sorted unique n-gram hashes and, for each, the eval set (index into ``names``) that holds it first."""

    def __init__(self, keys: np.ndarray, sources: np.ndarray, names: list[str], stats: dict[str, dict[str, int]]):
        self.keys, self.sources, self.names, self.stats = keys, sources, names, stats

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Positions in ``keys`` of each hash, -1 where the hash is not indexed."""
        if not len(hashes):
            return np.empty(0, dtype=np.int64)
        # Sorted needles: numpy's binary search starts from the previous hit, ~7x faster than unsorted.
        order = np.argsort(hashes, kind="stable")
        found = np.searchsorted(self.keys, hashes[order])
        found[found == len(self.keys)] = 0
        pos = np.empty(len(hashes), dtype=np.int64)
        pos[order] = np.where(self.keys[found] == hashes[order], found, -1)
        return pos


def _read_set(spec: EvalSet) -> list[dict]:
    rows = []
    try:
        for item in read(spec.path, fmt=spec.format):
            if isinstance(item, DeadLetter):
                raise UserError(f"decontaminate: eval set {spec.label!r} has an unreadable record: {item}")
            rows.append(item)
    except UserError as err:
        msg = str(err)
        raise UserError(msg if msg.startswith("decontaminate:") else f"decontaminate: eval set {spec.label!r}: {msg}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"decontaminate: eval set {spec.label!r}: cannot read {spec.path}: {err}") from None
    return rows


def build_index(sets: list[EvalSet], n: int, norm: TextNorm) -> NgramIndex:
    """Read every eval set and hash its n-grams; UserError when a set is unreadable or yields none."""
    all_keys, all_sources, names, stats = [], [], [], {}
    for i, spec in enumerate(sets):
        rows = _read_set(spec)
        found, short = [], 0
        for row in rows:
            row_hashes = ngram_hashes(tokens(field_text(row, spec.fields, []), norm), n)
            short += not len(row_hashes)
            found.append(row_hashes)
        keys = np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.uint64)
        name = spec.label if spec.label not in names else f"{spec.label}#{i}"
        if not len(keys):
            raise UserError(
                f"decontaminate: eval set {name!r} ({spec.path}) gives no {n}-word n-gram from {len(rows)} rows "
                f"(fields {spec.fields or 'text/messages'}): check its fields or lower n"
            )
        names.append(name)
        stats[name] = {"rows": len(rows), "short_rows": short, "ngrams": int(len(keys))}
        log.info("decontaminate: %s: %d rows, %d shorter than %d words, %d n-grams", name, len(rows), short, n, len(keys))
        all_keys.append(keys)
        all_sources.append(np.full(len(keys), i, dtype=np.int32))
    keys = np.concatenate(all_keys)
    # return_index gives first occurrences: an n-gram in several sets belongs to the first listed.
    keys, first = np.unique(keys, return_index=True)
    return NgramIndex(keys, np.concatenate(all_sources)[first], names, stats)


def _index_key(config: DecontamConfig) -> str:
    """Cache key: the settings plus the eval files' sizes and mtimes, so an edited file is re-read."""
    stamps = []
    for spec in config.eval_sets:
        try:
            st = os.stat(spec.path)
            stamps.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append(None)  # a glob or a missing path: build_index reports what is wrong
    sets = [s.model_dump() for s in config.eval_sets]
    return f"decontam:{config.n}:{config.normalization.model_dump()}:{sets}:{stamps}"


@register("decontaminate")
class Decontaminate(Scorer, Filter):
    """Scores ``contam_ngrams``; rejects rows with at least ``min_matches`` eval n-grams as "contaminated"."""

    Config = DecontamConfig
    resources = ("index",)

    def build(self) -> None:
        c = self.config
        # One index per process, shared by every DoFn instance of the stage (models.cache.shared).
        self.index = shared(_index_key(c), lambda: build_index(c.eval_sets, c.n, c.normalization))

    @property
    def index_stats(self) -> dict[str, dict[str, int]]:
        return self.index.stats

    def score(self, rows: list[dict]) -> list[dict]:
        c = self.config
        if not rows:
            return []
        words = [tokens(field_text(row, c.fields, c.roles), c.normalization) for row in rows]
        per_row = [ngram_hashes(w, c.n) for w in words]
        bounds = np.cumsum([0] + [len(h) for h in per_row])
        pos = self.index.lookup(np.concatenate(per_row))  # one lookup per batch
        hit_rows = set((np.searchsorted(bounds, np.flatnonzero(pos >= 0), side="right") - 1).tolist())
        out = []
        for i, row in enumerate(rows):
            if i not in hit_rows:
                out.append(with_scores(row, {"contam_ngrams": 0}))
                continue
            mine = pos[bounds[i] : bounds[i + 1]]
            hits = np.flatnonzero(mine >= 0)
            first = int(hits[0])
            new = with_scores(row, {"contam_ngrams": int(len(np.unique(mine[hits])))})
            new["meta"] = {**(row.get("meta") or {}),
                           "contaminated_by": self.index.names[self.index.sources[mine[first]]],
                           "contaminated_ngram": " ".join(words[i][first : first + c.n])}
            out.append(new)
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        if row["scores"]["contam_ngrams"] >= self.config.min_matches:
            return False, "contaminated"
        return True, None
