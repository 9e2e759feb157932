"""InsTag's tag normalization (the paper's §3.2; docs/sources.md#instag), as the ``instag_normalize`` step.

An open-set tagger returns over 100K distinct raw tags on a large pool, most of them rare spelling
or wording variants; complexity (tags per row) and diversity (tag coverage) only mean something
after they are folded together. The four steps run in the paper's order, each on the output of
the one before:

1. **Frequency filter**: raw tags (exact strings) on fewer than ``min_frequency`` rows are dropped
   (alpha = 20, the paper). The paper filters *before* lowercasing, so "Writing" and "writing" are
   counted apart here: on a small pool this step removes most tags; lower alpha there.
2. **Rule aggregation**: lowercase, every character that is not a letter or digit becomes a space,
   spaces collapse, and each word is Porter-stemmed (NLTK, as the paper). Tags with the same stems
   are one tag, named by its most frequent cleaned (unstemmed) spelling, so names stay readable.
3. **Semantic aggregation**: tag embeddings (the paper uses PhraseBERT, which is not available
   offline; we use the bundled MiniLM, ``models/embedder.py``) clustered by scikit-learn DBSCAN
   with the cosine metric; each cluster becomes its most frequent member. The paper's parameter is
   a "minimum semantic similarity" of 0.05; as a similarity of 0.05 would merge almost everything,
   we read it as DBSCAN's ``eps`` in cosine *distance*: tags merge when cos >= 0.95. The paper does
   not give ``min_samples``; we use 1, so every tag is a core point, no tag is discarded as noise,
   and a cluster is a chain of tags each within cos 0.95 of the next (single linkage). MiniLM's
   scale is not PhraseBERT's: with MiniLM "sorting numbers" / "number sorting" (cos 0.98) merge
   at eps 0.05, "math" / "mathematics" (cos 0.91) do not.
4. **Association aggregation**: the paper mines FP-Growth rules (support >= 40 rows, confidence
   >= 99%) and merges tags that always appear together into one atomic tag. We compute the
   single-antecedent rules A => B directly from pair co-occurrence counts (support = rows with
   both, confidence = rows with both / rows with A) instead of running full FP-Growth, which
   would also yield multi-antecedent rules. Tags that imply each other (a cycle of rules) become
   one tag, named by the most frequent member. Otherwise, in a row holding A, a tag B with A => B
   is absorbed: the pair counts once, under A's name, while B stays a tag of its own on rows
   without A. This removes the complexity that redundant pairs would add.

The step rewrites ``meta.instag`` (the normalized tag list) and ``scores.instag_count`` (the
paper's complexity: tags per row) and rejects nothing; its report counts the distinct tags left
after each step. Tag embeddings are cached by (model, tag) when ``cache`` is set.
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from ..filters.text import with_scores
from ..registry import register
from ..stages import GlobalStep, StageConfig

# InsTag §3.2 (docs/sources.md#instag): alpha 20, DBSCAN 0.05, FP-Growth support 40 and confidence 99%.
MIN_FREQUENCY = 20
SEMANTIC_EPS = 0.05
MIN_SUPPORT = 40
MIN_CONFIDENCE = 0.99
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"  # cache key of the bundled embedder
STEPS = ("raw", "frequency", "rules", "semantic", "association")

_NOT_WORD = re.compile(r"[\W_]+")  # "special characters": anything but letters and digits

TagLists = list[list[str]]


def _unique(tags: Sequence[str]) -> list[str]:
    """Tags of one row, each once, in first-seen order."""
    return list(dict.fromkeys(tags))


def document_frequency(tag_lists: Sequence[Sequence[str]]) -> Counter:
    """Rows each tag appears on (a tag listed twice on one row counts once)."""
    return Counter(t for tags in tag_lists for t in set(tags))


def _rename(tag_lists: Sequence[Sequence[str]], mapping: dict[str, str]) -> TagLists:
    """Rows with tags mapped (tags missing from ``mapping`` dropped), de-duplicated."""
    return [_unique([mapping[t] for t in tags if t in mapping]) for tags in tag_lists]


def _most_frequent(members: Sequence[str], freq: Counter) -> str:
    """The member on most rows; ties go to the alphabetically first, so the choice is stable."""
    return min(members, key=lambda t: (-freq[t], t))


def frequency_filter(tag_lists: Sequence[Sequence[str]], min_frequency: int = MIN_FREQUENCY) -> TagLists:
    """Step 1: drop tags seen on fewer than ``min_frequency`` rows."""
    freq = document_frequency(tag_lists)
    return _rename(tag_lists, {t: t for t, n in freq.items() if n >= min_frequency})


def clean_tag(tag: str) -> str:
    """Lowercase, special characters to spaces, spaces collapsed."""
    return _NOT_WORD.sub(" ", tag.lower()).strip()


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    return _stemmer().stem(word)


@functools.cache
def _stemmer():
    from nltk.stem import PorterStemmer  # pure Python rules: no NLTK data download

    return PorterStemmer()


def rule_key(tag: str) -> str:
    """Step 2's identity: the cleaned tag with every word Porter-stemmed ("Writes" -> "write")."""
    return " ".join(_stem(w) for w in clean_tag(tag).split())


def rule_aggregate(tag_lists: Sequence[Sequence[str]]) -> tuple[TagLists, dict[str, str]]:
    """Step 2: tags with one ``rule_key`` become one, named by the most frequent cleaned spelling.
    Returns the rows and the map tag -> new name (tags that clean to nothing are dropped)."""
    freq = document_frequency(tag_lists)
    spelling_freq: Counter = Counter()  # rows per cleaned spelling, summed over the raw variants
    groups: dict[str, set[str]] = defaultdict(set)
    for tag, n in freq.items():
        key = rule_key(tag)
        if key:
            spelling_freq[clean_tag(tag)] += n
            groups[key].add(clean_tag(tag))
    name = {key: _most_frequent(sorted(spellings), spelling_freq) for key, spellings in groups.items()}
    mapping = {tag: name[rule_key(tag)] for tag in freq if rule_key(tag)}
    return _rename(tag_lists, mapping), mapping


def semantic_aggregate(tag_lists: Sequence[Sequence[str]], embed: Callable[[list[str]], np.ndarray],
                       eps: float = SEMANTIC_EPS, min_samples: int = 1) -> tuple[TagLists, dict[str, str]]:
    """Step 3: DBSCAN (cosine) over the tags' embeddings; each cluster -> its most frequent member.
    ``embed`` maps texts to an (n, d) array. Returns the rows and the map tag -> new name."""
    freq = document_frequency(tag_lists)
    tags = sorted(freq)
    if len(tags) < 2:
        return [list(t) for t in tag_lists], {t: t for t in tags}
    from sklearn.cluster import DBSCAN

    vectors = np.asarray(embed(tags), dtype=np.float32)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(vectors)
    clusters: dict[int, list[str]] = defaultdict(list)
    mapping = {}
    for tag, label in zip(tags, labels):
        if label < 0:  # noise (only when min_samples > 1): stays itself
            mapping[tag] = tag
        else:
            clusters[int(label)].append(tag)
    for members in clusters.values():
        head = _most_frequent(members, freq)
        mapping.update({t: head for t in members})
    return _rename(tag_lists, mapping), mapping


@dataclass(frozen=True)
class Rule:
    """A => B: ``support`` rows hold both; ``confidence`` = support / rows holding A."""

    antecedent: str
    consequent: str
    support: int
    confidence: float


def association_rules(tag_lists: Sequence[Sequence[str]], min_support: int = MIN_SUPPORT,
                      min_confidence: float = MIN_CONFIDENCE) -> list[Rule]:
    """Single-antecedent rules A => B from pair co-occurrence counts, sorted by (A, B)."""
    freq = document_frequency(tag_lists)
    pairs: Counter = Counter()
    for tags in tag_lists:
        present = sorted(set(tags))
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                pairs[a, b] += 1
    rules = []
    for (a, b), both in pairs.items():
        if both < min_support:
            continue
        for x, y in ((a, b), (b, a)):
            if both / freq[x] >= min_confidence:
                rules.append(Rule(x, y, both, both / freq[x]))
    return sorted(rules, key=lambda r: (r.antecedent, r.consequent))


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def association_aggregate(tag_lists: Sequence[Sequence[str]], min_support: int = MIN_SUPPORT,
                          min_confidence: float = MIN_CONFIDENCE) -> tuple[TagLists, list[Rule]]:
    """Step 4 (see the module docstring): tags implying each other merge; an implied tag is absorbed
    into its antecedent on rows holding both. Returns the rows and the rules used."""
    rules = association_rules(tag_lists, min_support, min_confidence)
    if not rules:
        return [list(t) for t in tag_lists], rules
    freq = document_frequency(tag_lists)
    graph: dict[str, set[str]] = defaultdict(set)
    for r in rules:
        graph[r.antecedent].add(r.consequent)
    reach = {t: _reachable(graph, t) for t in list(graph) + [r.consequent for r in rules]}
    # A cycle of rules (mutual implication) is one tag: its strongly connected component.
    name = {}
    for t, seen in reach.items():
        component = sorted(u for u in seen if t in reach.get(u, ()))
        name[t] = _most_frequent(component, freq)
    implied: dict[str, set[str]] = defaultdict(set)  # between components, direct rules only
    for r in rules:
        a, b = name[r.antecedent], name[r.consequent]
        if a != b:
            implied[a].add(b)
    out = []
    for tags in tag_lists:
        merged = _unique([name.get(t, t) for t in tags])
        absorbed = {b for a in merged for b in implied.get(a, ())}
        out.append([t for t in merged if t not in absorbed])
    return out, rules


@dataclass
class Normalized:
    """The rows' normalized tags, the distinct tags left after each step, and the step-4 rules."""

    tags: TagLists
    counts: dict[str, int] = field(default_factory=dict)  # step -> distinct tags after it
    rules: list[Rule] = field(default_factory=list)


def _distinct(tag_lists: Sequence[Sequence[str]]) -> int:
    return len({t for tags in tag_lists for t in tags})


def normalize_tags(tag_lists: Sequence[Sequence[str]], embed: Callable[[list[str]], np.ndarray] | None,
                   min_frequency: int = MIN_FREQUENCY, eps: float = SEMANTIC_EPS, min_samples: int = 1,
                   min_support: int = MIN_SUPPORT, min_confidence: float = MIN_CONFIDENCE,
                   steps: Sequence[str] = STEPS[1:]) -> Normalized:
    """The four steps in the paper's order; a step missing from ``steps`` is skipped."""
    rows = [_unique(t) for t in tag_lists]
    counts = {"raw": _distinct(rows)}
    rules: list[Rule] = []
    if "frequency" in steps:
        rows = frequency_filter(rows, min_frequency)
        counts["frequency"] = _distinct(rows)
    if "rules" in steps:
        rows, _ = rule_aggregate(rows)
        counts["rules"] = _distinct(rows)
    if "semantic" in steps:
        if embed is None:
            raise ValueError("the semantic step needs an embed function")
        rows, _ = semantic_aggregate(rows, embed, eps, min_samples)
        counts["semantic"] = _distinct(rows)
    if "association" in steps:
        rows, rules = association_aggregate(rows, min_support, min_confidence)
        counts["association"] = _distinct(rows)
    return Normalized(rows, counts, rules)


class InsTagNormalizeConfig(StageConfig):
    source: str = "instag_raw"  # meta key of the tagger's raw tags (instag_tag writes meta.instag_raw)
    min_frequency: int = Field(MIN_FREQUENCY, ge=1)
    eps: float = Field(SEMANTIC_EPS, gt=0, lt=2)  # DBSCAN eps in cosine distance (1 - cos)
    min_samples: int = Field(1, ge=1)  # DBSCAN; 1: every tag is a core point (see module docstring)
    min_support: int = Field(MIN_SUPPORT, ge=1)
    min_confidence: float = Field(MIN_CONFIDENCE, gt=0, le=1)
    # leave one out to skip it, e.g. ["rules", "semantic"] on a pool too small for alpha 20
    steps: list[Literal["frequency", "rules", "semantic", "association"]] = list(STEPS[1:])
    embedder: str | None = None  # sentence-transformers model for step 3; None: the bundled MiniLM
    embed_batch_size: int = Field(64, ge=1)
    device: str = "cpu"
    cache: str | None = None  # ScoreCache sqlite file for the tag embeddings; None: no cache


def _raw_tags(row: dict, key: str) -> list[str]:
    tags = (row.get("meta") or {}).get(key) or []
    if not isinstance(tags, list):
        raise ValueError(f"meta.{key} must be a list of tags, got {type(tags).__name__}")
    return [t for t in tags if isinstance(t, str) and t.strip()]


@register("instag_normalize")
class InsTagNormalize(GlobalStep):
    """InsTag's 4-step tag normalization over the whole pool (key None: one group, one worker)."""

    Config = InsTagNormalizeConfig

    def __init__(self, config: InsTagNormalizeConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.last: Normalized | None = None

    def describe(self) -> str:
        c = self.config
        return (f"{self.name}: InsTag normalization ({', '.join(c.steps)}): alpha {c.min_frequency}, "
                f"DBSCAN eps {c.eps} (cosine distance) over {c.embedder or 'MiniLM'} embeddings, "
                f"rules with support >= {c.min_support} and confidence >= {c.min_confidence}")

    def key(self, row: dict) -> None:
        return None

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts``, read from / written to the cache when one is set."""
        from ..models.embedder import embed, load_embedder
        from ..models.score_cache import ScoreCache, cache_key

        c = self.config
        model_id = c.embedder or MINILM_ID
        cache = ScoreCache(c.cache) if c.cache else None
        keys = [cache_key(model_id, "embed:instag_tag", t) for t in texts]
        found = cache.get_vectors(keys) if cache else {}
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            fresh = embed(load_embedder(c.embedder, c.device), [texts[i] for i in missing], c.embed_batch_size)
            found.update({keys[i]: v for i, v in zip(missing, fresh)})
            if cache:
                cache.put_vectors([(keys[i], v) for i, v in zip(missing, fresh)])
        if cache:
            cache.close()
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        c = self.config
        self.last = normalize_tags([_raw_tags(r, c.source) for r in rows], self.embed, c.min_frequency, c.eps,
                                   c.min_samples, c.min_support, c.min_confidence, c.steps)
        for row, tags in zip(rows, self.last.tags):
            out = with_scores(row, {"instag_count": len(tags)})
            out["meta"] = {**(row.get("meta") or {}), "instag": tags}
            yield out, None

    def tally(self, rows: list[dict]) -> dict[str, int]:
        """Distinct tags after each step (``tags_<step>``), rules used, rows left without tags."""
        counts = {"rows_without_tags": sum(not (r.get("meta") or {}).get("instag") for r in rows)}
        if self.last is not None:  # set by run() on this worker just before the tally of its group
            counts.update({f"tags_{step}": n for step, n in self.last.counts.items()})
            counts["association_rules"] = len(self.last.rules)
        return counts
