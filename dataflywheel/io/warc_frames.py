"""Splitting a WARC / ARC byte stream into records without trusting Content-Length.

Each declared length is checked against where the next record really starts (line breaks, then
``WARC/`` or EOF); on a mismatch the reader re-synchronises on the next ``WARC/x.y`` line or gzip
member, so one lying record costs one dead letter. Gzip is read one member at a time, so a damaged
member costs only its own records. At most ``limit`` bytes plus a read chunk are buffered. The
record-to-document step is in ``warc.py``.
"""

from __future__ import annotations

import collections
import re
import zlib
from collections.abc import Iterator

from . import fs, html
from .base import FILE, RECORD, UNKNOWN_COUNT, DeadLetter, snippet

DOCUMENT_TYPES = ("response", "resource")  # WARC-Type values that can hold a page (ARC records count as response)
READ_CHUNK = 1 << 20
_WARC_START = re.compile(rb"\nWARC/\d\.\d{1,2}\r?\n")
_GZIP_MAGIC = b"\x1f\x8b\x08"
_UNSUPPORTED = {b"\x28\xb5\x2f\xfd": "zstd", b"\x5d\x2a\x4d\x18": "zstd (dictionary)", b"BZh": "bzip2",
                b"\xfd7zXZ": "xz"}




class Stream:
    """Decoded bytes of the input, buffered; gzip members decoded one by one so damage stays local."""

    def __init__(self, fh, codec: str):
        self.fh, self.codec = fh, codec
        self.buf = bytearray()
        self.pos = 0  # decoded offset of buf[0]
        self.eof = False
        self.members: collections.deque = collections.deque()  # (decoded, compressed) member starts
        self.gaps: list[tuple[int, str, int]] = []  # (decoded offset, detail, compressed offset) of damage
        self.warnings: list[tuple[str, str, int]] = []
        self._z = None
        self._cin, self._cpos, self._member = b"", 0, 0

    def fill(self, n: int) -> bool:
        """Buffer at least n bytes; False when the input ends first."""
        while len(self.buf) < n and not self.eof:
            self._more()
        return len(self.buf) >= n

    def drop(self, n: int) -> None:
        del self.buf[:n]
        self.pos += n

    def _more(self) -> None:
        if self.codec != "gzip":
            try:
                data = self.fh.read(READ_CHUNK)
            except OSError as err:  # a damaged LZ4 frame: nothing after it can be decoded
                self.gaps.append((self.pos + len(self.buf), f"the stream is damaged at decoded byte "
                                  f"{self.pos + len(self.buf)} ({type(err).__name__}: {err}); nothing after it "
                                  "can be decoded", self.pos + len(self.buf)))
                data = b""
            self.eof = not data
            self.buf += data
            return
        if not self._cin:
            self._cin = self.fh.read(READ_CHUNK)
            if not self._cin:
                self.eof = True
                if self._z is not None:  # the file stops inside a member: keep what decodes
                    self.buf += self._z.flush()
                    self.warnings.append(("truncated_stream", f"gzip data ends inside the member at byte {self._member}: "
                                          "the file was cut short; every record that ends before the cut was "
                                          "read, a record it cuts is reported on its own; what followed the cut "
                                          f"is not in the file: {UNKNOWN_COUNT}", self._member))
                return
        if self._z is None and not self._start_member():
            return
        try:
            out = self._z.decompress(self._cin, 4 * READ_CHUNK)
        except zlib.error as err:  # drop the member's output, go on with the next member
            self.gaps.append((self.members[-1][0], f"gzip member at byte {self._member} is damaged: {err}",
                              self._member))
            del self.buf[max(self.members[-1][0] - self.pos, 0):]
            self.members.pop()
            self._z = None
            self.fh.seek(self._member + 1)
            self._cin, self._cpos = b"", self._member + 1
            self._skip_to_member()
            return
        rest = self._z.unused_data if self._z.eof else self._z.unconsumed_tail
        if self._z.eof:
            self._z = None
        self._cpos += len(self._cin) - len(rest)
        self._cin = rest
        self.buf += out

    def _start_member(self) -> bool:
        while len(self._cin) < 3 and (more := self.fh.read(READ_CHUNK)):
            self._cin += more
        if self._cin and len(self._cin) < len(_GZIP_MAGIC) and _GZIP_MAGIC.startswith(self._cin):
            self.warnings.append(("truncated_stream", f"the file ends inside the gzip header at byte {self._cpos}: "
                                  "it was cut short; every record before it was read; what followed the cut is "
                                  f"not in the file: {UNKNOWN_COUNT}", self._cpos))
            self._cpos, self._cin, self.eof = self._cpos + len(self._cin), b"", True
            return False
        if not self._cin.startswith(_GZIP_MAGIC):
            start = self._cpos
            junk = self._skip_to_member()  # zero padding after the last member is normal (tape blocks)
            if junk:
                self.warnings.append(("trailing_garbage", f"{junk} bytes from byte {start} on are not gzip data: "
                                      "skipped; every record before them was read", start))
            return False
        self.members.append((self.pos + len(self.buf), self._cpos))
        self._member = self._cpos
        self._z = zlib.decompressobj(31)
        return True

    def _skip_to_member(self) -> int:
        """Drop compressed bytes up to the next gzip magic (or EOF); returns how many non-zero were dropped."""
        junk = 0
        while True:
            i = self._cin.find(_GZIP_MAGIC)
            cut = i if i >= 0 else max(len(self._cin) - 2, 0)  # a magic may straddle two reads
            junk += cut - self._cin[:cut].count(0)
            self._cpos, self._cin = self._cpos + cut, self._cin[cut:]
            if i >= 0:
                return junk
            more = self.fh.read(READ_CHUNK)
            if not more:
                junk += len(self._cin) - self._cin.count(0)
                self._cpos, self._cin = self._cpos + len(self._cin), b""
                return junk
            self._cin += more


def member_start_at(st: Stream, decoded: int) -> int | None:
    while len(st.members) > 1 and st.members[1][0] <= decoded:
        st.members.popleft()
    if st.members and st.members[0][0] == decoded:
        return st.members[0][1]
    return None


def _is_start(st: Stream, i: int, arc_tail: int | None) -> bool:
    """Does a record header start at buffer index i?"""
    if arc_tail is None:
        return bool(re.match(rb"WARC/\d\.\d{1,2}\r?\n", st.buf[i:i + 16]))
    st.fill(i + html.MAX_HEADER_BYTES)
    eol = st.buf.find(b"\n", i, i + html.MAX_HEADER_BYTES)
    line = bytes(st.buf[i:eol if eol >= 0 else len(st.buf)])
    return any(_arc_fields(line, tail) for tail in (arc_tail, 4, 9))


def _find_next(st: Stream, frm: int, arc_tail: int | None, limit: int) -> int | None:
    """Buffer index of the next record start after ``frm``, reading on (and dropping scanned bytes
    past ``limit``); None at end of input."""
    while True:
        hits = []
        if arc_tail is None:
            m = _WARC_START.search(st.buf, frm)
            hits.append(m.start() + 1 if m else None)
        else:
            i = frm
            while (i := st.buf.find(b"\n", i)) >= 0 and i + 1 < len(st.buf):
                if _is_start(st, i + 1, arc_tail):
                    hits.append(i + 1)
                    break
                i += 1
        hits += [d - st.pos for d, _ in st.members if d - st.pos > frm and st.buf.startswith(b"WARC/", d - st.pos)]
        hits = [h for h in hits if h is not None]
        if hits:
            return min(hits)
        if st.eof:
            return None
        if len(st.buf) > limit:  # keep memory flat while scanning a long stretch of junk
            cut = len(st.buf) - 16
            st.drop(cut)
            frm = 0
        else:
            frm = max(len(st.buf) - 16, frm)
        st.fill(len(st.buf) + READ_CHUNK)


def _boundary(st: Stream, i: int, arc_tail: int | None) -> int | None:
    """If a record's block really ends at buffer index i: the index of what follows, else None.

    The spec wants exactly CRLF CRLF then ``WARC/`` or EOF; any short run of line breaks is accepted
    (some writers add or drop one), since the next record's start is what proves the length right."""
    st.fill(i + 40)
    j = i
    while j < len(st.buf) and j - i < 32 and st.buf[j] in b"\r\n":
        j += 1
    if j == i and not (i == len(st.buf) and st.eof):  # a block ending exactly at EOF is complete
        return None
    st.fill(j + 16)
    if (j == len(st.buf) and st.eof) or _is_start(st, j, arc_tail):
        return j
    if _cut_header(st, j, arc_tail is not None):  # the file was cut inside the next record's header
        return j
    return None


def _cut_header(st: Stream, i: int, arc: bool) -> bool:
    """Does the input end inside a record header that starts at buffer index i (a cut file, not junk)?

    Only a short tail at EOF counts: for WARC the start of a ``WARC/`` header without its blank
    line, for ARC a first line without its newline."""
    st.fill(i + html.MAX_HEADER_BYTES)
    tail = bytes(st.buf[i:])
    if not st.eof or not tail or len(tail) >= html.MAX_HEADER_BYTES:
        return False
    if arc:
        return b"\n" not in tail and tail[:1].isalpha()
    return b"WARC/".startswith(tail) or (tail.startswith(b"WARC/") and not html.BLANK_LINE.search(tail))


def _warc_header(st: Stream) -> tuple[int, dict] | None:
    st.fill(html.MAX_HEADER_BYTES)
    m = html.BLANK_LINE.search(st.buf, 0, html.MAX_HEADER_BYTES)
    if m is None:
        return None
    lines = bytes(st.buf[:m.start()]).decode("utf-8", "replace").split("\n")
    return m.end(), {"version": lines[0].strip(), **html.header_fields(lines[1:])}


def _arc_fields(line: bytes, tail: int) -> dict | None:
    """Header fields of an ARC record line: URL (may hold spaces), then 4 (v1) or 9 (v2) fields."""
    parts = line.decode("utf-8", "replace").rstrip("\r").split(" ")
    if len(parts) < tail + 1 or ":" not in parts[0]:
        return None
    url, date = " ".join(parts[:-tail]), parts[-tail + 1]
    if not (date.isdigit() and 8 <= len(date) <= 18):
        return None
    iso = f"{date[:4]}-{date[4:6]}-{date[6:8]}T{date[8:10] or '00'}:{date[10:12] or '00'}:{date[12:14] or '00'}Z"
    return {"version": "ARC", "warc-type": "filedesc" if url.startswith("filedesc:") else "response",
            "warc-target-uri": url, "warc-date": iso, "content-type": parts[-tail + 2], "content-length": parts[-1]}


def _arc_header(st: Stream, tail: int) -> tuple[int, dict] | None:
    st.fill(html.MAX_HEADER_BYTES)
    eol = st.buf.find(b"\n", 0, html.MAX_HEADER_BYTES)
    fields = _arc_fields(bytes(st.buf[:eol]), tail) if eol >= 0 else None
    return (eol + 1, fields) if fields else None


def frames(st: Stream, path: str, arc: bool, limit: int) -> Iterator[tuple | DeadLetter]:
    """``(start, headers, block)`` per well-framed record, a DeadLetter (offset = decoded start) per bad one."""
    arc_tail = 4 if arc else None  # fields after the URL on an ARC line: 4 in v1, 9 in v2

    def dead(reason: str, detail: str, records: int = 1, offset: int | None = None, scope: str = RECORD) -> DeadLetter:
        return DeadLetter(path, reason, detail, offset=start if offset is None else offset, records=records,
                          snippet=first if records else None, scope=scope)

    while True:
        for _, detail, compressed in st.gaps:
            first = None
            yield dead("corrupt_compression", f"{detail}; the records not yet read from it are lost: {UNKNOWN_COUNT}",
                       0, compressed, FILE)
        st.gaps.clear()
        while st.fill(1) and st.buf[0] in b" \t\r\n\0":  # stray line breaks or NUL padding between records
            st.drop(len(st.buf) - len(st.buf.lstrip(b" \t\r\n\0")))
        if not st.buf:
            return
        start, first = st.pos, snippet(bytes(st.buf[:120]))
        head = _arc_header(st, arc_tail) if arc else (_warc_header(st) if st.buf.startswith(b"WARC/") else None)
        if head is None:
            if _cut_header(st, 0, arc):
                yield dead("truncated", "the file ends inside the record's header")
            else:
                yield dead("invalid_header", "no valid record header here")
            _resync(st, 0, arc_tail, limit)
            continue
        end, headers = head
        length = headers.get("content-length")
        if length is None or not length.isdigit():
            yield dead(*(("missing_content_length", "no Content-Length header") if length is None
                         else ("invalid_content_length", f"Content-Length {length!r}")))
            _resync(st, end - 1, arc_tail, limit)
            continue
        n = int(length)
        if n > limit:  # not buffered: skip to the next record start (scanning, so a lying length loses nothing)
            if headers.get("warc-type", "").strip().lower() in DOCUMENT_TYPES:
                yield dead("too_large", f"block of {n} bytes exceeds max_record_bytes={limit}")
            else:
                yield start, headers, b""  # not a document anyway: counted as skipped, never buffered
            _resync(st, end - 1, arc_tail, limit)
            continue
        complete = st.fill(end + n)
        after = _boundary(st, end + n, arc_tail) if complete else None
        if after is not None:
            block = bytes(st.buf[end:end + n])
            if headers.get("warc-type") == "filedesc":
                arc_tail = 9 if block[:2] == b"2 " else 4
            yield start, headers, block
            st.drop(after)
            continue
        have = st.pos + len(st.buf) - start - end
        nxt = _resync(st, end - 1, arc_tail, limit)
        if nxt is None and not complete:
            yield dead("truncated", f"declared {n} bytes but the file ends after {have}")
        else:
            where = "no record follows" if nxt is None else f"the next record starts after {nxt - start - end}"
            yield dead("content_length_mismatch", f"declared {n} bytes, {where}")


def _resync(st: Stream, frm: int, arc_tail: int | None, limit: int) -> int | None:
    """Move to the next record start after buffer index ``frm``; its decoded offset, or None at EOF."""
    nxt = _find_next(st, frm, arc_tail, limit)
    st.drop(len(st.buf) if nxt is None else nxt)
    return None if nxt is None else st.pos


def open_archive(path: str):
    """(decoded-or-raw file object, codec); ValueError for a compression we do not read."""
    fh = fs.open_file(path)
    magic = fh.read(6)
    fh.seek(0)
    for prefix, name in _UNSUPPORTED.items():
        if magic.startswith(prefix):
            fh.close()
            raise ValueError(f"{name} compression is not supported; recompress with gzip")
    if magic.startswith(b"\x04\x22\x4d\x18"):
        from fastwarc.stream_io import Lz4Reader  # only LZ4 input needs fastwarc

        if fs.is_remote(path):  # fastwarc reads any file-like object: ours streams the remote one
            return Lz4Reader(fh, fsspec_args=False), "lz4"
        fh.close()
        return Lz4Reader(path, fsspec_args=False), "lz4"
    return fh, "gzip" if magic.startswith(b"\x1f\x8b") else "plain"
