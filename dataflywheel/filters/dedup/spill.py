"""MinHash near-dedup in bounded memory: rows spilled to local disk, candidates from band keys
partitioned on disk.

The in-memory ``MinHashDedup.run`` holds every row, shingle set and bucket: about 10 KB per
document, so a 24 GB machine stops near 2M documents. Here memory stays flat whatever the corpus:

1. One streaming pass writes each row to a spill file (pickled: a row comes back exactly as it
   went in), its signature and the place of its shingle set to a file of fixed-size records and
   the shingle set to a second file (both read back by position), its id to a Parquet table that
   DuckDB queries, and its band keys (64-bit hashes of each band's values) to a flat file.
2. Rows sharing an id (rare) are resolved as ``run`` does: the first in ``member_order``, then
   content order, stands for the id; the others are ``duplicate_id`` and their keys are ignored.
3. The band keys are hash-partitioned into files of a fixed number of keys and each partition is
   sorted in numpy into buckets, whose pairs stream out (``band_join``; why not a DuckDB join: there).
4. Each pair is judged by the same ``judge`` as ``run``, once: at the first band the two signatures
   share (so a pair sharing many bands, or a 64-bit key collision, is judged once or never). Edges
   go to a union-find over a numpy parent array.
5. DuckDB names each cluster by its smallest id and counts it; a last sequential pass over the
   spill file joins these decisions back to the rows, in input order.

The spill file, the DuckDB database, the memory limit and the clean-up are ``dataflywheel.spill``'s.
The decisions are the in-memory ones: same candidates, same ``judge``, same smallest-id survivor
(tested).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Iterator
from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ...spill import CHUNK, Spill, merge_decisions
from ...stages import batches
from ..text import row_text
from .band_join import BandKeys
from .lsh import member_order
from .minhash import EMPTY, document_signatures

if TYPE_CHECKING:
    from .stage import MinHashDedup

_MIX = np.uint64(0x9E3779B97F4A7C15)  # 64-bit golden-ratio constant (splitmix64)
PART_BYTES = 128  # budget bytes per band key of a partition: ~66 are used while it is sorted and paired


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n, bands] 64-bit keys of each band's values (band index mixed in), splitmix64-style."""
    vals = np.ascontiguousarray(signatures[:, :bands * rows], dtype=np.uint64).reshape(len(signatures), bands, rows)
    h = np.broadcast_to((np.arange(bands, dtype=np.uint64) + np.uint64(1)) * _MIX, (len(signatures), bands)).copy()
    with np.errstate(over="ignore"):
        for j in range(rows):
            h ^= vals[:, :, j]
            h *= _MIX
            h ^= h >> np.uint64(31)
    return h


def first_shared_band(sig_a: np.ndarray, sig_b: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n] the first band on whose rows each pair of signatures ([n, num_perm]) is equal; -1 if none
    (then the pair is no LSH candidate)."""
    eq = (sig_a[:, :bands * rows] == sig_b[:, :bands * rows]).reshape(len(sig_a), bands, rows).all(axis=2)
    return np.where(eq.any(axis=1), eq.argmax(axis=1), -1)


def run_spilled(stage: MinHashDedup, rows: Iterable[dict], memory_limit_mb: int) -> Iterator[tuple[dict, str | None]]:
    """``stage.run`` over a stream of rows, in bounded memory (see the module docstring)."""
    with (Spill(stage.name, memory_limit_mb) as sp, _Sketches(sp.work, stage.config.num_perm) as sketches,
          BandKeys(sp.work) as keys):
        yield from _Run(stage, sp, sketches, keys).decisions(rows)


class _Sketches:
    """Per document, by row number: its signature and where its shingle set is, in a file of
    fixed-size records; the shingle sets in a second file. Read back with ``pread``."""

    def __init__(self, folder: str, num_perm: int):
        self.record = np.dtype([("sig", "<u4", (num_perm,)), ("off", "<i8"), ("len", "<i8")])
        self.sigs = open(os.path.join(folder, "signatures.bin"), "w+b")
        self.sets = open(os.path.join(folder, "shingles.bin"), "w+b")
        self.end = 0

    def __enter__(self) -> _Sketches:
        return self

    def __exit__(self, *exc) -> None:
        self.sigs.close()
        self.sets.close()

    def add(self, sigs: np.ndarray, sets: list[np.ndarray] | None) -> None:
        """Append a batch (``sets`` None: not kept; length -1)."""
        rec = np.zeros(len(sigs), self.record)
        rec["sig"] = sigs
        rec["len"] = -1
        for i, shingles in enumerate(sets or []):
            data = np.ascontiguousarray(shingles, dtype=np.uint32).tobytes()
            rec["off"][i], rec["len"][i] = self.end, len(shingles)
            self.sets.write(data)
            self.end += len(data)
        rec.tofile(self.sigs)

    def ready(self) -> None:
        self.sigs.flush()
        self.sets.flush()

    def records(self, docs: np.ndarray) -> np.ndarray:
        size = self.record.itemsize
        data = b"".join(os.pread(self.sigs.fileno(), size, int(doc) * size) for doc in docs)
        return np.frombuffer(data, self.record)

    def member(self, rec: np.void) -> tuple[str, np.ndarray, np.ndarray | None]:
        """("", signature, shingle set) as ``judge`` takes them."""
        length = int(rec["len"])
        shingles = None if length < 0 else np.frombuffer(os.pread(self.sets.fileno(), length * 4, int(rec["off"])), np.uint32)
        return "", rec["sig"], shingles


class _Run:
    def __init__(self, stage: MinHashDedup, sp: Spill, sketches: _Sketches, keys: BandKeys):
        self.stage, self.sp, self.sketches, self.keys = stage, sp, sketches, keys
        self.bands, self.rows_per_band = stage.bands, stage.rows_per_band

    def decisions(self, rows: Iterable[dict]) -> Iterator[tuple[dict, str | None]]:
        from .stage import DUPLICATE_ID, decide, with_meta

        for batch in batches(rows, CHUNK):
            self._sign_batch(batch)
        self.sketches.ready()
        repeats = self._repeated_ids()
        # By row number: the repeated ids (size 0 marks them; their keys are ignored, so they are
        # in no cluster) and the clusters' members.
        decided = heapq.merge(((doc, rid, 0) for doc, rid in sorted(repeats.items())),
                              self._clusters(self.sp.n, np.array(sorted(repeats), dtype=np.int32)))

        def decide_row(row: dict, cluster: str, size: int) -> tuple[dict, str | None]:
            return (with_meta(row, duplicate_of=cluster), DUPLICATE_ID) if size == 0 else decide(row, cluster, size)

        yield from merge_decisions(self.sp.rows(), decided, decide_row)

    # -- pass 1: spill, sign, band ------------------------------------------------------------------

    def _sign_batch(self, batch: list[dict]) -> None:
        c = self.stage.config
        first, offsets = self.sp.add(batch)
        sigs, sets = document_signatures((row_text(r) for r in batch), c.num_perm, c.seed, c.ngram, c.char_ngram)
        docs = np.arange(first, first + len(batch), dtype=np.int32)
        self.sketches.add(sigs, sets if c.verify else None)
        self.sp.insert("docs", pa.table({"doc": docs, "id": pa.array([str(r["id"]) for r in batch], pa.string()),
                                         "off": np.array(offsets, dtype=np.int64)}))
        keyed = ~(sigs == EMPTY).all(axis=1)  # an empty document gets no band keys, as in run()
        self.keys.add(docs[keyed], band_hashes(sigs[keyed], self.bands, self.rows_per_band))

    # -- rows sharing an id -------------------------------------------------------------------------

    def _repeated_ids(self) -> dict[int, str]:
        """doc -> id for every row that does not stand for its id."""
        from .stage import _content_order

        records = self.sp.stream("SELECT id, doc, off FROM docs WHERE id IN (SELECT id FROM docs GROUP BY id "
                                 "HAVING count(*) > 1) ORDER BY id, doc")
        repeats: dict[int, str] = {}
        for rid, group in groupby(records, key=lambda rec: rec[0]):
            members = []
            for _, doc, off in group:
                member = (rid, *self.sketches.member(self.sketches.records([doc])[0])[1:])
                members.append(((member_order(member), _content_order(self.sp.row_at(off))), doc))
            members.sort()
            repeats.update((doc, rid) for _, doc in members[1:])
        return repeats

    # -- candidates, edges, clusters ----------------------------------------------------------------

    def _clusters(self, n: int, ignored: np.ndarray) -> Iterator[tuple[int, str, int]]:
        """(doc, cluster id, cluster size) of every document in a cluster of two or more, by doc."""
        parent = np.arange(n, dtype=np.int32)  # 4 bytes a row: the one array that grows with the corpus
        rows_per_part = max(1, self.sp.memory_mb * 2**20 // PART_BYTES)
        linked = False
        for x, y, band in self.keys.pairs(rows_per_part, ignored):
            ra, rb = self.sketches.records(x), self.sketches.records(y)
            judged = first_shared_band(ra["sig"], rb["sig"], self.bands, self.rows_per_band) == band
            for i in np.flatnonzero(judged):
                if self.stage.is_edge(self.sketches.member(ra[i]), self.sketches.member(rb[i])):
                    _union(parent, int(x[i]), int(y[i]))
                    linked = True
        if not linked:
            return
        roots = _roots(parent)
        members = np.flatnonzero(np.bincount(roots, minlength=n)[roots] > 1).astype(np.int32)
        self.sp.insert("comp", pa.table({"doc": members, "root": roots[members]}))
        yield from self.sp.stream(
            "SELECT comp.doc, min(docs.id) OVER (PARTITION BY root), count(*) OVER (PARTITION BY root) "
            "FROM comp JOIN docs USING (doc) ORDER BY comp.doc")


def _union(parent: np.ndarray, x: int, y: int) -> None:
    rx, ry = _find(parent, x), _find(parent, y)
    if rx != ry:
        parent[max(rx, ry)] = min(rx, ry)


def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return int(x)


def _roots(parent: np.ndarray) -> np.ndarray:
    """Every node's root, vectorized: follow parents until nothing moves."""
    roots = parent.copy()
    while True:
        nxt = roots[roots]
        if np.array_equal(nxt, roots):
            return roots
        roots = nxt
