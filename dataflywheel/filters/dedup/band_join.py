"""LSH candidate pairs in bounded memory: band keys in a flat file, hash-partitioned on disk, each
partition sorted in numpy.

Why not DuckDB's join: its hash join and hash aggregate over the band keys of 3M documents
(54M rows) fail with "Out of Memory" below about 256 MB, and what they need grows with the input;
a partition here holds a fixed number of keys whatever the corpus (``rows_per_part``), so the
memory of this phase is the same at 100k and at 30M documents. Every pair sharing a key lands in
the key's partition; within it, a sort by (key, doc) makes each bucket a run and its pairs are
enumerated run by run, in chunks of at most ``PAIRS`` (a bucket of 10k exact copies gives 50M
pairs: they stream, they are never held).

A pair sharing several bands comes out once per band it shares (possibly from several
partitions), tagged with the band: the caller judges it only at the first band its signatures
share, so each pair is judged exactly once, and a 64-bit key collision (the keys are hashes) is
never judged at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

RECORD = np.dtype([("key", "<u8"), ("doc", "<i4"), ("band", "u1")])  # 13 bytes, packed
PAIRS = 1 << 13  # candidate pairs handed out at once (the caller reads two signatures per pair)
FANOUT = 256  # partition files open at once while partitioning
READ = 1 << 18  # records read at once from the flat file while partitioning


class BandKeys:
    """``add`` each batch's band keys; then ``pairs`` gives every (x, y, band) with x < y sharing
    the key of that band, partition by partition."""

    def __init__(self, folder: str, name: str):
        self.folder, self.name = folder, name
        self.path = os.path.join(folder, f"{name}.bin")
        self.out = open(self.path, "wb")
        self.n = 0

    def add(self, docs: np.ndarray, keys: np.ndarray) -> None:
        """``keys``: [len(docs), bands] band hashes of those documents."""
        rec = np.empty(keys.size, RECORD)
        rec["key"] = keys.reshape(-1)
        rec["doc"] = np.repeat(docs, keys.shape[1])
        rec["band"] = np.tile(np.arange(keys.shape[1], dtype=np.uint8), len(docs))
        rec.tofile(self.out)
        self.n += len(rec)

    def __enter__(self) -> BandKeys:
        return self

    def __exit__(self, *exc) -> None:
        self.out.close()

    def pairs(self, rows_per_part: int, drop: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(x, y, band) arrays of at most ``PAIRS`` each; ``drop``: sorted docs whose keys are ignored."""
        self.out.close()  # all added
        parts = max(1, -(-self.n // rows_per_part))
        for first in range(0, parts, FANOUT):
            files = self._partition(parts, first, min(parts, first + FANOUT), drop)
            for path in files:
                part = np.fromfile(path, RECORD)
                os.remove(path)
                yield from _bucket_pairs(part)

    def _partition(self, parts: int, first: int, last: int, drop: np.ndarray) -> list[str]:
        """Write the records of partitions [first, last) (key modulo ``parts``) to one file each."""
        paths = [os.path.join(self.folder, f"{self.name}-{p}.bin") for p in range(first, last)]
        outs = [open(path, "wb") for path in paths]
        try:
            with open(self.path, "rb") as fh:
                while len(chunk := np.fromfile(fh, RECORD, READ)):
                    which = (chunk["key"] % np.uint64(parts)).astype(np.int64)
                    keep = (which >= first) & (which < last) & ~member(chunk["doc"], drop)
                    chunk, which = chunk[keep], which[keep]
                    order = np.argsort(which, kind="stable")
                    bounds = np.searchsorted(which[order], np.arange(first, last + 1))
                    for i, out in enumerate(outs):
                        chunk[order[bounds[i]:bounds[i + 1]]].tofile(out)
        finally:
            for out in outs:
                out.close()
        return paths


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _bucket_pairs(part: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All pairs within each run of equal keys, x < y, in chunks of about ``PAIRS``."""
    part = part[np.lexsort((part["doc"], part["key"]))]
    key = part["key"]
    if len(key) < 2:
        return
    # Each element pairs with the later elements of its run: later[i] of them.
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    later = np.repeat(ends, ends - starts) - np.arange(len(key)) - 1
    total = np.cumsum(later)
    for lo, hi in _chunks(total):
        counts = later[lo:hi]
        a = np.repeat(np.arange(lo, hi), counts)
        step = np.arange(len(a)) - np.repeat(np.cumsum(counts) - counts, counts)
        b = a + 1 + step
        yield part["doc"][a], part["doc"][b], part["band"][a]


def _chunks(total: np.ndarray) -> Iterator[tuple[int, int]]:
    """Element ranges whose pairs add up to about ``PAIRS`` each (one element may give more)."""
    lo, done = 0, 0
    while lo < len(total) and done < total[-1]:
        hi = max(lo + 1, int(np.searchsorted(total, done + PAIRS, side="right")))
        yield lo, hi
        done, lo = int(total[hi - 1]), hi
