"""MinHash near-dedup in bounded memory: rows spilled to local disk, candidates from band keys
partitioned on disk.

The in-memory ``MinHashDedup.run`` holds every row, shingle set and bucket: about 10 KB per
document, so a 24 GB machine stops near 2M documents. Here memory stays flat whatever the corpus:

1. One streaming pass writes each row to a spill file (pickled: a row comes back exactly as it
   went in); its signature and where its shingle set, id and row are to a file of fixed-size
   records; the shingle set and the id to two more files (all read back by position); its band
   keys (64-bit hashes of each band's values) and a 64-bit hash of its id to two flat files.
2. Rows sharing an id (rare) are found by pairing the id hashes as the band keys are, compared by
   their real ids, and resolved as ``run`` does: the first in ``member_order``, then content
   order, stands for the id; the others are ``duplicate_id`` and their keys are ignored.
3. The band keys are hash-partitioned into files of a fixed number of keys and each partition is
   sorted in numpy into buckets, whose pairs stream out (``band_join``; why not DuckDB: there).
4. Each pair is judged by the same ``judge`` as ``run``, once: at the first band the two signatures
   share (so a pair sharing many bands, or a 64-bit key collision, is judged once or never). Edges
   go to a union-find over a numpy parent array (4 bytes a row: what grows with the corpus).
5. Clusters are named by their smallest id and counted, partition by partition of hashed roots; a
   last sequential pass over the spill file joins these decisions back to the rows, in input order.

The spill folder and its clean-up are ``dataflywheel.spill``'s; the step uses no DuckDB query.
The decisions are the in-memory ones: same candidates, same ``judge``, same smallest-id survivor
(tested).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import pickle
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ...spill import CHUNK, Spill, merge_decisions
from ...stages import batches
from ..text import row_text
from .band_join import READ, BandKeys
from .lsh import member_order
from .minhash import EMPTY, document_signatures

if TYPE_CHECKING:
    from .stage import MinHashDedup

_MIX = np.uint64(0x9E3779B97F4A7C15)  # 64-bit golden-ratio constant (splitmix64)
PART_BYTES = 128  # budget bytes per band key of a partition: ~66 are used while it is sorted and paired
NAME_BYTES = 1024  # budget bytes per clustered document while its cluster is named (its id is a string)
MERGE_BYTES = 1024  # budget bytes per (doc, name, size) read back while the named partitions are merged


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
          BandKeys(sp.work, "bands") as keys, BandKeys(sp.work, "ids") as ids):
        yield from _Run(stage, sp, sketches, keys, ids).decisions(rows)


class _Sketches:
    """Per document, by row number: its signature and where its shingle set, its id and its row
    are, in a file of fixed-size records; the shingle sets and the ids (UTF-8) in two more files.
    Read back with ``pread``."""

    def __init__(self, folder: str, num_perm: int):
        self.record = np.dtype([("sig", "<u4", (num_perm,)), ("off", "<i8"), ("len", "<i8"), ("row", "<i8"),
                                ("id_off", "<i8"), ("id_len", "<i8")])
        self.sigs = open(os.path.join(folder, "signatures.bin"), "w+b")
        self.sets = open(os.path.join(folder, "shingles.bin"), "w+b")
        self.id_file = open(os.path.join(folder, "ids.txt"), "w+b")
        self.end = self.id_end = 0

    def __enter__(self) -> _Sketches:
        return self

    def __exit__(self, *exc) -> None:
        self.sigs.close()
        self.sets.close()
        self.id_file.close()

    def add(self, sigs: np.ndarray, sets: list[np.ndarray] | None, rows: list[int], ids: list[str]) -> None:
        """Append a batch (``sets`` None: not kept; length -1); ``rows``: their offsets in the spill file."""
        rec = np.zeros(len(sigs), self.record)
        rec["sig"], rec["row"] = sigs, rows
        rec["len"] = -1
        encoded = [rid.encode() for rid in ids]
        rec["id_len"] = [len(b) for b in encoded]
        rec["id_off"] = self.id_end + np.cumsum(rec["id_len"]) - rec["id_len"]
        self.id_file.write(b"".join(encoded))
        self.id_end += int(rec["id_len"].sum())
        for i, shingles in enumerate(sets or []):
            data = np.ascontiguousarray(shingles, dtype=np.uint32).tobytes()
            rec["off"][i], rec["len"][i] = self.end, len(shingles)
            self.sets.write(data)
            self.end += len(data)
        rec.tofile(self.sigs)

    def ready(self) -> None:
        self.sigs.flush()
        self.sets.flush()
        self.id_file.flush()

    def ids(self, docs: np.ndarray) -> list[str]:
        fd, ids = self.id_file.fileno(), []
        for at in range(0, len(docs), CHUNK):  # a record is ~0.5 KB (its signature): never all at once
            recs = self.records(docs[at:at + CHUNK])
            ids += [os.pread(fd, int(n), int(off)).decode() for off, n in zip(recs["id_off"], recs["id_len"])]
        return ids

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
    def __init__(self, stage: MinHashDedup, sp: Spill, sketches: _Sketches, keys: BandKeys, ids: BandKeys):
        self.stage, self.sp, self.sketches, self.keys, self.ids = stage, sp, sketches, keys, ids
        self.bands, self.rows_per_band = stage.bands, stage.rows_per_band
        self.budget = sp.memory_mb * 2**20

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
        ids = [str(r["id"]) for r in batch]
        self.sketches.add(sigs, sets if c.verify else None, offsets, ids)
        self.ids.add(docs, np.array([_hash64(rid) for rid in ids], dtype=np.uint64)[:, None])
        keyed = ~(sigs == EMPTY).all(axis=1)  # an empty document gets no band keys, as in run()
        self.keys.add(docs[keyed], band_hashes(sigs[keyed], self.bands, self.rows_per_band))

    # -- rows sharing an id -------------------------------------------------------------------------

    def _repeated_ids(self) -> dict[int, str]:
        """doc -> id for every row that does not stand for its id. Rows whose 64-bit id hashes meet
        (paired as the band keys are) are compared by their real ids."""
        from .stage import _content_order

        groups: dict[str, set[int]] = defaultdict(set)
        for xs, ys, _ in self.ids.pairs(self.budget // PART_BYTES, np.empty(0, np.int32)):
            for x, y, a, b in zip(xs.tolist(), ys.tolist(), self.sketches.ids(xs), self.sketches.ids(ys)):
                if a == b:
                    groups[a].update((x, y))
        repeats: dict[int, str] = {}
        for rid, docs in groups.items():
            members = []
            for doc in docs:
                member = (rid, *self.sketches.member(self.sketches.records([doc])[0])[1:])
                members.append(((member_order(member), _content_order(self._row(doc))), doc))
            members.sort()
            repeats.update((doc, rid) for _, doc in members[1:])
        return repeats

    def _row(self, doc: int) -> dict:
        return self.sp.row_at(int(self.sketches.records([doc])[0]["row"]))

    # -- candidates, edges, clusters ----------------------------------------------------------------

    def _clusters(self, n: int, ignored: np.ndarray) -> Iterator[tuple[int, str, int]]:
        """(doc, cluster id, cluster size) of every document in a cluster of two or more, by doc."""
        parent = np.arange(n, dtype=np.int32)  # 4 bytes a row: the one array that grows with the corpus
        linked = False
        for x, y, band in self.keys.pairs(self.budget // PART_BYTES, ignored):
            ra, rb = self.sketches.records(x), self.sketches.records(y)
            judged = first_shared_band(ra["sig"], rb["sig"], self.bands, self.rows_per_band) == band
            for i in np.flatnonzero(judged):
                if self.stage.is_edge(self.sketches.member(ra[i]), self.sketches.member(rb[i])):
                    _union(parent, int(x[i]), int(y[i]))
                    linked = True
        if not linked:
            return
        paths = self._names(_roots(parent))
        del parent  # the merge below holds one small chunk per partition file, nothing per row
        yield from heapq.merge(*map(_read, paths))

    def _names(self, roots: np.ndarray) -> list[str]:
        """Each cluster named by its smallest id and counted, in partitions of clusters (hashed
        roots) small enough for the budget; each partition's (doc, name, size) written sorted by
        doc to a file, returned for the caller to merge."""
        shared = np.zeros(len(roots), bool)  # by root: a cluster of two or more
        members = 0
        for lo in range(0, len(roots), READ):
            r = roots[lo:lo + READ]
            moved = r != np.arange(lo, lo + len(r), dtype=np.int32)
            shared[r[moved]] = True
            members += int(moved.sum())
        members += int(shared.sum())  # the roots themselves
        parts = max(1, -(-members * NAME_BYTES // self.budget))
        chunk = max(64, self.budget // (parts * MERGE_BYTES))  # decisions read back at once per file
        paths = []
        for i in range(parts):
            docs = np.concatenate([lo + np.flatnonzero(_in_part(roots[lo:lo + READ], shared, parts, i))
                                   for lo in range(0, len(roots), READ)]).astype(np.int32)
            ids, of = self.sketches.ids(docs), roots[docs]
            order = np.argsort(of, kind="stable")
            bounds = np.flatnonzero(np.r_[True, of[order][1:] != of[order][:-1], True]).tolist()
            names, size = [""] * len(docs), np.empty(len(docs), np.int64)
            for lo, hi in zip(bounds[:-1], bounds[1:]):  # one cluster: its smallest id
                group = order[lo:hi].tolist()
                name = min(ids[j] for j in group)
                for j in group:
                    names[j] = name
                size[order[lo:hi]] = hi - lo
            paths.append(os.path.join(self.sp.work, f"names-{i}.pickle"))
            with open(paths[-1], "wb") as fh:  # docs are sorted, so this is too
                for at in range(0, len(docs), chunk):
                    rows = list(zip(docs[at:at + chunk].tolist(), names[at:at + chunk], size[at:at + chunk].tolist()))
                    pickle.dump(rows, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return paths


def _in_part(roots: np.ndarray, shared: np.ndarray, parts: int, i: int) -> np.ndarray:
    """Which of these docs are in a cluster of two or more whose hashed root falls in partition i."""
    with np.errstate(over="ignore"):  # Knuth's multiplicative hash: even parts whatever the roots
        part = (roots.astype(np.uint32) * np.uint32(2654435761) >> np.uint32(8)) % np.uint32(parts)
    return shared[roots] & (part == i)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _read(path: str) -> Iterator[tuple[int, str, int]]:
    with open(path, "rb") as fh:
        while True:
            try:
                yield from pickle.load(fh)
            except EOFError:
                return


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
    """Every node's root, in place and in chunks (no second array as long as the corpus). Union
    links the larger root under the smaller and path halving only shortens paths, so a parent is
    never after its child: by the time a chunk is reached every earlier node already holds its root,
    and the chunk's own links are followed until nothing moves."""
    for lo in range(0, len(parent), READ):
        r = parent[lo:lo + READ]
        while True:
            up = parent[r]
            if np.array_equal(up, r):
                break
            r = up
        parent[lo:lo + READ] = r
    return parent
