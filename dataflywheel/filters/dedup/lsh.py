"""LSH banding of MinHash signatures, candidate pairs, and their verification.

A pair of documents becomes a candidate when any of ``bands`` blocks of ``rows`` signature slots
is equal; P(candidate | J=s) = 1 - (1 - s^r)^b (docs/sources.md#minhash-near-dedup).  Band keys are strings, the keys
of the keyed Beam GroupBy.  Candidates are then checked against the target threshold, because an
LSH threshold set below the target (for recall) otherwise chains unrelated documents together
(docs/sources.md#near-dup-peer-figures: F1 0.619 unverified vs 0.9987 verified on the neardup benchmark).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import combinations

import numpy as np
from datasketch.lsh import _optimal_param

from .minhash import EMPTY, NGRAM, NUM_PERM, SEED, document_signatures, estimate_jaccard

THRESHOLD = 0.8  # the neardup benchmark's threshold; also datasketch's usual MinHashLSH example value
WEIGHTS = (0.5, 0.5)  # datasketch / text-dedup false-positive, false-negative weights (docs/sources.md#minhash-near-dedup)
LSH_MARGIN = 0.2  # LSH at threshold - 0.2, then verify: F1 0.9987 at J>=0.8 (docs/sources.md#near-dup-peer-figures)
# Exact verification needs each document's shingle-hash set next to its band keys (4 bytes per
# shingle, copied into every band): on by default up to this many shingles (~20 KB, about a
# 5,000-word document); longer documents are verified with the MinHash estimate instead.
MAX_EXACT_SHINGLES = 5000
S_POINTS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


@lru_cache(maxsize=64)
def optimal_params(threshold: float = THRESHOLD, num_perm: int = NUM_PERM,
                   weights: tuple[float, float] = WEIGHTS) -> tuple[int, int]:
    """(bands, rows) minimizing weighted false-positive + false-negative area: datasketch's own
    optimizer, so t=0.8 with 128 permutations gives (9, 13) as ``MinHashLSH`` does."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return _optimal_param(threshold, num_perm, weights[0], weights[1])


def candidate_probability(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(a pair with Jaccard s shares at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.power(s, rows)) ** bands


def s_curve(bands: int, rows: int, points: Sequence[float] = S_POINTS) -> list[tuple[float, float]]:
    """[(s, P(candidate | J=s))] at the given similarities."""
    return [(float(s), float(candidate_probability(s, bands, rows))) for s in points]


def s_curve_table(bands: int, rows: int, points: Sequence[float] = S_POINTS) -> str:
    """The S-curve as a printable table, with the midpoint (1/b)^(1/r)."""
    head = f"LSH {bands} bands x {rows} rows (midpoint (1/b)^(1/r) = {(1 / bands) ** (1 / rows):.3f})"
    lines = [head, "  J      P(candidate)"]
    lines += [f"  {s:.2f}   {p:.3f}" for s, p in s_curve(bands, rows, points)]
    return "\n".join(lines)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> list[list[str]]:
    """For each document, ``bands`` keys "<band>:<hex of its rows little-endian uint32 values>".

    The band index is part of the key so equal values in different bands never meet.  A document
    with an empty signature (no shingles) gets no keys: all empty documents would collide.
    """
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"{bands} bands x {rows} rows needs {bands * rows} hashes, got {signatures.shape[1]}")
    sigs = np.ascontiguousarray(signatures[:, :bands * rows], dtype="<u4")
    raw = sigs.view(np.dtype((np.void, 4 * rows))).reshape(len(sigs), bands)
    empty = (signatures == EMPTY).all(axis=1)
    return [[] if empty[i] else [f"{band}:{bytes(v).hex()}" for band, v in enumerate(doc)]
            for i, doc in enumerate(raw)]


Member = tuple[str, np.ndarray, "np.ndarray | None"]  # (id, signature, sorted shingle set or None)


def member_order(member: Member) -> tuple[bytes, bytes]:
    """A content-only order: where two rows share an id, the first in this order stands for it."""
    return member[1].tobytes(), b"" if member[2] is None else member[2].tobytes()


def bucket_pairs(ids: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Candidate pairs among the ids of one bucket, each (smaller, larger); repeated ids once."""
    return combinations(sorted(set(ids)), 2)


def judge(a: Member, b: Member, threshold: float, *, verify: bool = True,
          max_exact: int = MAX_EXACT_SHINGLES) -> float | None:
    """The similarity of a candidate pair if it is an edge, else None. With ``verify``: exact
    Jaccard (MinHash estimate past ``max_exact`` shingles) must reach ``threshold``; without it
    every candidate is an edge (datasketch MinHashLSH behaviour), with its MinHash estimate."""
    if not verify:
        return estimate_jaccard(a[1], b[1])
    sim = pair_similarity(a[2], b[2], a[1], b[1], max_exact)
    return sim if sim >= threshold else None


def lsh_params(threshold: float, num_perm: int, verify: bool, lsh_threshold: float | None = None) -> tuple[int, int]:
    """(bands, rows): with verification the LSH runs at ``threshold - LSH_MARGIN`` for recall."""
    if lsh_threshold is None:
        lsh_threshold = max(threshold - LSH_MARGIN, 0.05) if verify else threshold
    return optimal_params(lsh_threshold, num_perm)


def exact_jaccard(set_a: np.ndarray, set_b: np.ndarray) -> float:
    """Jaccard of two sorted unique shingle-hash arrays (32-bit hashes: a chance collision between
    two ~500-shingle sets is about 6e-5, a shift of one shingle in J)."""
    if not len(set_a) and not len(set_b):
        return 0.0
    inter = len(np.intersect1d(set_a, set_b, assume_unique=True))
    return inter / (len(set_a) + len(set_b) - inter)


def pair_similarity(set_a: np.ndarray | None, set_b: np.ndarray | None, sig_a: np.ndarray, sig_b: np.ndarray,
                    max_exact: int = MAX_EXACT_SHINGLES) -> float:
    """Exact Jaccard when both shingle sets are given and short enough, else the MinHash estimate."""
    if set_a is not None and set_b is not None and max(len(set_a), len(set_b)) <= max_exact:
        return exact_jaccard(set_a, set_b)
    return estimate_jaccard(sig_a, sig_b)


def near_duplicate_pairs(rows: Iterable[dict], threshold: float = THRESHOLD, *, num_perm: int = NUM_PERM,
                         seed: int = SEED, ngram: int = NGRAM, char_ngram: int | None = None,
                         lsh_threshold: float | None = None, verify: bool = True,
                         max_exact: int = MAX_EXACT_SHINGLES) -> list[tuple[str, str, float]]:
    """In memory: shingles -> signatures -> band buckets -> verified edges (id_a, id_b, similarity).

    With ``verify`` (default) the LSH runs at ``threshold - 0.2`` for recall and a candidate is kept
    only if its similarity (``pair_similarity``) is >= ``threshold``; without it, every candidate of
    the LSH at ``threshold`` is an edge (datasketch MinHashLSH behaviour) with its MinHash estimate.
    Rows need ``id`` and ``text``; edges come sorted, smaller id first.
    """
    rows = list(rows)
    ids = [str(r["id"]) for r in rows]
    sigs, sets = document_signatures((r.get("text") or "" for r in rows), num_perm, seed, ngram, char_ngram)
    bands, band_rows = lsh_params(threshold, num_perm, verify, lsh_threshold)
    buckets: dict[str, list[int]] = defaultdict(list)
    for i, keys in enumerate(band_keys(sigs, bands, band_rows)):
        for key in keys:
            buckets[key].append(i)
    candidates = {p for members in buckets.values() if len(members) > 1 for p in combinations(members, 2)}
    edges = []
    for i, j in candidates:
        sim = judge((ids[i], sigs[i], sets[i]), (ids[j], sigs[j], sets[j]), threshold, verify=verify,
                    max_exact=max_exact)
        if sim is not None:
            a, b = sorted((ids[i], ids[j]))
            edges.append((a, b, sim))
    return sorted(edges)
