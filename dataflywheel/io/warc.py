"""WARC / ARC reader: HTML documents out of crawl archives; every bad record a DeadLetter, none lost.

Framing (``warc_frames.py``) is our own, not warcio / fastwarc: both trust Content-Length (measured on
WARC files with lying lengths, fastwarc 2.0.1 silently swallows the next record when a length is too
long inside a per-record gzip member, warcio 1.8.1 returns the cut block with a printed warning).
Each declared length is checked against where the next record really starts (line breaks, then
``WARC/`` or EOF); on a mismatch the reader re-synchronises on the next ``WARC/x.y`` line or gzip
member, so one lying record costs one dead letter. A file cut inside a record's header reports that
record ``truncated`` and keeps the whole record before it. Input is sniffed by magic bytes: plain, gzip (per-record members, or
one member read as a stream), LZ4 (decoded by fastwarc), ARC v1/v2. At most ``max_record_bytes``
plus a read chunk are buffered: a longer block is never held, the reader scans on to the next record
start (so a lying length loses nothing) and reports the record ``too_large`` if it is a document.

``loc = {"offset": n}``: the compressed offset of the gzip member the record starts (what CDX indexes
store), else the offset in the decompressed stream (LZ4 files; gzip files whose records do not start
members, where a ``gzip_not_per_record`` warning says so once).

Documents: ``response`` records holding HTTP, ``resource`` and ARC records whose type (HTTP
Content-Type, else WARC-Identified-Payload-Type, else a sniff) is in ``content_types``, any status
(``meta.status``; filtering is a later stage's call). Other records are skipped and counted (``stats``
/ ``warc_stats``). Chunked bodies are de-chunked (a body that does not parse as chunks is read as is);
Content-Encoding is undone, and plain markup labelled gzip (every ClueWeb09 page) is read as plain
with ``meta.content_encoding_ignored``. Digests are checked on WARC/1.x documents (block digest, else
payload digest); WARC/0.18 digests follow another recipe.

Reasons, one record each (``records=1``): content_length_mismatch, invalid_content_length,
missing_content_length, truncated, too_large, digest_mismatch, invalid_header, invalid_http,
binary_content, content_encoding_mismatch, record_error (an unexpected decoding failure, reported
rather than raised). File-level (``scope="file"``, ``records=0``): losses whose record count cannot
be known, so the detail says "row count unknown": corrupt_compression (a damaged gzip member: its
records not yet read are lost, reading resumes at the next member), truncated_stream (gzip data
without its end: what followed the cut is not in the file; the record it cuts is a ``truncated``
letter), not_warc, unsupported_compression, file_unreadable; warnings that lose nothing:
gzip_not_per_record, trailing_garbage.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterator
from dataclasses import replace

from ..errors import RecordError
from ..records import content_id
from . import html
from .base import FILE, UNKNOWN_COUNT, DeadLetter, snippet
from .warc_frames import DOCUMENT_TYPES, Stream, frames, member_start_at, open_archive

# Buffered bytes per record. Common Crawl cuts payloads at 1 MiB, so real blocks stay far below this.
MAX_RECORD_BYTES = 16 * 2**20
HTML_TYPES = ("text/html", "application/xhtml+xml")


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


def iter_warc(path: str, max_record_bytes: int = MAX_RECORD_BYTES, content_types=HTML_TYPES,
              check_digests: bool = True, stats: dict | None = None) -> Iterator[tuple[dict, dict] | DeadLetter]:
    """Yield ``({"offset": n}, row)`` per HTML document and a DeadLetter per bad record (module doc).

    Row: ``{"id": WARC-Record-ID, "url", "html", "headers": {lower-cased HTTP headers}, "source",
    "meta": {"warc_date", "status", "content_type", "encoding", "bytes", "warc_type", ...}}``. A dict
    passed as ``stats`` is filled with records == documents + dead_letters + sum(skipped.values()),
    ``unknown_losses`` (file-level letters that lose an unknown number of records) and ``warnings``
    (letters that lose nothing).
    """
    counts = stats if stats is not None else {}
    counts.update(records=0, documents=0, dead_letters=0, unknown_losses=0, warnings=0, skipped={})
    for item in _iter(path, max_record_bytes, content_types, check_digests):
        if isinstance(item, DeadLetter):
            counts["records"] += item.records
            counts["dead_letters"] += item.records
            if not item.records:
                counts["unknown_losses" if UNKNOWN_COUNT in item.detail else "warnings"] += 1
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
        fh, codec = open_archive(path)
    except (OSError, ValueError) as err:
        reason = "unsupported_compression" if isinstance(err, ValueError) else "file_unreadable"
        yield DeadLetter(path, reason, f"{err}; {UNKNOWN_COUNT}", records=0, scope=FILE)
        return
    with fh:
        st = Stream(fh, codec)
        st.fill(64)
        head = bytes(st.buf[:64]).lstrip()
        if head and not head.startswith((b"WARC/", b"filedesc://")):
            yield DeadLetter(path, "not_warc", f"neither a WARC nor an ARC file: {UNKNOWN_COUNT}", records=0,
                             scope=FILE, snippet=snippet(head))
            return
        warned = False
        for item in frames(st, path, head.startswith(b"filedesc://"), limit) if head else ():
            yield from (DeadLetter(path, r, d, offset=o, records=0, scope=FILE) for r, d, o in st.warnings)
            st.warnings.clear()
            if isinstance(item, DeadLetter) and item.reason == "corrupt_compression":
                yield item  # already carries the damaged member's compressed offset
                continue
            start = item.offset if isinstance(item, DeadLetter) else item[0]
            offset = member_start_at(st, start) if codec == "gzip" else start
            if offset is None and not warned:
                warned = True
                yield DeadLetter(path, "gzip_not_per_record", "records do not start gzip members; their offsets are "
                                 "positions in the decompressed stream", offset=start, records=0, scope=FILE)
            offset = start if offset is None else offset
            if isinstance(item, DeadLetter):
                yield replace(item, offset=offset)
                continue
            try:
                doc = _document(item[1], item[2], content_types, check_digests)
            except Exception as err:  # RecordError, or a safety net: one odd record must not end the file
                reason, detail = (err.reason, err.detail) if isinstance(err, RecordError) else (
                    "record_error", f"{type(err).__name__}: {err}")
                yield DeadLetter(path, reason, detail, offset=offset, snippet=snippet(item[2]))
                continue
            yield doc if isinstance(doc, str) else ({"offset": offset}, {**doc, "source": path})
        yield from (DeadLetter(path, r, d, offset=o, records=0, scope=FILE) for r, d, o in st.warnings)


def warc_stats(path: str, **opts) -> dict:
    """Read the whole file and return its counts (records, documents, dead_letters, warnings, skipped)."""
    stats: dict = {}
    for _ in iter_warc(path, stats=stats, **opts):
        pass
    return stats
