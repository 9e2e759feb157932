"""Decompressed byte streams with the compression sniffed from magic bytes, and a capped line splitter.

The extension is never trusted: a ``.gz`` file holding plain text is read as plain text, and a
zstd file with any name is decompressed. Gzip and zstd streams are read member by member (frame by
frame) so that concatenated members are all read, zero padding after the last member is ignored,
and anything else after it is reported as a warning once every good byte has been delivered.

Stream failures are raised as ``StreamError`` *after* all bytes decoded before the failure were
yielded; ``split_lines`` turns them into dead letters: the unterminated line at the break is
reported on its own (``records=1``, ``scope="record"``), then one file-level report
(``scope="file"``) that says which lines were read and where reading stopped. How many records
followed the break cannot be known from a broken stream, so that report counts ``records=0`` and
says "row count unknown".

Lines decoded before a corrupt deflate block or a CRC failure were already handed on when the
corruption is found (the CRC sits at the end of the member); the file-level report says so. They
are kept only if they still parse and validate. When a gzip CRC (or length) check fails at the end
of the last member, every byte was decoded and nothing more is in the file, so the last line is
read too; reading still stops at a damaged member when more data follows it.
"""

from __future__ import annotations

import zlib
from collections.abc import Generator, Iterable, Iterator
from itertools import chain

import zstandard

from . import fs
from .base import FILE, UNKNOWN_COUNT, DeadLetter, snippet

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_BYTES = 1 << 16  # compressed bytes per read(); also the most inflated bytes per zlib call
# zstd's decompressobj has no output cap, so it is fed small slices: one zstd block (<= 128 KiB)
# costs >= 3 input bytes, so 1 KiB of input decodes to at most ~42 MiB even for hostile input.
ZSTD_FEED_BYTES = 1 << 10
MAX_LINE_BYTES = 5 * 1024 * 1024  # per-line cap: the bad-input corpus contract (manifest line_cap_bytes)
NEWLINE_SNIFF_BYTES = 1 << 16  # a head this long with CR but no LF marks a classic-Mac (CR-only) file


class StreamError(Exception):
    """The byte stream broke (``fatal``) or carried junk after its end (not fatal)."""

    def __init__(self, reason: str, detail: str, *, fatal: bool = True):
        super().__init__(detail)
        self.reason, self.detail, self.fatal = reason, detail, fatal


def sniff_compression(head: bytes) -> str:
    """Sniffed compression of a file from its first bytes: "gzip", "zstd" or "plain"."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "plain"


def iter_bytes(path: str) -> Iterator[bytes]:
    """Decompressed bytes of ``path`` in chunks; raises StreamError / OSError after the good bytes."""
    with fs.open_file(path) as fh:
        head = fh.read(len(ZSTD_MAGIC))
        kind = sniff_compression(head)
        if kind == "plain":
            yield from (c for c in chain([head], iter(lambda: fh.read(READ_BYTES), b"")) if c)
            return
        member = _gzip_member if kind == "gzip" else _zstd_frame
        magic = GZIP_MAGIC if kind == "gzip" else ZSTD_MAGIC
        data: bytes | None = head
        while data is not None:
            rest = yield from member(fh, data)
            data = _next_member(fh, rest, magic, kind)


def _gzip_member(fh, data: bytes) -> Generator[bytes, None, bytes]:
    """Inflate one gzip member (header and CRC checked by zlib); returns the bytes after it."""
    dobj = zlib.decompressobj(wbits=31)
    while True:
        if not data:
            data = fh.read(READ_BYTES)
            if not data:
                raise StreamError("truncated_stream", "gzip stream ends inside a member: the file was cut short")
        while True:
            before = dobj.copy()  # a failing call loses its output; the copy lets us recover it
            try:
                out = dobj.decompress(data, READ_BYTES)
            except zlib.error as err:
                good, at = _inflate_until_error(before, data)
                yield good
                if "check" in str(err):
                    raise _check_failed(fh, data, at, str(err)) from None
                raise StreamError("corrupt_stream", f"gzip data is corrupt: {err}") from None
            if out:
                yield out
            if dobj.eof:
                return dobj.unused_data
            data = dobj.unconsumed_tail
            if not data and len(out) < READ_BYTES:
                break


def _inflate_until_error(dobj, data: bytes) -> tuple[bytes, int]:
    """Output decodable before a zlib error and the index in ``data`` of the byte that raised it
    (re-fed byte by byte, only on the error path)."""
    parts = []
    view = memoryview(data)
    for i in range(len(view)):
        try:
            parts.append(dobj.decompress(view[i : i + 1]))
        except zlib.error:
            return b"".join(parts), i
    return b"".join(parts), len(view)


def _check_failed(fh, data: bytes, at: int, err: str) -> StreamError:
    """The error for a failed gzip trailer check: the member's data all decoded, its CRC32 (or
    length) does not match. zlib raises on the last CRC byte (4 length bytes follow) or on the last
    length byte, so the member's end is known: a warning when nothing but zero padding follows it,
    else fatal (reading stops at the damaged member)."""
    which = "CRC32" if "data check" in err else "length"
    end = at + 1 + (4 if which == "CRC32" else 0)
    detail = f"gzip {which} check failed at the end of a member ({err}): its data decoded, maybe not as written"
    start = fh.tell() - len(data) + end  # data is always the tail of what was read so far
    if end > len(data):  # the length field continues in the next read
        fh.read(end - len(data))
    try:
        follows = _next_member(fh, data[end:], GZIP_MAGIC, "gzip") is not None
    except StreamError:  # junk after the damaged member
        follows = True
    if not follows:
        return StreamError("crc_mismatch", detail + "; nothing follows that member", fatal=False)
    size = fh.seek(0, 2) - start
    return StreamError("crc_mismatch", detail + f"; the {size} bytes after it (from byte {start}) are not read")


def _zstd_frame(fh, data: bytes) -> Generator[bytes, None, bytes]:
    """Decompress one zstd frame; returns the bytes after it."""
    dobj = zstandard.ZstdDecompressor().decompressobj()
    while True:
        if not data:
            data = fh.read(READ_BYTES)
            if not data:
                raise StreamError("truncated_stream", "zstd stream ends inside a frame: the file was cut short")
        for start in range(0, len(data), ZSTD_FEED_BYTES):
            try:
                out = dobj.decompress(data[start : start + ZSTD_FEED_BYTES])
            except zstandard.ZstdError as err:
                if "checksum" in str(err):
                    raise StreamError(
                        "crc_mismatch",
                        f"zstd frame checksum failed ({err}): its data decoded, maybe not as written; "
                        "whatever follows the frame, if anything, is not read",
                    ) from None
                raise StreamError("corrupt_stream", f"zstd data is corrupt: {err}") from None
            if out:
                yield out
            if dobj.eof:
                return dobj.unused_data + data[start + ZSTD_FEED_BYTES :]
        data = b""


def _next_member(fh, rest: bytes, magic: bytes, kind: str) -> bytes | None:
    """First bytes of the next member, or None at a clean end (zero padding allowed)."""
    while len(rest) < len(magic):
        more = fh.read(READ_BYTES)
        if not more:
            break
        rest += more
    if not rest:
        return None
    if rest.startswith(magic):
        return rest
    start = fh.tell() - len(rest)
    while not rest.strip(b"\0"):  # tape/block padding: gzip(1) ignores it too
        rest = fh.read(READ_BYTES)
        if not rest:
            return None
    size = fh.seek(0, 2) - start
    raise StreamError(
        "trailing_garbage",
        f"{size} bytes after the last {kind} member (from byte {start}) are not {kind} data: ignored",
        fatal=False,
    )


def peek(chunks: Iterable[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``size`` bytes (fewer at EOF) and an iterator over the whole stream, head included.

    An error met while reading the head is raised by the returned iterator after the head.
    """
    it = iter(chunks)
    head = []
    got = 0
    error: Exception | None = None
    try:
        for chunk in it:
            head.append(chunk)
            got += len(chunk)
            if got >= size:
                break
    except (StreamError, OSError) as err:
        error = err
    joined = b"".join(head)
    return joined[:size], _resume(joined, it, error)


def _resume(head: bytes, rest: Iterator[bytes], error: Exception | None) -> Iterator[bytes]:
    if head:
        yield head
    if error is not None:
        raise error
    yield from rest


def split_lines(
    chunks: Iterable[bytes], source: str, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes] | DeadLetter]:
    """``(line_number, line)`` without its newline, 1-based, counted on LF, or a DeadLetter.

    A line longer than ``max_line_bytes`` is reported (``line_too_long``) as soon as the cap is
    passed and skipped to its end without being buffered. A file whose first 64 KiB hold CR but no
    LF uses classic-Mac newlines: it is split, and lines counted, on CR. Stream errors raised by
    ``chunks`` become dead letters (see the module docstring).
    """
    line_no = 0
    pending: list[bytes] = []
    pending_len = 0
    skipping = False  # inside an over-long line: drop bytes until its newline
    error: StreamError | None = None
    try:
        head, stream = peek(chunks, NEWLINE_SNIFF_BYTES)
        sep = b"\r" if b"\r" in head and b"\n" not in head else b"\n"
        for chunk in stream:
            pieces = chunk.split(sep)
            for piece in pieces[:-1]:
                line_no += 1
                if skipping:
                    skipping = False
                elif pending_len + len(piece) > max_line_bytes:
                    yield _too_long(source, line_no, pending[0] if pending else piece, max_line_bytes)
                else:
                    yield line_no, (b"".join(pending) + piece) if pending else piece
                pending, pending_len = [], 0
            tail = pieces[-1]
            if skipping or not tail:
                continue
            pending.append(tail)
            pending_len += len(tail)
            if pending_len > max_line_bytes:
                yield _too_long(source, line_no + 1, pending[0], max_line_bytes)
                pending, pending_len, skipping = [], 0, True
    except StreamError as err:
        error = err
    except OSError as err:
        error = StreamError("file_unreadable", f"cannot read the file: {err}")
    complete = line_no
    if pending and (error is None or not error.fatal):
        line_no += 1
        yield line_no, b"".join(pending)
    elif pending:
        line_no += 1
        reason = "lost_in_truncation" if error.reason == "truncated_stream" else "after_corruption"
        yield DeadLetter(
            source,
            reason,
            f"line cut off by a broken stream ({error.reason})",
            line=line_no,
            snippet=snippet(pending[0]),
        )
    if error is None:
        return
    cut = "pending" if line_no > complete and error.fatal else "skipping" if skipping else None
    detail = _stream_detail(error, complete if error.fatal else line_no, cut)
    yield DeadLetter(source, error.reason, detail, records=0, scope=FILE)


def _stream_detail(error: StreamError, lines: int, cut: str | None) -> str:
    """What a file-level stream report says: the damage, which lines were read, where reading stopped."""
    def read(when: str = "") -> str:
        if not lines:
            return "no complete line was read"
        return (f"lines 1-{lines} were read{when} (kept if they validate)" if lines > 1
                else f"line 1 was read{when} (kept if it validates)")

    if not error.fatal:
        if error.reason == "trailing_garbage":
            return f"{error.detail}; all {lines} lines before them were read"
        return (
            f"{error.detail}; {read()}; as the data fails its check, it may hold more or fewer lines than "
            f"were written: {UNKNOWN_COUNT}"
        )
    if error.reason == "file_unreadable" and not lines and cut is None:
        return f"{error.detail}; {UNKNOWN_COUNT}"
    where = f"after line {lines}" if lines else "inside line 1" if cut else "before any line"
    if cut == "pending":
        where += f" (line {lines + 1} is cut off: reported on its own)"
    elif cut == "skipping":
        where += f" (line {lines + 1}, over the line cap, was reported as line_too_long)"
    return f"{error.detail}; the stream breaks {where}; {read(' before the break')}; nothing after it can be read: {UNKNOWN_COUNT}"


def _too_long(source: str, line_no: int, start: bytes, cap: int) -> DeadLetter:
    return DeadLetter(
        source, "line_too_long", f"line longer than the {cap}-byte cap: skipped", line=line_no, snippet=snippet(start)
    )
