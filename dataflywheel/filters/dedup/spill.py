"""MinHash near-dedup in bounded memory: rows spilled to local disk, band keys joined by DuckDB.

The in-memory ``MinHashDedup.run`` holds every row, shingle set and bucket: about 10 KB per
document, so a 24 GB machine stops near 2M documents. Here memory stays flat whatever the corpus:

1. One streaming pass writes each row to a spill file (pickled: a row comes back exactly as it
   went in) and its id, signature and shingle set to DuckDB, and its band keys (64-bit hashes of
   each band's values) to a second table.
2. Rows sharing an id (rare) are resolved as ``run`` does: the first in ``member_order``, then
   content order, stands for the id; the others are ``duplicate_id``.
3. DuckDB self-joins the band table on the key (an out-of-core hash join: past ``memory_limit`` it
   spills to its temp directory) into distinct candidate pairs.
4. Candidates stream back in chunks with both ends' signatures and shingle sets, and are judged by
   the same ``judge`` as ``run`` after checking that they really share a band (a 64-bit key
   collision is thereby never a candidate). Edges go to a union-find over a numpy parent array.
5. DuckDB names each cluster by its smallest id and counts it; a last sequential pass over the
   spill file joins these decisions back to the rows, in input order.

Why DuckDB: an embedded, well-kept engine whose joins and aggregations honour a memory limit and
spill to disk, so no sort-merge passes of our own (datatrove's way) are needed. The decisions are
the in-memory ones: same candidates, same ``judge``, same smallest-id survivor (tested).
Everything lives in one temporary folder, removed after success and after failure; a killed run's
folder is never read again (each run makes a new one) and is removed by the next run.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ...errors import UserError
from ..text import row_text
from .lsh import member_order
from .minhash import EMPTY, document_signatures

if TYPE_CHECKING:
    from .stage import MinHashDedup

SPILL_ENV = "DATAFLYWHEEL_SPILL"  # where spill folders go (default: the system temp folder)
PREFIX = "dfw-spill-"
CHUNK = 4096  # rows signed at once, candidate pairs judged at once: a few MB each
_MIX = np.uint64(0x9E3779B97F4A7C15)  # 64-bit golden-ratio constant (splitmix64)


def spill_root() -> str:
    return os.environ.get(SPILL_ENV) or tempfile.gettempdir()


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


def spill_folder() -> str:
    """A new spill folder of this process (named by its pid, so the next run removes it if we are killed)."""
    _remove_stale()
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=spill_root())


def run_spilled(stage: MinHashDedup, rows: Iterable[dict], memory_limit_mb: int) -> Iterator[tuple[dict, str | None]]:
    """``stage.run`` over a stream of rows, in bounded memory (see the module docstring)."""
    import duckdb

    work = spill_folder()
    try:
        yield from _Run(stage, work, memory_limit_mb).decisions(rows)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise UserError(f"{stage.name}: the disk under {work} is full: free space or set {SPILL_ENV}") from None
        raise
    except duckdb.OutOfMemoryException as err:  # an operator that cannot spill needs more than the budget
        raise UserError(f"{stage.name}: {memory_limit_mb} MB is too little for the out-of-core join "
                        f"({str(err).splitlines()[0]}); raise runner.memory_budget_mb") from None
    except duckdb.IOException as err:
        if "space" in str(err).lower():
            raise UserError(f"{stage.name}: the disk under {work} is full: free space or set {SPILL_ENV}") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_stale() -> None:
    """Spill folders of runs that were killed (their process is gone)."""
    root = spill_root()
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = re.match(rf"{PREFIX}(\d+)-", name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Run:
    def __init__(self, stage: MinHashDedup, work: str, memory_limit_mb: int):
        import duckdb

        self.stage, self.work = stage, work
        self.bands, self.rows_per_band = stage.bands, stage.rows_per_band
        self.db = duckdb.connect(os.path.join(work, "dedup.duckdb"))
        for setting in (f"memory_limit='{memory_limit_mb}MB'", f"temp_directory='{os.path.join(work, 'tmp')}'",
                        "preserve_insertion_order=false"):
            self.db.execute(f"SET {setting}")
        self.db.execute("CREATE TABLE docs (doc INTEGER, id VARCHAR, off BIGINT, sig BLOB, sh BLOB)")
        self.db.execute("CREATE TABLE bands (doc INTEGER, key UBIGINT)")
        self.spill = os.path.join(work, "rows.pickle")

    def decisions(self, rows: Iterable[dict]) -> Iterator[tuple[dict, str | None]]:
        from .stage import DUPLICATE_ID, decide, with_meta

        n = self._sign(rows)
        repeats = self._repeated_ids()
        clusters = self._clusters(n)  # (doc, cluster id, size), by doc: merged with the rows in one pass
        ahead = next(clusters, None)
        with open(self.spill, "rb") as fh:
            for doc in range(n):
                row = pickle.load(fh)
                if doc in repeats:
                    yield with_meta(row, duplicate_of=repeats[doc]), DUPLICATE_ID
                elif ahead is not None and ahead[0] == doc:
                    yield decide(row, ahead[1], ahead[2])
                    ahead = next(clusters, None)
                else:
                    yield row, None
        self.db.close()

    # -- pass 1: spill, sign, band ------------------------------------------------------------------

    def _sign(self, rows: Iterable[dict]) -> int:
        c = self.stage.config
        n = 0
        with open(self.spill, "wb") as fh:
            batch: list[dict] = []
            for row in rows:
                batch.append(row)
                if len(batch) >= CHUNK:
                    n = self._sign_batch(batch, n, fh, c)
                    batch = []
            if batch:
                n = self._sign_batch(batch, n, fh, c)
        return n

    def _sign_batch(self, batch: list[dict], first: int, fh, c) -> int:
        offsets = []
        for row in batch:
            offsets.append(fh.tell())
            pickle.dump(row, fh, protocol=pickle.HIGHEST_PROTOCOL)
        sigs, sets = document_signatures((row_text(r) for r in batch), c.num_perm, c.seed, c.ngram, c.char_ngram)
        docs = np.arange(first, first + len(batch), dtype=np.int32)
        self.db.register("batch_docs", pa.table({
            "doc": docs, "id": [str(r["id"]) for r in batch], "off": np.array(offsets, dtype=np.int64),
            "sig": [s.tobytes() for s in sigs], "sh": [s.tobytes() if c.verify else None for s in sets]}))
        self.db.execute("INSERT INTO docs SELECT * FROM batch_docs")
        keyed = ~(sigs == EMPTY).all(axis=1)  # an empty document gets no band keys, as in run()
        keys = band_hashes(sigs[keyed], self.bands, self.rows_per_band)
        self.db.register("batch_bands", pa.table({"doc": np.repeat(docs[keyed], self.bands),
                                                   "key": keys.reshape(-1)}))
        self.db.execute("INSERT INTO bands SELECT * FROM batch_bands")
        self.db.unregister("batch_docs")
        self.db.unregister("batch_bands")
        return first + len(batch)

    # -- rows sharing an id -------------------------------------------------------------------------

    def _repeated_ids(self) -> dict[int, str]:
        """doc -> id for every row that does not stand for its id; their bands are dropped."""
        from .stage import _content_order

        rows = self.db.sql(
            "SELECT id, doc, off, sig, sh FROM docs WHERE id IN (SELECT id FROM docs GROUP BY id HAVING count(*) > 1) "
            "ORDER BY id, doc").to_arrow_reader(CHUNK)
        repeats: dict[int, str] = {}
        records = (rec for chunk in rows for rec in zip(*(col.to_pylist() for col in chunk.columns)))
        with open(self.spill, "rb") as fh:
            for rid, group in groupby(records, key=lambda rec: rec[0]):
                members = []
                for _, doc, off, sig, sh in group:
                    fh.seek(off)
                    row = pickle.load(fh)
                    member = (rid, np.frombuffer(sig, np.uint32), None if sh is None else np.frombuffer(sh, np.uint32))
                    members.append(((member_order(member), _content_order(row)), doc))
                members.sort()
                repeats.update((doc, rid) for _, doc in members[1:])
        if repeats:
            self.db.register("repeats", pa.table({"doc": np.fromiter(repeats, dtype=np.int32)}))
            self.db.execute("DELETE FROM bands WHERE doc IN (SELECT doc FROM repeats)")
        return repeats

    # -- candidates, edges, clusters ----------------------------------------------------------------

    def _clusters(self, n: int) -> Iterator[tuple[int, str, int]]:
        """(doc, cluster id, cluster size) of every document in a cluster of two or more, by doc."""
        parent = np.arange(n, dtype=np.int64)
        self.db.execute("CREATE TABLE cand AS SELECT DISTINCT a.doc AS x, b.doc AS y "
                        "FROM bands a JOIN bands b ON a.key = b.key AND a.doc < b.doc")
        self.db.execute("DROP TABLE bands")
        reader = self.db.sql(
            "SELECT c.x, c.y, da.sig, db.sig, da.sh, db.sh FROM cand c "
            "JOIN docs da ON da.doc = c.x JOIN docs db ON db.doc = c.y").to_arrow_reader(CHUNK)
        linked = False
        for chunk in reader:
            for x, y, sig_a, sig_b, sh_a, sh_b in zip(*(col.to_pylist() for col in chunk.columns)):
                a = ("", np.frombuffer(sig_a, np.uint32), None if sh_a is None else np.frombuffer(sh_a, np.uint32))
                b = ("", np.frombuffer(sig_b, np.uint32), None if sh_b is None else np.frombuffer(sh_b, np.uint32))
                if share_band(a[1], b[1], self.bands, self.rows_per_band) and self.stage.is_edge(a, b):
                    _union(parent, x, y)
                    linked = True
        if not linked:
            return
        roots = _roots(parent)
        members = np.flatnonzero(np.bincount(roots, minlength=n)[roots] > 1)
        self.db.register("comp", pa.table({"doc": members.astype(np.int32), "root": roots[members]}))
        reader = self.db.sql(
            "SELECT comp.doc, min(docs.id) OVER (PARTITION BY root), count(*) OVER (PARTITION BY root) "
            "FROM comp JOIN docs USING (doc) ORDER BY comp.doc").to_arrow_reader(CHUNK)
        for chunk in reader:
            yield from zip(*(col.to_pylist() for col in chunk.columns))


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
