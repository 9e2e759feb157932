"""JSON Lines reader: one JSON object per line, plain / gzip / zstd (sniffed, see compress.py).

Per line, in this order: a UTF-8 byte order mark is stripped (at the start of the file and of any
line, as left by concatenating BOM-prefixed files), a CR before the LF is stripped, blank lines
are skipped, the bytes are decoded as strict UTF-8 (``invalid_utf8``; a line with NUL bytes is
``nul_byte``, or ``invalid_utf8`` when it is UTF-16 text), then parsed as strict JSON:
duplicate keys, NaN/Infinity and non-finite numbers, nesting beyond Python's recursion limit, and
integers over Python's digit limit are refused, as are lone UTF-16 surrogates in strings, and the
top level must be an object. U+2028 / U+2029 / U+0085 inside strings are kept: only b"\\n" ends a line.

Whole-file encodings: a file starting with a UTF-16 byte order mark (FF FE or FE FF) is decoded as
UTF-16 and read like UTF-8 text (line numbers count its LFs); invalid UTF-16 after that is a
file-level ``invalid_utf16`` report. A file with CR-only newlines is split on CR (compress.py).

A bad line is one record-level dead letter (``scope="record"``) at its line; a broken byte stream
(damaged or cut gzip / zstd, trailing garbage, bad UTF-16) is one file-level letter
(``scope="file"``) built by ``compress.split_lines``.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterator
from typing import Any

from .base import RECORD, DeadLetter, snippet
from .compress import MAX_LINE_BYTES, StreamError, iter_bytes, peek, split_lines

UTF8_BOM = codecs.BOM_UTF8
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class LineError(ValueError):
    """A line that is not one valid JSON object; ``reason`` is the stable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def iter_jsonl(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[dict, dict] | DeadLetter]:
    """``({"line": n}, row)`` per JSON object line of ``path``, or a DeadLetter per bad line / broken file."""
    for item in split_lines(_utf16_as_utf8(iter_bytes(path)), path, max_line_bytes):
        if isinstance(item, DeadLetter):
            yield item
            continue
        line_no, raw = item
        if raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            continue
        try:
            row = parse_line(raw)
        except LineError as err:
            yield DeadLetter(path, err.reason, err.detail, line=line_no, snippet=snippet(raw), scope=RECORD)
            continue
        yield {"line": line_no}, row


def parse_line(raw: bytes) -> dict:
    """One JSONL line (no newline) -> dict, or LineError with a reason code."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineError("invalid_utf8", f"not UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}") from None
    if "\x00" in text:
        if _looks_utf16(raw):
            raise LineError("invalid_utf8", "line is UTF-16 text (NUL in every other byte), not UTF-8")
        raise LineError("nul_byte", f"raw NUL byte at column {text.index(chr(0)) + 1}")
    try:
        obj = _DECODER.decode(text)
    except _Refused as err:
        raise LineError(err.reason, err.detail) from None
    except json.JSONDecodeError as err:
        raise LineError("json_syntax", f"{err.msg} (column {err.colno})") from None
    except RecursionError:
        raise LineError("nesting_too_deep", "JSON nested deeper than Python's recursion limit") from None
    except ValueError as err:  # int() over sys.get_int_max_str_digits()
        raise LineError("number_too_large", str(err).split(";")[0]) from None
    if not isinstance(obj, dict):
        raise LineError("not_an_object", f"top-level JSON {_json_type(obj)}, expected an object")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        raise LineError("invalid_unicode", "string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)")
    return obj


class _Refused(Exception):
    """Raised from the decoder hooks; not a ValueError so it is never taken for a number error."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused("duplicate_key", f"key {key!r} appears more than once in an object")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> Any:
    raise _Refused("nonstandard_json", f"{name} is not a JSON value (RFC 8259)")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused("number_too_large", f"number {text[:40]} overflows a 64-bit float")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates, parse_constant=_refuse_constant, parse_float=_finite_float
)


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _looks_utf16(raw: bytes) -> bool:
    """UTF-16 text read as bytes: NULs fill one byte of most code units, never the other."""
    even, odd = raw[0::2].count(0), raw[1::2].count(0)
    many, few = max(even, odd), min(even, odd)
    return few <= 1 and many >= max(4, len(raw) // 8)


def _json_type(obj: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(obj), type(obj).__name__)


def _utf16_as_utf8(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pass the stream through, or transcode it to UTF-8 when it starts with a UTF-16 BOM."""
    head, stream = peek(chunks, 2)
    if not head.startswith(UTF16_BOMS):
        yield from stream
        return
    codec = "utf-16-le" if head.startswith(codecs.BOM_UTF16_LE) else "utf-16-be"
    decoder = codecs.getincrementaldecoder(codec)()
    skip = len(codecs.BOM_UTF16_LE)
    for chunk in stream:
        chunk, skip = chunk[skip:], 0
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as err:  # hand on the good text before the bad code unit, then stop
            good = err.object[: err.start].decode(codec)
            if good:
                yield good.encode("utf-8")
            raise StreamError(
                "invalid_utf16", f"file starts with a UTF-16 BOM but is not valid UTF-16: {err.reason}"
            ) from None
        if text:
            yield text.encode("utf-8")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise StreamError("invalid_utf16", f"UTF-16 file ends inside a character: {err.reason}") from None
