"""Parquet reader: streams one row group at a time, with page CRC32 checksums verified.

A page that fails its checksum (or cannot be decoded) fails only the rest of its row group: those
rows are reported one by one with their row numbers and the other row groups are read. A file
whose footer cannot be read (truncated, bad footer length, not Parquet) is one file-level report;
its row count is unknown then, so it counts ``records=1``. A 0-byte file is a warning (0 rows).

Rows come out as JSON-compatible dicts: maps become dicts, timestamps/dates/times ISO-8601
strings, durations seconds, decimals strings (exact), binary values base64 strings.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .base import DeadLetter

BATCH_ROWS = 1024  # rows turned into dicts at once: a few MB of text, so memory stays flat
PARQUET_MAGIC = b"PAR1"
ARROW_ERRORS = (OSError, pa.ArrowException, ValueError)  # what pyarrow raises for bad bytes


def iter_parquet(
    path: str, columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[dict, dict] | DeadLetter]:
    """``({"row": i}, row)`` per row of ``path`` (0-based), or DeadLetters for unreadable parts."""
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except ARROW_ERRORS as err:
        yield _file_report(path, err)
        return
    with pf:
        names = pf.schema_arrow.names
        missing = [c for c in columns or () if c not in names]
        if missing:
            detail = f"no column {missing[0]!r} (columns: {', '.join(names)})"
            yield DeadLetter(path, "missing_field", detail, records=pf.metadata.num_rows)
            return
        schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
        convert = row_converter(schema)
        first = 0
        for group in range(pf.num_row_groups):
            size = pf.metadata.row_group(group).num_rows
            done = 0
            try:
                batches = pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
                for batch in batches:
                    rows = batch_rows_as_dicts(batch, convert)
                    for i, row in enumerate(rows):
                        yield {"row": first + done + i}, row
                    done += len(rows)
            except ARROW_ERRORS as err:
                reason = "page_checksum_mismatch" if "checksum" in str(err).lower() else "corrupt_row_group"
                detail = f"row group {group} unreadable: {err}"
                for row_no in range(first + done, first + size):
                    yield DeadLetter(path, reason, detail, row=row_no)
            first += size


def batch_rows_as_dicts(batch: pa.RecordBatch, convert: Callable[[Any], Any] | None) -> list[dict]:
    """A record batch as JSON-compatible row dicts (``convert`` from ``row_converter``)."""
    rows = batch.to_pylist(maps_as_pydicts="strict")
    return [convert(row) for row in rows] if convert else rows


def row_converter(schema: pa.Schema) -> Callable[[Any], Any] | None:
    """A function making rows of ``schema`` JSON-compatible, or None when they already are."""
    if not any(_needs_conversion(field.type) for field in schema):
        return None
    return _jsonable


def _needs_conversion(typ: pa.DataType) -> bool:
    if pa.types.is_temporal(typ) or pa.types.is_decimal(typ) or _is_binary(typ):
        return True
    if pa.types.is_dictionary(typ):
        return _needs_conversion(typ.value_type)
    return any(_needs_conversion(typ.field(i).type) for i in range(typ.num_fields))


def _is_binary(typ: pa.DataType) -> bool:
    return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


def _file_report(path: str, err: Exception) -> DeadLetter:
    """One report for a file whose footer cannot be read; names what the bytes look like."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as os_err:
        return DeadLetter(path, "file_unreadable", f"cannot read the file: {os_err}")
    if size == 0:
        return DeadLetter(path, "empty_file", "0-byte file: no Parquet data, no rows", records=0)
    hint = ""
    if not head.startswith(PARQUET_MAGIC):
        looks_json = head.lstrip()[:1] in (b"{", b"[")
        hint = " (the file does not start with 'PAR1'" + ("; it looks like JSON text)" if looks_json else ")")
    return DeadLetter(path, "file_unreadable", f"not a readable Parquet file: {err}{hint}; row count unknown")
