"""MinHash near-dedup in bounded memory: rows spilled to local disk, band keys joined by DuckDB.

The in-memory ``MinHashDedup.run`` holds every row, shingle set and bucket: about 10 KB per
document, so a 24 GB machine stops near 2M documents. Here memory stays flat whatever the corpus:

1. One streaming pass writes each row to a spill file (pickled: a row comes back exactly as it
   went in), its signature and shingle set to two flat files (read back by position), its id to a
   Parquet table and its band keys (64-bit hashes of each band's values) to a second, which
   DuckDB queries.
2. Rows sharing an id (rare) are resolved as ``run`` does: the first in ``member_order``, then
   content order, stands for the id; the others are ``duplicate_id``.
3. DuckDB self-joins the band table on the key (an out-of-core hash join: past ``memory_limit`` it
   spills to its temp directory) into distinct candidate pairs, written as Parquet.
4. Candidates stream back in chunks, both ends' signatures and shingle sets are read from the flat
   files, and they are judged by the same ``judge`` as ``run`` after checking that they really share a band (a 64-bit key
   collision is thereby never a candidate). Edges go to a union-find over a numpy parent array.
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
from .lsh import member_order
from .minhash import EMPTY, document_signatures

if TYPE_CHECKING:
    from .stage import MinHashDedup

_MIX = np.uint64(0x9E3779B97F4A7C15)  # 64-bit golden-ratio constant (splitmix64)


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


def share_band(sig_a: np.ndarray, sig_b: np.ndarray, bands: int, rows: int) -> bool:
    """Whether two signatures are equal on all rows of some band: the exact LSH candidate rule."""
    eq = (sig_a[:bands * rows] == sig_b[:bands * rows]).reshape(bands, rows)
    return bool(eq.all(axis=1).any())


def run_spilled(stage: MinHashDedup, rows: Iterable[dict], memory_limit_mb: int) -> Iterator[tuple[dict, str | None]]:
    """``stage.run`` over a stream of rows, in bounded memory (see the module docstring)."""
    with Spill(stage.name, memory_limit_mb) as sp, _Sketches(sp.work, stage.config.num_perm) as sketches:
        yield from _Run(stage, sp, sketches).decisions(rows)


class _Sketches:
    """Signatures (fixed size, by row number) and shingle sets (by offset) in two flat files, read
    back with ``pread``: kept out of DuckDB, whose joins would otherwise carry ~1.3 KB a row."""

    def __init__(self, folder: str, num_perm: int):
        self.sig_bytes = num_perm * 4
        self.sigs = open(os.path.join(folder, "signatures.bin"), "w+b")
        self.sets = open(os.path.join(folder, "shingles.bin"), "w+b")
        self.end = 0

    def __enter__(self) -> _Sketches:
        return self

    def __exit__(self, *exc) -> None:
        self.sigs.close()
        self.sets.close()

    def add(self, sigs: np.ndarray, sets: list[np.ndarray] | None) -> tuple[list[int], list[int]]:
        """Append a batch; (offset, length) of each shingle set (length -1: not kept)."""
        self.sigs.write(np.ascontiguousarray(sigs, dtype=np.uint32).tobytes())
        if sets is None:
            return [0] * len(sigs), [-1] * len(sigs)
        offsets, lengths = [], []
        for shingles in sets:
            data = np.ascontiguousarray(shingles, dtype=np.uint32).tobytes()
            offsets.append(self.end)
            lengths.append(len(shingles))
            self.sets.write(data)
            self.end += len(data)
        return offsets, lengths

    def ready(self) -> None:
        self.sigs.flush()
        self.sets.flush()

    def member(self, doc: int, offset: int, length: int) -> tuple[str, np.ndarray, np.ndarray | None]:
        """("", signature, shingle set) as ``judge`` takes them."""
        sig = np.frombuffer(os.pread(self.sigs.fileno(), self.sig_bytes, doc * self.sig_bytes), np.uint32)
        shingles = None if length < 0 else np.frombuffer(os.pread(self.sets.fileno(), length * 4, offset), np.uint32)
        return "", sig, shingles


class _Run:
    def __init__(self, stage: MinHashDedup, sp: Spill, sketches: _Sketches):
        self.stage, self.sp, self.sketches = stage, sp, sketches
        self.band_rows = "bands"  # less the bands of rows that do not stand for their id (_repeated_ids)
        self.bands, self.rows_per_band = stage.bands, stage.rows_per_band

    def decisions(self, rows: Iterable[dict]) -> Iterator[tuple[dict, str | None]]:
        from .stage import DUPLICATE_ID, decide, with_meta

        for batch in batches(rows, CHUNK):
            self._sign_batch(batch)
        self.sketches.ready()
        repeats = self._repeated_ids()
        # By row number: the repeated ids (size 0 marks them; their bands were dropped, so they are
        # in no cluster) and the clusters' members.
        decided = heapq.merge(((doc, rid, 0) for doc, rid in sorted(repeats.items())), self._clusters(self.sp.n))

        def decide_row(row: dict, cluster: str, size: int) -> tuple[dict, str | None]:
            return (with_meta(row, duplicate_of=cluster), DUPLICATE_ID) if size == 0 else decide(row, cluster, size)

        yield from merge_decisions(self.sp.rows(), decided, decide_row)

    # -- pass 1: spill, sign, band ------------------------------------------------------------------

    def _sign_batch(self, batch: list[dict]) -> None:
        c = self.stage.config
        first, offsets = self.sp.add(batch)
        sigs, sets = document_signatures((row_text(r) for r in batch), c.num_perm, c.seed, c.ngram, c.char_ngram)
        docs = np.arange(first, first + len(batch), dtype=np.int32)
        sh_off, sh_len = self.sketches.add(sigs, sets if c.verify else None)
        self.sp.insert("docs", pa.table({
            "doc": docs, "id": pa.array([str(r["id"]) for r in batch], pa.string()),
            "off": np.array(offsets, dtype=np.int64), "sh_off": np.array(sh_off, dtype=np.int64),
            "sh_len": np.array(sh_len, dtype=np.int64)}))
        keyed = ~(sigs == EMPTY).all(axis=1)  # an empty document gets no band keys, as in run()
        keys = band_hashes(sigs[keyed], self.bands, self.rows_per_band)
        self.sp.insert("bands", pa.table({"doc": np.repeat(docs[keyed], self.bands).astype(np.int32),
                                          "key": keys.reshape(-1)}))

    # -- rows sharing an id -------------------------------------------------------------------------

    def _repeated_ids(self) -> dict[int, str]:
        """doc -> id for every row that does not stand for its id; their bands are dropped."""
        from .stage import _content_order

        records = self.sp.stream(
            "SELECT id, doc, off, sh_off, sh_len FROM docs WHERE id IN (SELECT id FROM docs GROUP BY id "
            "HAVING count(*) > 1) ORDER BY id, doc")
        repeats: dict[int, str] = {}
        for rid, group in groupby(records, key=lambda rec: rec[0]):
            members = []
            for _, doc, off, sh_off, sh_len in group:
                member = (rid, *self.sketches.member(doc, sh_off, sh_len)[1:])
                members.append(((member_order(member), _content_order(self.sp.row_at(off))), doc))
            members.sort()
            repeats.update((doc, rid) for _, doc in members[1:])
        if repeats:
            self.sp.insert("repeats", pa.table({"doc": np.fromiter(repeats, dtype=np.int32)}))
            self.band_rows = "(SELECT * FROM bands WHERE doc NOT IN (SELECT doc FROM repeats))"
        return repeats

    # -- candidates, edges, clusters ----------------------------------------------------------------

    def _clusters(self, n: int) -> Iterator[tuple[int, str, int]]:
        """(doc, cluster id, cluster size) of every document in a cluster of two or more, by doc."""
        parent = np.arange(n, dtype=np.int32)  # 4 bytes a row: the one array that grows with the corpus
        self.sp.materialize("cand", f"SELECT DISTINCT a.doc AS x, b.doc AS y FROM {self.band_rows} a "
                                    f"JOIN {self.band_rows} b ON a.key = b.key AND a.doc < b.doc")
        linked = False
        for x, y, off_a, len_a, off_b, len_b in self.sp.stream(
                "SELECT c.x, c.y, da.sh_off, da.sh_len, db.sh_off, db.sh_len FROM cand c "
                "JOIN docs da ON da.doc = c.x JOIN docs db ON db.doc = c.y"):
            a, b = self.sketches.member(x, off_a, len_a), self.sketches.member(y, off_b, len_b)
            if share_band(a[1], b[1], self.bands, self.rows_per_band) and self.stage.is_edge(a, b):
                _union(parent, x, y)
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
