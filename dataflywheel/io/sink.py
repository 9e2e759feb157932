"""Atomic sharded writers: a shard appears under its final name complete, or not at all.

``open_shard`` writes through ``fs.atomic_path``: locally a hidden temp file in the target folder,
fsynced and renamed onto the final name; on an object store a local temp file uploaded in one PUT.
If the body raises, nothing appears.
``ShardWriter`` rolls shards every ``rows_per_shard`` rows and keeps each shard's row count and
id checksum, which the commit protocol (``commit.py``) puts in ``_SUCCESS.json``. Readers and
globs skip names starting with "." or "_", so temp files and markers are never read as data.

Formats: jsonl, jsonl.gz, jsonl.zst (one compact UTF-8 JSON object per line; NaN/Infinity are
refused because they are not JSON and our reader rejects them) and parquet (rows buffered per
shard, then one ``pa.Table.from_pylist``; written with page checksums, which iter_parquet
verifies). Parquet stores a struct column with the union of the keys seen in the shard: a dict
without some key comes back with that key set to None.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import zstandard

from ..records import MASK64, row_key
from .fs import atomic_path, join

WRITE_FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")
# Parquet shards are buffered in memory whole: 50k rows of ~2 KB is ~100 MB of Python objects,
# and a few tens of MB compressed on disk, a comfortable Hub shard.
ROWS_PER_SHARD = 50_000
GZIP_LEVEL = 6  # gzip(1)'s default: level 9 is ~2x slower for ~1% smaller files
ZSTD_LEVEL = 3  # zstd's default level

Writer = Callable[[dict], None]


@contextmanager
def open_shard(path: str, fmt: str, schema: Any = None) -> Iterator[Writer]:
    """Context manager yielding ``write(row)``; ``path`` appears only if the body completes.

    ``schema`` (a ``pyarrow.Schema``, parquet only) fixes the column types instead of inferring them.
    """
    if fmt not in WRITE_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(WRITE_FORMATS)}")
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            rows: list[dict] = []
            yield rows.append
            _write_parquet(tmp, rows, schema)
            return
        with open(tmp, "wb") as raw, _compressed(raw, fmt) as out:
            yield lambda row: out.write(json_line(row))


def json_line(row: dict) -> bytes:
    """One JSONL line: compact, UTF-8, no NaN/Infinity (refused with ValueError)."""
    try:
        return (json.dumps(row, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    except ValueError as err:
        raise ValueError(f"row id={row.get('id')!r} cannot be written as JSON: {err}") from None


@contextmanager
def _compressed(raw, fmt: str):
    if fmt == "jsonl":
        yield raw
    elif fmt == "jsonl.gz":
        # filename="" and mtime=0: the header must not carry the temp name or the clock.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) as out:
            yield out
    else:
        with zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(raw, closefd=False) as out:
            yield out


def _write_parquet(path: str, rows: list[dict], schema: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    if schema is None and _has_empty_struct(table.schema):
        # Parquet has no struct without fields: an empty dict ({} options, no scores yet) is
        # written as null and comes back as None.
        table = pa.Table.from_pylist([_empty_dicts_to_none(r) for r in rows])
    pq.write_table(table, path, compression="zstd", write_page_checksum=True)


def _has_empty_struct(schema: Any) -> bool:
    import pyarrow as pa

    def empty(t: Any) -> bool:
        if pa.types.is_struct(t):
            return t.num_fields == 0 or any(empty(t.field(i).type) for i in range(t.num_fields))
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return empty(t.value_type)
        return False

    return any(empty(f.type) for f in schema)


def _empty_dicts_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _empty_dicts_to_none(v) for k, v in value.items()} or None
    if isinstance(value, list):
        return [_empty_dicts_to_none(v) for v in value]
    return value


class ShardWriter:
    """Writes rows into ``<out_dir>/<prefix>-00000.<fmt>``, ``-00001``, ... rolling every ``rows_per_shard``.

    Use as a context manager; ``close()`` returns ``[(path, rows), ...]`` of the finished shards,
    and ``ids[path]`` is a shard's row-id checksum (``stats.checksum``). If the body raises, the
    shard being written is discarded (finished shards stay: each is complete).
    """

    def __init__(
        self, out_dir: str, fmt: str, prefix: str = "part", rows_per_shard: int = ROWS_PER_SHARD, schema: Any = None
    ):
        if fmt not in WRITE_FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(WRITE_FORMATS)}")
        if rows_per_shard < 1:
            raise ValueError("rows_per_shard must be at least 1")
        self.out_dir, self.fmt, self.prefix = out_dir, fmt, prefix
        self.rows_per_shard, self.schema = rows_per_shard, schema
        self.shards: list[tuple[str, int]] = []
        self.ids: dict[str, int] = {}
        self.rows = 0
        self._shard = None  # the open shard's context manager
        self._write: Writer | None = None
        self._path = ""
        self._in_shard = 0
        self._ids = 0

    def write(self, row: dict) -> None:
        if self._write is None:
            path = join(self.out_dir, f"{self.prefix}-{len(self.shards):05d}.{self.fmt}")
            self._shard = open_shard(path, self.fmt, self.schema)
            self._write = self._shard.__enter__()
            self._path = path
        self._write(row)
        self._ids += row_key(row)
        self.rows += 1
        self._in_shard += 1
        if self._in_shard >= self.rows_per_shard:
            self._finish(None, None, None)

    def _finish(self, *exc_info) -> None:
        shard, rows, ids = self._shard, self._in_shard, self._ids & MASK64
        self._shard, self._write, self._in_shard, self._ids = None, None, 0, 0
        if shard is not None:
            shard.__exit__(*exc_info)
            if exc_info[0] is None:
                self.shards.append((self._path, rows))
                self.ids[self._path] = ids

    def close(self) -> list[tuple[str, int]]:
        """Finish the open shard; the finished shards as ``(path, rows)``."""
        self._finish(None, None, None)
        return list(self.shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._finish(exc_type, exc, tb)
