"""HTML bytes -> text with the charset traps of real crawls handled, and the one-file-one-page reader.

``decode_html`` picks the encoding in this order (first that applies wins):

1. a byte order mark (UTF-8, UTF-16, UTF-32);
2. UTF-16 without a BOM, recognised by NUL bytes on every other position;
3. binary content (image/archive/PDF signatures, or > 5 % control bytes) raises ``binary_content``;
4. bytes that are valid UTF-8 are UTF-8, whatever the declaration says: a declared ISO-8859-1 or a
   bogus UTF-16 is ignored (the one exception: pure-ASCII bytes declared ISO-2022, a 7-bit code);
5. the declared charset (HTTP header, then ``<meta charset>``) if the bytes decode cleanly with it;
6. UTF-8 with a few broken sequences (< 5 % of the non-ASCII bytes, e.g. a page cut mid-character
   by the crawler's 1 MiB limit) is UTF-8 with U+FFFD for the broken bytes;
7. charset-normalizer's guess (installed with trafilatura), else a cp1251/cp1252 heuristic.

Label handling follows WHATWG: ISO-8859-1 / ASCII labels mean windows-1252, GB2312/GBK mean GB18030,
Shift_JIS means cp932, EUC-KR means cp949. NUL characters are removed (never truncated at).

Also here, because they turn a crawled HTTP response into page bytes (the WARC reader uses them):
``parse_http``, ``header_fields``, ``dechunk`` and ``inflate`` (Content-Encoding, bounded).
"""

from __future__ import annotations

import codecs
import gzip
import html as htmllib
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

from ..errors import RecordError
from ..records import content_id
from . import fs
from .base import FILE, DeadLetter, snippet

# Decompressed bytes kept per page. Common Crawl cuts payloads at 1 MiB, so 10 MiB keeps every real
# page and stops decompression bombs; a bigger file is a ``too_large`` dead letter (never truncated).
MAX_HTML_BYTES = 10 * 2**20
SNIFF_BYTES = 64 * 1024  # prefix inspected for binary signatures, charset guesses, <meta> and canonical URL
MAX_HEADER_BYTES = 64 * 1024  # a WARC/HTTP header block (or ARC header line) longer than this is invalid
BINARY_CONTROL_RATIO = 0.05  # real text in any charset has ~0 control bytes; random binary has ~11 %

_BINARY_MAGIC = {
    b"\x89PNG": "PNG image", b"\xff\xd8\xff": "JPEG image", b"GIF87a": "GIF image", b"GIF89a": "GIF image",
    b"%PDF-": "PDF document", b"\x1f\x8b": "gzip data", b"PK\x03\x04": "zip archive",
    b"\x28\xb5\x2f\xfd": "zstd data", b"RIFF": "RIFF media", b"\x7fELF": "ELF binary", b"7z\xbc\xaf": "7z archive",
    b"OggS": "Ogg media", b"wOFF": "WOFF font", b"wOF2": "WOFF2 font",
}
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27))  # ESC (27) is used by ISO-2022
_HIGH = bytes(range(128, 256))
_WHATWG = {"iso8859-1": "cp1252", "ascii": "cp1252", "iso8859-9": "cp1254", "gb2312": "gb18030", "gbk": "gb18030",
           "shift_jis": "cp932", "euc_kr": "cp949", "tis-620": "cp874", "iso8859-11": "cp874"}
_IGNORED = {"utf-7", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}  # never without a BOM
_META_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([A-Za-z0-9._:-]{1,40})""", re.I)
_TAG = re.compile(r"<(link|meta)\b([^>]{0,2048})>", re.I)
BLANK_LINE = re.compile(rb"\r?\n\r?\n")  # end of a header block, CRLF or LF-only (ClueWeb09 HTTP)
_ATTR = re.compile(r"""([A-Za-z_:][-A-Za-z0-9_:.]*)\s*=\s*("[^"]*"|'[^']*'|[^\s"'>]+)""")

try:  # a transitive dependency (trafilatura, requests); the heuristic below stands in when it is missing
    from charset_normalizer import from_bytes as _detect
except ImportError:  # pragma: no cover - depends on the environment
    _detect = None
try:  # optional: only Content-Encoding: br needs it
    import brotli as _brotli
except ImportError:  # pragma: no cover - depends on the environment
    _brotli = None
_DECODE_ERRORS = (zlib.error, ValueError, OSError, zstandard.ZstdError) + ((_brotli.error,) if _brotli else ())


def codec_name(label: str | None) -> str | None:
    """Python codec for a charset label (WHATWG aliases applied), or None when unknown / not text."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    for name in (label, label.removeprefix("x-")):
        try:
            info = codecs.lookup(name)
        except (LookupError, ValueError):
            continue
        if getattr(info, "_is_text_encoding", True):
            return _WHATWG.get(info.name, info.name)
    return None


def charset_from_content_type(value: str | None) -> str | None:
    """The ``charset=`` parameter of a Content-Type header value."""
    for param in (value or "").split(";")[1:]:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            return val.strip().strip("\"'") or None
    return None


def binary_reason(sample: bytes) -> str | None:
    """Why these bytes are not text (a file signature or too many control bytes), or None."""
    for magic, what in _BINARY_MAGIC.items():
        if sample.startswith(magic):
            return f"starts with the {what} signature"
    if sample:
        controls = len(sample) - len(sample.translate(None, _CONTROL))
        if controls > BINARY_CONTROL_RATIO * len(sample):
            return f"{controls / len(sample):.0%} control bytes in the first {len(sample)} bytes"
    return None


def _utf16_without_bom(sample: bytes) -> str | None:
    if len(sample) < 16:
        return None
    even, odd = sample[:4096:2], sample[1:4096:2]
    if odd.count(0) > 0.3 * len(odd) and even.count(0) < 0.05 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.3 * len(even) and odd.count(0) < 0.05 * len(odd):
        return "utf-16-be"
    return None


def _strict(raw: bytes, encoding: str) -> str | None:
    try:
        return raw.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def single_byte_guess(sample: bytes) -> str:
    """cp1251 or cp1252: Cyrillic words are runs of high bytes, Western accents are isolated ones."""
    high = len(sample) - len(sample.translate(None, _HIGH))
    in_runs = sum(len(run) for run in re.findall(rb"[\x80-\xff]{2,}", sample))
    return "cp1251" if high and in_runs > 0.5 * high else "cp1252"


def _guess(raw: bytes) -> str:
    sample = raw[:SNIFF_BYTES]
    best = _detect(sample).best() if _detect is not None else None
    return (codec_name(best.encoding) if best is not None else None) or single_byte_guess(sample)


def decode_html(raw: bytes, declared: str | None = None) -> tuple[str, str]:
    """(text, codec used) for page bytes; ``declared`` is the HTTP charset label, if any.

    Raises ``RecordError("binary_content", "html", why)`` for bytes that are not text. The text is
    valid Unicode without NUL characters (U+FFFD marks bytes no candidate could decode).
    """
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            return _clean(raw[len(bom):].decode(encoding, "replace")), encoding
    sample = raw[:SNIFF_BYTES]
    utf16 = _utf16_without_bom(sample)
    if utf16:
        return _clean(raw.decode(utf16, "replace")), utf16
    why = binary_reason(sample)
    if why:
        raise RecordError("binary_content", "html", why)
    meta = _META_CHARSET.search(sample)
    labels = [codec_name(declared), codec_name(meta.group(1).decode("ascii") if meta else None)]
    text = _strict(raw, "utf-8")
    if text is not None:
        seven_bit = next((c for c in labels if c and c.startswith("iso2022")), None)
        if seven_bit and raw.isascii() and b"\x1b" in raw:
            return _clean(raw.decode(seven_bit, "replace")), seven_bit
        return _clean(text), "utf-8"
    for encoding in labels:
        if encoding and encoding != "utf-8" and encoding not in _IGNORED:
            text = _strict(raw, encoding)
            if text is not None:
                return _clean(text), encoding
    lenient = raw.decode("utf-8", "replace")
    broken = lenient.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    if broken * 20 < len(raw) - len(raw.translate(None, _HIGH)):
        return _clean(lenient), "utf-8"
    encoding = _guess(raw)
    return _clean(raw.decode(encoding, "replace")), encoding


def _clean(text: str) -> str:
    return text.replace("\x00", "") if "\x00" in text else text


def page_url(head: str) -> str | None:
    """Absolute URL from ``<link rel=canonical>`` or ``og:url`` in the start of a page, else None."""
    found: dict[str, str] = {}
    for tag, body in _TAG.findall(head):
        attrs = {k.lower(): htmllib.unescape(v.strip("\"'")).strip() for k, v in _ATTR.findall(body)}
        if tag.lower() == "link" and "canonical" in attrs.get("rel", "").lower().split():
            found.setdefault("canonical", attrs.get("href", ""))
        elif tag.lower() == "meta" and attrs.get("property", attrs.get("name", "")).lower() == "og:url":
            found.setdefault("og", attrs.get("content", ""))
    for key in ("canonical", "og"):
        url = found.get(key, "")
        if re.match(r"https?://[^\s/]+", url):
            return url.replace(" ", "%20")
    return None


def _read_bounded(path: str, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of the file, gunzipped when it starts with the gzip magic."""
    with fs.open_file(path) as fh:
        if fh.read(2) == b"\x1f\x8b":
            fh.seek(0)
            with gzip.GzipFile(fileobj=fh) as gz:
                return gz.read(max_bytes + 1)
        fh.seek(0)
        return fh.read(max_bytes + 1)


def iter_html(path: str, max_bytes: int = MAX_HTML_BYTES) -> Iterator[tuple[dict, dict] | DeadLetter]:
    """One HTML file (``.html``, ``.htm``, optionally gzipped, sniffed by magic) = one row, loc ``{}``.

    Row: ``{"id", "url", "html", "source", "meta": {"encoding", "bytes"}}``; ``url`` comes from the
    canonical link or og:url, else the file's ``file://`` URI. Dead letters (one per file):
    ``too_large`` (over ``max_bytes`` decompressed; not truncated), ``binary_content``,
    ``file_unreadable`` (damaged gzip, I/O error; ``scope="file"``). Each stands for the file's one
    page (``records=1``). A page with an empty body is still a row: deciding that there is no
    extractable text is the extraction stage's job.
    """
    try:
        raw = _read_bounded(path, max_bytes)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; EOFError = truncated gzip
        yield DeadLetter(source=path, reason="file_unreadable", scope=FILE,
                         detail=f"{type(err).__name__}: {err}; the file's one page is lost")
        return
    if len(raw) > max_bytes:
        yield DeadLetter(source=path, reason="too_large", detail=f"more than {max_bytes} bytes of HTML",
                         snippet=snippet(raw))
        return
    try:
        text, encoding = decode_html(raw)
    except RecordError as err:
        yield DeadLetter(source=path, reason=err.reason, detail=err.detail, snippet=snippet(raw))
        return
    url = page_url(text[:SNIFF_BYTES]) or (path if fs.is_remote(path) else Path(path).resolve().as_uri())
    meta = {"encoding": encoding, "bytes": len(raw)}
    yield {}, {"id": content_id(url, text), "url": url, "html": text, "source": path, "meta": meta}


def parse_http(block: bytes) -> tuple[int, dict, bytes] | None:
    """(status, lower-cased headers, raw body) of an HTTP response; LF-only headers (ClueWeb) accepted."""
    m = BLANK_LINE.search(block, 0, MAX_HEADER_BYTES)
    head, body = (block[:m.start()], block[m.end():]) if m else (block[:MAX_HEADER_BYTES], b"")
    lines = head.decode("latin-1").split("\n")  # HTTP header bytes are ISO-8859-1 by definition
    status = lines[0].split(None, 2)[1:2]
    if not block.startswith(b"HTTP/") or not status or not status[0].isdigit():
        return None
    return int(status[0]), header_fields(lines[1:]), body


def header_fields(lines: list[str]) -> dict:
    """``Name: value`` lines (WARC or HTTP) as a dict with lower-cased names; repeats joined by ", "."""
    fields: dict[str, str] = {}
    name = None
    for line in lines:
        line = line.rstrip("\r")
        if line[:1] in (" ", "\t") and name:  # an obsolete folded continuation line
            fields[name] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            name = key.strip().lower()
            fields[name] = f"{fields[name]}, {value.strip()}" if name in fields else value.strip()
    return fields


def looks_like_html(body: bytes) -> bool:
    """A sniff for pages served without a Content-Type: markup within the first bytes."""
    head = body[:1024].lstrip(b" \t\r\n\xef\xbb\xbf").lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<html" in head


def dechunk(body: bytes) -> bytes | None:
    """Undo ``Transfer-Encoding: chunked``; None when the body is not chunked (read it as is)."""
    out, i = [], 0
    while True:
        eol = body.find(b"\n", i, i + 1024)
        try:
            size = int(body[i:eol].split(b";")[0].strip(), 16) if eol >= 0 else -1
        except ValueError:
            size = -1
        if size < 0:
            return None if not out else b"".join(out)  # a cut last chunk keeps what came before
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 1:eol + 1 + size])
        i = eol + 1 + size
        i += 2 if body.startswith(b"\r\n", i) else 1 if body.startswith(b"\n", i) else 0


def inflate(body: bytes, coding: str, max_bytes: int = MAX_HTML_BYTES) -> tuple[bytes, bool]:
    """Undo a Content-Encoding (gzip, deflate, br, zstd); returns (bytes, label_ignored).

    A body that is not compressed as labelled but is plainly markup is returned as is with
    label_ignored=True; otherwise a body that does not decompress raises
    ``content_encoding_mismatch``, and one over ``max_bytes`` raises ``too_large``. A cut compressed
    body (crawlers truncate payloads) gives the bytes that decode.
    """
    out = body
    try:
        for name in reversed([c.strip().lower() for c in coding.split(",") if c.strip()]):
            out = _inflate_one(out, name, max_bytes)
    except _DECODE_ERRORS as err:
        if body.lstrip()[:1] == b"<":
            return body, True
        raise RecordError("content_encoding_mismatch", "body", f"{coding}: {type(err).__name__}: {err}") from None
    if len(out) > max_bytes:
        raise RecordError("too_large", "body", f"more than {max_bytes} bytes after {coding} decoding")
    return out, False


def _inflate_one(data: bytes, name: str, max_bytes: int) -> bytes:
    if name in ("identity", "none"):
        return data
    if name in ("gzip", "x-gzip", "deflate"):
        if name != "deflate" and not data.startswith(b"\x1f\x8b"):
            raise ValueError("no gzip magic")
        zlib_header = len(data) > 1 and data[0] & 0x0F == 8 and (data[0] * 256 + data[1]) % 31 == 0
        wbits = 31 if name != "deflate" else 15 if zlib_header else -15  # servers send both deflate forms
        return zlib.decompressobj(wbits).decompress(data, max_bytes + 1)
    if name == "br":
        if _brotli is None:
            raise ValueError("Content-Encoding br needs the brotli package")
        return _brotli.Decompressor().process(data, output_buffer_limit=max_bytes + 1)
    if name == "zstd":
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            return reader.read(max_bytes + 1)
    raise ValueError(f"unsupported Content-Encoding {name!r}")
