"""WARC / ARC reader: HTML documents out of crawl archives; every bad record a DeadLetter, none lost.

Framing is done here, not by warcio / fastwarc: both trust Content-Length (measured on
shared/data/bad_inputs/warc, fastwarc silently swallows the next record when a length is too long
inside a per-record gzip member, warcio returns the cut block with a printed warning). Each declared
length is checked against where the next record really starts (line breaks, then ``WARC/`` or EOF);
on a mismatch the reader re-synchronises on the next ``WARC/x.y`` line or gzip member, so one lying
record costs one dead letter. Input is sniffed by magic bytes: plain, gzip (per-record members, or
one member read as a stream), LZ4 (decoded by fastwarc), ARC v1/v2. At most ``max_record_bytes``
plus a read chunk are buffered.

``loc = {"offset": n}``: the compressed offset of the gzip member the record starts (what CDX indexes
store), else the offset in the decompressed stream (a ``gzip_not_per_record`` warning says so once).

Documents: ``response`` records holding HTTP, ``resource`` and ARC records whose type (HTTP
Content-Type, else WARC-Identified-Payload-Type, else a sniff) is in ``content_types``, any status
(``meta.status``; filtering is a later stage's call). Other records are skipped and counted (``stats``
/ ``warc_stats``). Chunked bodies are de-chunked (a body that does not parse as chunks is read as is);
Content-Encoding is undone, and plain markup labelled gzip (every ClueWeb09 page) is read as plain
with ``meta.content_encoding_ignored``. Digests are checked on WARC/1.x documents (block digest, else
payload digest); WARC/0.18 digests follow another recipe.

Reasons: content_length_mismatch, invalid_content_length, missing_content_length, truncated, too_large,
digest_mismatch, invalid_header, invalid_http, binary_content, content_encoding_mismatch,
corrupt_compression (a damaged gzip member: its records are lost, reading resumes at the next
member), not_warc, unsupported_compression, file_unreadable; warnings (records=0):
gzip_not_per_record, trailing_garbage, truncated (gzip data without its end).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import re
import zlib
from collections.abc import Iterator
from dataclasses import replace

from ..errors import RecordError
from ..records import content_id
from . import html
from .base import DeadLetter, snippet

# Buffered bytes per record. Common Crawl cuts payloads at 1 MiB, so real blocks stay far below this.
MAX_RECORD_BYTES = 16 * 2**20
HTML_TYPES = ("text/html", "application/xhtml+xml")
DOCUMENT_TYPES = ("response", "resource")  # WARC-Type values that can hold a page (ARC records count as response)
READ_CHUNK = 1 << 20
_WARC_START = re.compile(rb"\nWARC/\d\.\d{1,2}\r?\n")
_GZIP_MAGIC = b"\x1f\x8b\x08"
_UNSUPPORTED = {b"\x28\xb5\x2f\xfd": "zstd", b"\x5d\x2a\x4d\x18": "zstd (dictionary)", b"BZh": "bzip2",
                b"\xfd7zXZ": "xz"}


class _Stream:
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
                self.gaps.append((self.pos + len(self.buf), f"{type(err).__name__}: {err}", self.pos + len(self.buf)))
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
                    self.warnings.append(("truncated", "gzip data ends without its end-of-stream", self._member))
                return
        if self._z is None and not self._start_member():
            return
        try:
            out = self._z.decompress(self._cin, 4 * READ_CHUNK)
        except zlib.error as err:  # drop the member's output, go on with the next member
            self.gaps.append((self.members[-1][0], f"gzip member at byte {self._member}: {err}", self._member))
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
        if not self._cin.startswith(_GZIP_MAGIC):
            start = self._cpos
            junk = self._skip_to_member()  # zero padding after the last member is normal (tape blocks)
            if junk:
                self.warnings.append(("trailing_garbage", f"{junk} bytes that are not gzip skipped", start))
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


def _member_start_at(st: _Stream, decoded: int) -> int | None:
    while len(st.members) > 1 and st.members[1][0] <= decoded:
        st.members.popleft()
    if st.members and st.members[0][0] == decoded:
        return st.members[0][1]
    return None


def _is_start(st: _Stream, i: int, arc_tail: int | None) -> bool:
    """Does a record header start at buffer index i?"""
    if arc_tail is None:
        return bool(re.match(rb"WARC/\d\.\d{1,2}\r?\n", st.buf[i:i + 16]))
    st.fill(i + html.MAX_HEADER_BYTES)
    eol = st.buf.find(b"\n", i, i + html.MAX_HEADER_BYTES)
    line = bytes(st.buf[i:eol if eol >= 0 else len(st.buf)])
    return any(_arc_fields(line, tail) for tail in (arc_tail, 4, 9))


def _find_next(st: _Stream, frm: int, arc_tail: int | None, limit: int) -> int | None:
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


def _boundary(st: _Stream, i: int, arc_tail: int | None) -> int | None:
    """If a record's block really ends at buffer index i: the index of what follows, else None.

    The spec wants exactly CRLF CRLF then ``WARC/`` or EOF; any short run of line breaks is accepted
    (some writers add or drop one), since the next record's start is what proves the length right."""
    st.fill(i + 40)
    j = i
    while j < len(st.buf) and j - i < 32 and st.buf[j] in b"\r\n":
        j += 1
    if j == i:
        return None
    st.fill(j + 16)
    if (j == len(st.buf) and st.eof) or _is_start(st, j, arc_tail):
        return j
    return None


def _warc_header(st: _Stream) -> tuple[int, dict] | None:
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


def _arc_header(st: _Stream, tail: int) -> tuple[int, dict] | None:
    st.fill(html.MAX_HEADER_BYTES)
    eol = st.buf.find(b"\n", 0, html.MAX_HEADER_BYTES)
    fields = _arc_fields(bytes(st.buf[:eol]), tail) if eol >= 0 else None
    return (eol + 1, fields) if fields else None


def _frames(st: _Stream, path: str, arc: bool, limit: int) -> Iterator[tuple | DeadLetter]:
    """``(start, headers, block)`` per well-framed record, a DeadLetter (offset = decoded start) per bad one."""
    arc_tail = 4 if arc else None  # fields after the URL on an ARC line: 4 in v1, 9 in v2

    def dead(reason: str, detail: str, records: int = 1, offset: int | None = None) -> DeadLetter:
        return DeadLetter(path, reason, detail, offset=start if offset is None else offset, records=records,
                          snippet=first if records else None)

    while True:
        for _, detail, compressed in st.gaps:
            first = None
            yield dead("corrupt_compression", detail + "; the records in it are lost", 1, compressed)
        st.gaps.clear()
        while st.fill(1) and st.buf[0] in b" \t\r\n\0":  # stray line breaks or NUL padding between records
            st.drop(len(st.buf) - len(st.buf.lstrip(b" \t\r\n\0")))
        if not st.buf:
            return
        start, first = st.pos, snippet(bytes(st.buf[:120]))
        head = _arc_header(st, arc_tail) if arc else (_warc_header(st) if st.buf.startswith(b"WARC/") else None)
        if head is None:
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


def _resync(st: _Stream, frm: int, arc_tail: int | None, limit: int) -> int | None:
    """Move to the next record start after buffer index ``frm``; its decoded offset, or None at EOF."""
    nxt = _find_next(st, frm, arc_tail, limit)
    st.drop(len(st.buf) if nxt is None else nxt)
    return None if nxt is None else st.pos


def _digest_ok(value: str, data: bytes) -> bool:
    """Does a ``sha1:BASE32`` (or base16 / base64) digest header match? Unknown algorithms pass."""
    algorithm, _, want = value.partition(":")
    try:
        got = hashlib.new(algorithm.strip().lower().replace("-", ""), data).digest()
    except ValueError:
        return True
    want = want.strip()
    for decode in (bytes.fromhex, lambda s: base64.b32decode(s.upper() + "=" * (-len(s) % 8)),
                   lambda s: base64.b64decode(s.replace("-", "+").replace("_", "/") + "=" * (-len(s) % 4))):
        try:
            if decode(want) == got:
                return True
        except (ValueError, binascii.Error):
            pass
    return False


def target_uri(value: str) -> str:
    """WARC-Target-URI as a usable URL: wget's <angle brackets> stripped, spaces percent-encoded."""
    return value.strip().removeprefix("<").removesuffix(">").strip().replace(" ", "%20")


def _document(h: dict, block: bytes, content_types, check_digests: bool) -> dict | str:
    """A document row (raises RecordError for a bad one), or the label a skipped record is counted under."""
    kind = h.get("warc-type", "").strip().lower() or "unknown"
    if kind not in DOCUMENT_TYPES:
        return kind
    http = html.parse_http(block) if kind == "response" else None
    if http is None and kind == "response" and h["version"] != "ARC":  # ARC: non-HTTP content is a resource
        if "application/http" in h.get("content-type", "").lower():
            raise RecordError("invalid_http", "block", "a response record whose block is not an HTTP response")
        return "non_http"
    status, headers, body = http or (None, {}, block)
    own = h.get("content-type", "") if kind == "resource" or h["version"] == "ARC" else ""  # else application/http
    ctype = headers.get("content-type") or h.get("warc-identified-payload-type") or own
    mime = ctype.split(";")[0].strip().lower()
    if mime not in content_types and not (not mime and html.looks_like_html(body)):
        return "non_html"
    if check_digests and h["version"].startswith("WARC/1."):
        name = "warc-block-digest" if h.get("warc-block-digest") else "warc-payload-digest"
        if h.get(name) and not _digest_ok(h[name], block if name == "warc-block-digest" else body):
            raise RecordError("digest_mismatch", name, f"{h[name]} does not match the record's bytes")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        unchunked = html.dechunk(body)
        body = body if unchunked is None else unchunked
    body, ignored = html.inflate(body, headers.get("content-encoding", ""))
    text, encoding = html.decode_html(body, html.charset_from_content_type(ctype))
    url = target_uri(h.get("warc-target-uri", ""))
    meta = {"warc_date": h.get("warc-date"), "status": status, "content_type": mime, "encoding": encoding,
            "bytes": len(body), "warc_type": kind}
    if h.get("warc-truncated"):  # the crawler cut the payload (Common Crawl: at 1 MiB)
        meta["truncated"] = h["warc-truncated"]
    if ignored:
        meta["content_encoding_ignored"] = headers.get("content-encoding")
    rid = h.get("warc-record-id", "").strip().strip("<>") or content_id(url, text)
    return {"id": rid, "url": url, "html": text, "headers": headers, "meta": meta}


def _open(path: str):
    """(decoded-or-raw file object, codec); ValueError for a compression we do not read."""
    fh = open(path, "rb")
    magic = fh.read(6)
    fh.seek(0)
    for prefix, name in _UNSUPPORTED.items():
        if magic.startswith(prefix):
            fh.close()
            raise ValueError(f"{name} compression is not supported; recompress with gzip")
    if magic.startswith(b"\x04\x22\x4d\x18"):
        from fastwarc.stream_io import Lz4Reader  # only LZ4 input needs fastwarc

        fh.close()
        return Lz4Reader(path, fsspec_args=False), "lz4"
    return fh, "gzip" if magic.startswith(b"\x1f\x8b") else "plain"


def iter_warc(path: str, max_record_bytes: int = MAX_RECORD_BYTES, content_types=HTML_TYPES,
              check_digests: bool = True, stats: dict | None = None) -> Iterator[tuple[dict, dict] | DeadLetter]:
    """Yield ``({"offset": n}, row)`` per HTML document and a DeadLetter per bad record (module doc).

    Row: ``{"id": WARC-Record-ID, "url", "html", "headers": {lower-cased HTTP headers}, "source",
    "meta": {"warc_date", "status", "content_type", "encoding", "bytes", "warc_type", ...}}``. A dict
    passed as ``stats`` is filled with records == documents + dead_letters + sum(skipped.values()),
    and warnings.
    """
    counts = stats if stats is not None else {}
    counts.update(records=0, documents=0, dead_letters=0, warnings=0, skipped={})
    for item in _iter(path, max_record_bytes, content_types, check_digests):
        if isinstance(item, DeadLetter):
            counts["records"] += item.records
            counts["dead_letters"] += item.records
            counts["warnings"] += not item.records
        elif isinstance(item, str):
            counts["records"] += 1
            counts["skipped"][item] = counts["skipped"].get(item, 0) + 1
            continue
        else:
            counts["records"] += 1
            counts["documents"] += 1
        yield item


def _iter(path: str, limit: int, content_types, check_digests: bool) -> Iterator[tuple | DeadLetter | str]:
    try:
        fh, codec = _open(path)
    except (OSError, ValueError) as err:
        yield DeadLetter(path, "unsupported_compression" if isinstance(err, ValueError) else "file_unreadable", str(err))
        return
    with fh:
        st = _Stream(fh, codec)
        st.fill(64)
        head = bytes(st.buf[:64]).lstrip()
        if head and not head.startswith((b"WARC/", b"filedesc://")):
            yield DeadLetter(path, "not_warc", "neither a WARC nor an ARC file", snippet=snippet(head))
            return
        warned = False
        for item in _frames(st, path, head.startswith(b"filedesc://"), limit) if head else ():
            yield from (DeadLetter(path, r, d, offset=o, records=0) for r, d, o in st.warnings)
            st.warnings.clear()
            if isinstance(item, DeadLetter) and item.reason == "corrupt_compression":
                yield item  # already carries the damaged member's compressed offset
                continue
            start = item.offset if isinstance(item, DeadLetter) else item[0]
            offset = _member_start_at(st, start) if codec == "gzip" else start
            if offset is None and not warned:
                warned = True
                yield DeadLetter(path, "gzip_not_per_record", "records do not start gzip members; their offsets are "
                                 "positions in the decompressed stream", offset=start, records=0)
            offset = start if offset is None else offset
            if isinstance(item, DeadLetter):
                yield replace(item, offset=offset)
                continue
            try:
                doc = _document(item[1], item[2], content_types, check_digests)
            except RecordError as err:
                yield DeadLetter(path, err.reason, err.detail, offset=offset, snippet=snippet(item[2]))
                continue
            yield doc if isinstance(doc, str) else ({"offset": offset}, {**doc, "source": path})
        yield from (DeadLetter(path, r, d, offset=o, records=0) for r, d, o in st.warnings)


def warc_stats(path: str, **opts) -> dict:
    """Read the whole file and return its counts (records, documents, dead_letters, warnings, skipped)."""
    stats: dict = {}
    for _ in iter_warc(path, stats=stats, **opts):
        pass
    return stats
