"""Rows spilled to local disk with an embedded DuckDB database beside them: what the whole-dataset
steps use to run in bounded memory (``GlobalStep.run_bounded``).

A step writes each row once to a spill file (pickled: a row comes back exactly as it went in) and
the few facts it decides on (an id, a hash, a score...) to Parquet files, which an in-memory DuckDB
database reads as tables; DuckDB's joins, sorts and window functions honour a memory limit and
spill to their temp folder past it; the step streams its per-row decisions back, ordered by row
number, and merges them with a sequential re-read of the rows. Why DuckDB: an embedded, well-kept
out-of-core engine, so no external sorts of our own.

Everything lives in one folder under ``DATAFLYWHEEL_SPILL`` (default: the system temp folder),
named by the process id and removed when the step ends, successfully or not; a folder whose
process is gone (a killed run) is removed by the next run. A full disk, or a memory budget too
small for DuckDB, fails with one line.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from .errors import UserError

SPILL_ENV = "DATAFLYWHEEL_SPILL"
PREFIX = "dfw-spill-"
ROWS_FILE = "rows.pickle"
CHUNK = 4096  # rows written at once, decisions streamed back at once: a few MB each


def spill_root() -> str:
    return os.environ.get(SPILL_ENV) or tempfile.gettempdir()


def spill_folder() -> str:
    """A new spill folder of this process (named by its pid, so the next run removes it if we are killed)."""
    remove_stale()
    root = spill_root()
    try:
        os.makedirs(root, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)
    except OSError as err:
        raise UserError(f"spill folder {root} ({SPILL_ENV}): cannot create a folder there: {err.strerror}") from None


def remove_stale() -> None:
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


def is_full(err: BaseException | None) -> bool:
    return isinstance(err, OSError) and err.errno == errno.ENOSPC


def disk_full(name: str, folder: str) -> UserError:
    return UserError(f"{name}: the disk under {folder} is full: free space or set {SPILL_ENV}")


class Spill:
    """``with Spill(name, memory_mb) as sp``: ``add`` rows, ``insert`` facts, ``stream`` SQL results,
    ``rows`` / ``row_at`` to read the rows back. Removes its folder on exit."""

    def __init__(self, name: str, memory_mb: int):
        self.name, self.memory_mb = name, memory_mb
        self.n = 0
        self.query = ""  # the last query started: named when DuckDB runs out of memory
        self._parts: dict[str, list[str]] = {}  # table -> its Parquet files
        self._writers: dict[str, Any] = {}  # table -> the ParquetWriter of its open part

    def __enter__(self) -> Spill:
        self.work = spill_folder()
        self._db = None  # connected on the first query: MinHash's spill never makes one
        self.path = os.path.join(self.work, ROWS_FILE)
        self._out = open(self.path, "wb")
        return self

    @property
    def db(self) -> Any:
        if self._db is None:
            import duckdb

            # Facts are written as Parquet files that DuckDB reads as views, never inserted: inserts into
            # a DuckDB table slow down once it passes memory_limit (52 s for the docs and bands of 1M
            # documents, against 3.8 s as Parquet), which made the step slower per row as the corpus grew.
            self._db = duckdb.connect(":memory:")
            for setting in (f"memory_limit='{self.memory_mb}MB'",
                            f"temp_directory='{os.path.join(self.work, 'tmp')}'", "preserve_insertion_order=false"):
                self._db.execute(f"SET {setting}")
        return self._db

    def __exit__(self, kind, err, tb) -> None:
        try:
            self._out.close()  # flushes: on a full disk this fails too
            self._seal()
        except OSError as closing:
            err = err or closing
        finally:
            if self._db is not None:
                self._db.close()
            shutil.rmtree(self.work, ignore_errors=True)
        if is_full(err) or (_is_duckdb(err, "IOException") and "space" in str(err).lower()):
            raise disk_full(self.name, self.work) from None
        if _is_duckdb(err, "OutOfMemoryException"):  # an operator that cannot spill needs more
            raise UserError(f"{self.name}: {self.memory_mb} MB is too little for the out-of-core work "
                            f"({str(err).splitlines()[0]}, in: {self.query[:120]}); raise runner.memory_budget_mb") from None
        if err is not None and kind is None:  # only the close failed
            raise err

    def add(self, rows: list[dict]) -> tuple[int, list[int]]:
        """Write rows to the spill file; (the first one's row number, each one's byte offset)."""
        first, offsets = self.n, []
        for row in rows:
            offsets.append(self._out.tell())
            pickle.dump(row, self._out, protocol=pickle.HIGHEST_PROTOCOL)
        self.n += len(rows)
        return first, offsets

    def insert(self, table: str, data: Any) -> None:
        """Append a pyarrow table to ``table`` (its schema from the first one; an empty one creates it)."""
        import pyarrow.parquet as pq

        if table not in self._writers:
            parts = self._parts.setdefault(table, [])
            parts.append(os.path.join(self.work, f"{table}-{len(parts)}.parquet"))
            self._writers[table] = pq.ParquetWriter(parts[-1], data.schema, compression="none")
        self._writers[table].write_table(data)

    def materialize(self, table: str, sql: str) -> None:
        """``table`` := the result of a query, written as Parquet (out of core, like the facts)."""
        self._seal()
        self.query = sql
        path = os.path.join(self.work, f"{table}.parquet")
        self.db.execute(f"COPY ({sql}) TO '{path}' (FORMAT parquet)")
        self._parts[table] = [path]
        self._view(table)

    def _seal(self) -> None:
        """Close the parts being written and (re)define their tables as views for the next query."""
        for table, writer in self._writers.items():
            writer.close()
            self._view(table)
        self._writers.clear()

    def _view(self, table: str) -> None:
        files = ", ".join(f"'{path}'" for path in self._parts[table])
        self.db.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet([{files}])")

    def value(self, sql: str) -> Any:
        """The one value of a query (fetched to the end: duckdb 2 refuses other work on an unfinished result)."""
        self._seal()
        self.query = sql
        return self.db.execute(sql).fetchall()[0][0]

    def stream(self, sql: str) -> Iterator[tuple]:
        """The rows of a query, fetched in chunks (never the whole result in memory)."""
        self._seal()
        self.query = sql
        for chunk in self.db.sql(sql).to_arrow_reader(CHUNK):
            yield from zip(*(col.to_pylist() for col in chunk.columns))

    def cursor(self) -> Any:
        """A second connection to the database (to read one query while writing facts)."""
        self._seal()
        return self.db.cursor()

    def rows(self) -> Iterator[dict]:
        """Every spilled row, in the order added."""
        self._out.flush()
        with open(self.path, "rb") as fh:
            for _ in range(self.n):
                yield pickle.load(fh)

    def row_at(self, offset: int) -> dict:
        self._out.flush()
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return pickle.load(fh)


def _is_duckdb(err: BaseException | None, kind: str) -> bool:
    """``err`` is DuckDB's exception ``kind`` (checked without importing DuckDB when no query ran)."""
    duckdb = sys.modules.get("duckdb")
    return err is not None and duckdb is not None and isinstance(err, getattr(duckdb, kind))


def keep_as_is(row: dict) -> tuple[dict, None]:
    return row, None


def merge_decisions(rows: Iterator[dict], decided: Iterator[tuple], decide,
                    default=keep_as_is) -> Iterator[tuple[dict, str | None]]:
    """Rows in order, joined with ``decided`` ((row number, ...) sorted by row number, only for the
    rows it names): ``decide(row, *rest)`` for those, ``default(row)`` (kept as is) for the others."""
    ahead = next(decided, None)
    for doc, row in enumerate(rows):
        if ahead is not None and ahead[0] == doc:
            yield decide(row, *ahead[1:])
            ahead = next(decided, None)
        else:
            yield default(row)


# -- the disk a run will need, said before it starts ---------------------------------------------------

SAMPLE_BYTES = 1 << 20  # compressed bytes read from the first input to measure its compression ratio
SAMPLE_CAP = 64 << 20  # most bytes inflated from that sample


def disk_note(steps: list[tuple[str, float]], files: list[str], extra: float = 0.0) -> str | None:
    """One line: about how much local disk the bounded ``steps`` ((name, bytes spilled per input
    byte)) will take under the spill root, and how much is free; None when the input's size cannot
    be estimated. ``extra``: more copies of the input on disk (the local engine's bundle files).
    Every step's spill is counted at the full input (an upper bound: a later step sees fewer rows)."""
    from .progress import human_bytes, input_size

    if not steps or not files:
        return None
    raw = [input_size(f) for f in files]
    ratio = _expansion(files[0])
    if ratio is None or not sum(raw):
        return None
    data = sum(raw) * ratio
    need = data * (sum(factor for _, factor in steps) + extra)
    root = spill_root()
    free = shutil.disk_usage(root).free
    names = ", ".join(name for name, _ in steps)
    line = (f"spill: {names} will need about {human_bytes(need)} of disk under {root} "
            f"(input about {human_bytes(data)} uncompressed); {human_bytes(free)} free")
    if free < need:
        line += f": too little, set {SPILL_ENV} to a folder on a larger disk"
    return line


def _expansion(path: str) -> float | None:
    """Uncompressed bytes per stored byte of one input file (a sample of its head), None when unknown."""
    import zlib

    import zstandard

    from .io import fs

    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open_file(path) as fh:  # the footer's uncompressed sizes over the file's size
                meta = pq.ParquetFile(fh).metadata
            stored = fs.size(path)
            return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) / stored if stored else None
        with fs.open_file(path) as fh:
            head = fh.read(SAMPLE_BYTES)
    except (OSError, ValueError):  # an estimate must never fail a run
        return None
    if not head:
        return None
    out, used = 0, 0
    if head.startswith(b"\x1f\x8b"):
        inflate = zlib.decompressobj(wbits=47)
        out = len(inflate.decompress(head, SAMPLE_CAP))
        used = len(head) - len(inflate.unconsumed_tail)
    elif head.startswith(b"\x28\xb5\x2f\xfd"):
        unzstd = zstandard.ZstdDecompressor().decompressobj()
        while used < len(head) and out < SAMPLE_CAP:  # small slices: a hostile frame cannot blow up
            out += len(unzstd.decompress(head[used:used + 1024]))
            used += 1024
    else:
        return 1.0
    return out / used if used else None

