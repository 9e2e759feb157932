"""Parquet reader: streams one row group at a time, with page CRC32 checksums verified.

A page that fails its checksum (or cannot be decoded) fails only the rest of its row group: those
rows are reported one by one with their row numbers and the other row groups are read. A file
pyarrow cannot open is one file-level report (``scope="file"``). Its row count lives in the footer:
when the footer's Thrift ``FileMetaData`` still parses (here, without pyarrow: e.g. a damaged
``ARROW:schema`` entry makes pyarrow refuse a file whose footer is intact), the report stands for
that many rows; when the footer is gone (truncated file, bad footer length, not Parquet) it counts
``records=0`` and says "row count unknown". A 0-byte file is a warning (0 rows).

Rows come out as JSON-compatible dicts: maps become dicts, timestamps/dates/times ISO-8601
strings, durations seconds, decimals strings (exact), binary values base64 strings.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import fs
from .base import FILE, UNKNOWN_COUNT, DeadLetter

BATCH_ROWS = 1024  # rows turned into dicts at once: a few MB of text, so memory stays flat
PARQUET_MAGIC = b"PAR1"
ARROW_ERRORS = (OSError, pa.ArrowException, ValueError)  # what pyarrow raises for bad bytes


def iter_parquet(
    path: str, columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[dict, dict] | DeadLetter]:
    """``({"row": i}, row)`` per row of ``path`` (0-based), or DeadLetters for unreadable parts."""
    # A remote file is read through our filesystem layer (pyarrow's own gs:// / s3:// would bypass
    # its credentials and endpoints); pyarrow reads the footer, then one row group at a time.
    source = fs.open_file(path) if fs.is_remote(path) else path
    try:
        pf = pq.ParquetFile(source, page_checksum_verification=True)
    except ARROW_ERRORS as err:
        if not isinstance(source, str):
            source.close()
        yield _file_report(path, err)
        return
    with pf, (source if not isinstance(source, str) else nullcontext()):
        total = pf.metadata.num_rows
        first = 0  # rows before the current row group: all yielded or reported
        try:
            names = pf.schema_arrow.names
            missing = [c for c in columns or () if c not in names]
            if missing:
                detail = f"no column {missing[0]!r} (columns: {', '.join(names)}); all {total} rows of the file"
                yield DeadLetter(path, "missing_field", detail, records=total, scope=FILE)
                return
            schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
            convert = row_converter(schema)
            for group in range(pf.num_row_groups):
                size = pf.metadata.row_group(group).num_rows
                yield from _row_group(pf, path, group, first, size, columns, batch_rows, convert)
                first += size
        except ARROW_ERRORS as err:  # the footer was read, the schema or row-group layout was not
            rows = f"rows {first}-{total - 1}" if total - first > 1 else f"row {first}"
            detail = f"the footer says {total} rows, but the file cannot be read from row {first} on: {err}"
            yield DeadLetter(path, "file_unreadable", f"{detail}; {rows} lost", records=total - first, scope=FILE)


def _row_group(pf, path: str, group: int, first: int, size: int, columns, batch_rows: int, convert) -> Iterator:
    """The rows of one row group; a failure reports its remaining rows one by one (row numbers known)."""
    done = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
            rows = batch_rows_as_dicts(batch, convert)
            for i, row in enumerate(rows):
                yield {"row": first + done + i}, row
            done += len(rows)
    except ARROW_ERRORS as err:
        reason = "page_checksum_mismatch" if "checksum" in str(err).lower() else "corrupt_row_group"
        detail = f"row group {group} unreadable: {err}"
        for row_no in range(first + done, first + size):
            yield DeadLetter(path, reason, detail, row=row_no)


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
    """One report for a file pyarrow cannot open; names what the bytes look like and, when the
    footer still parses, stands for its row count."""
    try:
        size = fs.size(path)
        with fs.open_file(path) as fh:
            head = fh.read(64)
    except OSError as os_err:
        return DeadLetter(path, "file_unreadable", f"cannot read the file: {os_err}; {UNKNOWN_COUNT}", records=0,
                          scope=FILE)
    if size == 0:
        return DeadLetter(path, "empty_file", "0-byte file: no Parquet data, no rows", records=0, scope=FILE)
    hint = ""
    if not head.startswith(PARQUET_MAGIC):
        looks_json = head.lstrip()[:1] in (b"{", b"[")
        hint = " (the file does not start with 'PAR1'" + ("; it looks like JSON text)" if looks_json else ")")
    rows = footer_num_rows(path)
    if rows is None:
        return DeadLetter(
            path, "file_unreadable", f"not a readable Parquet file: {err}{hint}; no readable footer: {UNKNOWN_COUNT}",
            records=0, scope=FILE,
        )
    detail = f"not a readable Parquet file: {err}{hint}; its footer says {rows} rows, none of which can be read"
    return DeadLetter(path, "file_unreadable", detail, records=rows, scope=FILE)


def footer_num_rows(path: str) -> int | None:
    """``num_rows`` of the file's footer (Thrift compact ``FileMetaData`` field 3), read without
    pyarrow; None when the footer is missing or does not parse."""
    try:
        with fs.open_file(path) as fh:
            end = fh.seek(0, 2)
            if end < 12:
                return None
            fh.seek(end - 8)
            tail = fh.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != PARQUET_MAGIC or not 0 < length <= end - 12 or length > MAX_FOOTER_BYTES:
                return None
            fh.seek(end - 8 - length)
            footer = fh.read(length)
    except OSError:
        return None
    try:
        rows = _CompactReader(footer).num_rows()
    except (IndexError, ValueError):
        return None
    return rows if isinstance(rows, int) and rows >= 0 else None


MAX_FOOTER_BYTES = 64 * 2**20  # a footer claiming more is damage, not metadata (pyarrow's own cap is larger)


class _CompactReader:
    """Just enough of Thrift's compact protocol to read a Parquet footer's row counts."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def _byte(self) -> int:
        value = self.data[self.pos]  # IndexError past the end: the footer is cut
        self.pos += 1
        return value

    def _varint(self) -> int:
        shift = result = 0
        while True:
            b = self._byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise ValueError("varint too long")

    def _zigzag(self) -> int:
        n = self._varint()
        return (n >> 1) ^ -(n & 1)

    def num_rows(self) -> int | None:
        """``FileMetaData.num_rows`` (field 3), trusted only when it equals the sum of its row
        groups' ``num_rows`` (field 4: list<RowGroup>, whose field 3 is the group's rows)."""
        total, groups = None, None
        for field, kind in self._fields():
            if field == 3 and kind == 6:
                total = self._zigzag()
            elif field == 4 and kind == 9:
                header = self._byte()
                size, elem = header >> 4, header & 0x0F
                if size == 15:
                    size = self._varint()
                if elem != 12:
                    return None
                groups = [self._struct_int(3) for _ in range(size)]
            else:
                self._skip(kind)
        if total is None or groups is None or None in groups or sum(groups) != total:
            return None
        return total

    def _fields(self) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of the struct at the current position, up to its STOP;
        the caller reads or skips each value before asking for the next."""
        field = 0
        while True:
            header = self._byte()
            kind = header & 0x0F
            if kind == 0:  # STOP
                return
            delta = header >> 4
            field = field + delta if delta else self._zigzag()
            yield field, kind

    def _struct_int(self, wanted: int) -> int | None:
        """The integer field ``wanted`` of the struct at the current position (read to its end)."""
        value = None
        for field, kind in self._fields():
            if field == wanted and kind in (4, 5, 6):
                value = self._zigzag()
            else:
                self._skip(kind)
        return value

    def _skip(self, kind: int, depth: int = 0) -> None:
        if depth > 64:
            raise ValueError("nesting too deep")
        if kind in (1, 2):  # bool: the value is in the type nibble
            return
        if kind == 3:
            self.pos += 1
        elif kind in (4, 5, 6):
            self._varint()
        elif kind == 7:
            self.pos += 8
        elif kind == 8:
            length = self._varint()  # read first: ``self.pos += self._varint()`` would lose the varint's bytes
            self.pos += length
        elif kind in (9, 10):  # list / set: size and element type in one byte (size 15: varint follows)
            header = self._byte()
            size, elem = header >> 4, header & 0x0F
            if size == 15:
                size = self._varint()
            for _ in range(size):
                self._element(elem, depth + 1)
        elif kind == 11:  # map: size, then key and value types in one byte
            size = self._varint()
            if size:
                types = self._byte()
                for _ in range(size):
                    self._element(types >> 4, depth + 1)
                    self._element(types & 0x0F, depth + 1)
        elif kind == 12:
            self._skip_struct(depth + 1)
        else:
            raise ValueError(f"unknown compact type {kind}")
        if self.pos > len(self.data):
            raise IndexError("footer ends inside a value")

    def _element(self, kind: int, depth: int) -> None:
        """A container element: a bool takes one byte here (so every element consumes input)."""
        if kind in (1, 2):
            self._byte()
        else:
            self._skip(kind, depth)

    def _skip_struct(self, depth: int) -> None:
        for _, kind in self._fields():
            self._skip(kind, depth)
