"""WARC/ARC reader on the real bad-input corpus and the 26 third-party samples (plus damage made from them)."""

from __future__ import annotations

import glob
import json
import os
import re
import time
import tracemalloc
import zlib

import pytest

from dataflywheel import records
from dataflywheel.io.base import FILE, RECORD, UNKNOWN_COUNT, DeadLetter
from dataflywheel.io.warc import iter_warc, target_uri, warc_stats
from dataflywheel.io.warc_frames import _arc_fields

DOLMA = ("allenai_dolma/sample-0000.warc.gz", "allenai_dolma/sample-0001.warc.gz")
DOLMA_RECORDS = {DOLMA[0]: 48, DOLMA[1]: 34}  # documents + skipped records (test_common_crawl_style_samples)
FILE_REASONS = ("corrupt_compression", "not_warc", "unsupported_compression", "file_unreadable", "gzip_not_per_record",
                "trailing_garbage", "truncated_stream")


def read(path, **opts) -> tuple[list, list, dict]:
    """(documents as (loc, row), dead letters, stats), checking what every file must satisfy."""
    stats: dict = {}
    items = list(iter_warc(str(path), stats=stats, **opts))
    docs = [i for i in items if not isinstance(i, DeadLetter)]
    dead = [i for i in items if isinstance(i, DeadLetter)]
    assert stats["records"] == len(docs) + sum(d.records for d in dead) + sum(stats["skipped"].values())
    unknown = [d for d in dead if UNKNOWN_COUNT in d.detail]
    assert stats["documents"] == len(docs) and stats["unknown_losses"] == len(unknown)
    assert stats["warnings"] == sum(1 for d in dead if d.records == 0) - len(unknown)
    for loc, row in docs:
        assert set(loc) == {"offset"} and row["source"] == str(path)
        assert "\x00" not in row["html"] and row["html"].encode("utf-8")
        assert records.validate("document", row)["id"] == row["id"]
        json.dumps(row)
    for d in dead:
        assert d.source == str(path) and d.reason and d.detail
        assert d.offset is not None or d.reason in ("not_warc", "unsupported_compression", "file_unreadable")
        # a record letter stands for its record; a file-level one loses nothing or an unknown number
        assert (d.scope, d.records) in ((RECORD, 1), (FILE, 0)), d
        assert (d.scope == FILE) == (d.reason in FILE_REASONS), d
    return docs, dead, stats


def record_at(path: str, offset: int) -> bytes:
    """The bytes of the record starting at ``offset`` (plain) or of the gzip member there."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    return zlib.decompressobj(31).decompress(data) if data[:2] == b"\x1f\x8b" else data[:200_000]


# --- the generated bad-input corpus (manifest: per-record expectations) ---------------------------

def test_bad_input_warc_files(shared_data):
    root = shared_data / "bad_inputs"
    entries = [f for f in json.loads((root / "manifest.json").read_text())["files"] if f["path"].startswith("warc/")]
    assert sorted(e["path"] for e in entries) == sorted(f"warc/{n}" for n in os.listdir(root / "warc"))
    for entry in entries:
        check_bad_input_warc(str(root / entry["path"]), entry)


def check_bad_input_warc(path: str, entry: dict) -> None:
    docs, dead, stats = read(path)
    assert stats["records"] == entry["counts"]["records"], path
    urls = {row["url"] for _, row in docs}
    dead_urls = {}
    for d in dead:
        head = record_at(path, d.offset)
        assert head.startswith(b"WARC/"), d  # the offset points at the bad record itself
        uri = head.split(b"WARC-Target-URI: ", 1)[1].split(b"\r\n", 1)[0].decode()
        dead_urls[uri] = d.reason
    for rec in entry["records"]:
        uri = rec.get("uri")
        if rec["type"] != "response":  # warcinfo: not a document, counted as skipped
            continue
        if rec["expect"] == "keep" and uri:
            assert uri in urls, (path, rec)
        elif rec["expect"] == "reject":
            assert uri not in urls and dead_urls.get(uri) == rec["reason"], (path, rec, dead_urls)
        elif uri:  # either: kept, or reported; never lost
            assert uri in urls or uri in dead_urls, (path, rec)
    kept_responses = sum(r["type"] == "response" and r["expect"] == "keep" for r in entry["records"])
    assert len(docs) >= kept_responses, path
    if entry["path"] == "warc/content_encoding_lies.warc":  # plain HTML labelled gzip: read as plain
        flagged = [row for _, row in docs if row["meta"].get("content_encoding_ignored")]
        assert len(flagged) == 1 and "<html" in flagged[0]["html"]
    if entry["path"] == "warc/binary_payload_as_html.warc":
        assert [d.reason for d in dead] == ["binary_content"] and len(docs) == 2


# --- the 26 third-party samples -------------------------------------------------------------------

def sample(shared_data, name):
    return shared_data / "warc_samples" / name


def test_all_samples_read_without_crash(shared_data):
    paths = sorted(glob.glob(str(shared_data / "warc_samples" / "*" / "*")))
    assert len(paths) == 26
    for path in paths:
        read(path)


@pytest.mark.parametrize("name,documents,skipped", [(DOLMA[0], 22, 26), (DOLMA[1], 15, 19)])
def test_common_crawl_style_samples(shared_data, name, documents, skipped):
    docs, dead, stats = read(sample(shared_data, name))
    assert (len(docs), dead, sum(stats["skipped"].values())) == (documents, [], skipped)
    assert stats["records"] == DOLMA_RECORDS[name]
    assert stats["skipped"]["request"] == documents  # wget writes one request per response
    ids = [row["id"] for _, row in docs]
    assert len(set(ids)) == len(ids) and all(i.startswith("urn:uuid:") for i in ids)
    for loc, row in docs:
        assert row["url"].startswith("https://") and "<" not in row["url"]  # wget's <...> stripped
        assert "<html" in row["html"].lower() and row["meta"]["status"] == 200
        assert row["headers"]["content-type"].startswith("text/html") and row["meta"]["warc_date"].startswith("2024-")
        assert record_at(str(sample(shared_data, name)), loc["offset"]).startswith(b"WARC/1.0")


def test_same_documents_from_plain_gzip_and_lz4(shared_data):
    base = "chatnoir-eu_chatnoir-resiliparse/warcfile.warc"
    results = [read(sample(shared_data, base + ext)) for ext in ("", ".gz", ".lz4")]
    keys = [[(row["id"], row["url"], row["meta"]["encoding"], len(row["html"])) for _, row in docs] for docs, _, _ in results]
    assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 16
    assert {k[2] for k in keys[0]} >= {"utf-8", "cp1251", "gb18030", "cp1252"}  # real charsets of the crawl
    for ext in ("", ".gz", ".lz4"):
        docs, dead, stats = read(sample(shared_data, "chatnoir-eu_chatnoir-resiliparse/block-sized-records.warc" + ext))
        assert (docs, dead, stats["skipped"]) == ([], [], {"unknown": 3})


def test_clueweb_lf_only_http_headers_and_lying_content_encoding(shared_data):
    docs, dead, stats = read(sample(shared_data, "chatnoir-eu_chatnoir-resiliparse/clueweb-quirk.warc.gz"))
    assert (len(docs), dead, stats["skipped"]) == (29, [], {"warcinfo": 1})
    for _, row in docs:
        assert row["meta"]["encoding"] == "euc_jp" and row["meta"]["content_encoding_ignored"] == "gzip"
        assert any("\u3040" <= ch <= "\u30ff" for ch in row["html"])  # kana: the EUC-JP really decoded


def test_clipped_record_is_reported_truncated(shared_data):
    docs, dead, _ = read(sample(shared_data, "chatnoir-eu_chatnoir-resiliparse/clipped.warc.gz"))
    assert docs == [] and [d.reason for d in dead if d.records] == ["truncated"]


@pytest.mark.parametrize("name", ["webrecorder_warcio/example-bad.warc.gz.bad",
                                  "webrecorder_warcio/example-bad-non-chunked.warc.gz"])
def test_whole_file_gzip_is_read_as_a_stream(shared_data, name):
    docs, dead, stats = read(sample(shared_data, name))
    assert [d.reason for d in dead] == ["gzip_not_per_record"] and dead[0].records == 0
    assert docs and stats["records"] == 6


def test_record_split_across_gzip_members_is_read_as_a_stream(shared_data):
    docs, dead, stats = read(sample(shared_data, "webrecorder_warcio/example-wrong-chunks.warc.gz"))
    # Framed across the member break; the response's stored length and block digest disagree with its
    # bytes (its HTTP Content-Length says 1271, its body has 1270), so it is reported, the request kept in count.
    assert stats["records"] == 2 and stats["skipped"] == {"request": 1}
    assert [d.reason for d in dead if d.records] == ["digest_mismatch"]


def test_truncated_response_is_reported_and_following_record_survives(shared_data):
    docs, dead, stats = read(sample(shared_data, "webrecorder_warcio/example-trunc.warc"))
    assert [d.reason for d in dead] == ["content_length_mismatch"] and docs == []
    assert stats["skipped"] == {"warcinfo": 2, "request": 1}


def test_arc_files(shared_data):
    for name in ("webrecorder_warcio/example.arc", "webrecorder_warcio/example.arc.gz"):
        docs, dead, stats = read(sample(shared_data, name))
        assert dead == [] and stats["skipped"] == {"filedesc": 1}
        (loc, row), = docs
        assert row["url"] == "http://example.com/" and "Example Domain" in row["html"]
        assert row["meta"]["warc_date"] == "2014-02-16T05:02:21Z"
    docs, dead, stats = read(sample(shared_data, "webrecorder_warcio/bad.arc"))
    assert docs == [] and [d.reason for d in dead] == ["invalid_content_length"] * 3  # '-1', '-1', 'abc'
    assert stats["records"] == 4 and stats["skipped"] == {"non_html": 1}


def test_arc_url_with_spaces_is_not_mis_split(shared_data):
    path = sample(shared_data, "webrecorder_warcio/example-space-in-url.arc")
    line = path.read_bytes().split(b"\n")[4]
    fields = _arc_fields(line, 4)
    assert fields["warc-target-uri"].endswith("Examples From The Live Web&IsPopUp=False")
    assert (fields["content-type"], fields["content-length"]) == ("text/html", "1591")
    # The capture's length counts the URL's %20s (12 bytes more than the file holds): reported, not guessed.
    docs, dead, _ = read(path)
    assert docs == [] and [d.reason for d in dead] == ["truncated"]


def test_target_uri_normalisation(shared_data):
    docs, _, _ = read(sample(shared_data, "webrecorder_warcio/example-wget-bad-target-uri.warc.gz"))
    assert [row["url"] for _, row in docs] == ["http://example.com/"]
    assert target_uri("file:///example with spaces.png") == "file:///example%20with%20spaces.png"
    # That record is a PNG resource with a base16 block digest: the digest verifies, the bytes are binary.
    _, dead, _ = read(sample(shared_data, "webrecorder_warcio/example-space-in-target-uri.warc.gz"),
                      content_types=("image/png",))
    assert [d.reason for d in dead] == ["binary_content"]


def test_digest_samples_are_request_records(shared_data):
    # The bad payload digest of example-digest.warc sits on request records: not documents, so skipped;
    # digest checking of documents is exercised on a damaged copy below.
    docs, dead, stats = read(sample(shared_data, "webrecorder_warcio/example-digest.warc"))
    assert (docs, dead, stats["skipped"]) == ([], [], {"request": 4})


def test_other_samples(shared_data):
    docs, _, stats = read(sample(shared_data, "webrecorder_warcio/example-iana.org-chunked.warc"))
    (_, row), = docs
    assert row["html"].lstrip().lower().startswith("<!doctype") and row["html"].rstrip().endswith("</html>")
    docs, _, _ = read(sample(shared_data, "webrecorder_warcio/example-resource.warc.gz"))
    assert [(row["meta"]["warc_type"], row["meta"]["status"]) for _, row in docs] == [("resource", None)]
    docs, _, stats = read(sample(shared_data, "webrecorder_warcio/post-test.warc.gz"))
    assert docs == [] and stats["skipped"] == {"non_html": 3, "request": 3}


# --- damage made from real files ------------------------------------------------------------------

def test_damaged_gzip_member_loses_only_its_record(shared_data, tmp_path):
    data = bytearray(sample(shared_data, DOLMA[0]).read_bytes())
    for k in range(15904 + 200, 15904 + 230):  # inside the member of the response at 15904
        data[k] ^= 0x55
    (tmp_path / "c.warc.gz").write_bytes(data)
    docs, dead, stats = read(tmp_path / "c.warc.gz")
    assert [(d.reason, d.offset, d.scope, d.records) for d in dead] == [("corrupt_compression", 15904, FILE, 0)]
    assert "gzip member at byte 15904 is damaged" in dead[0].detail and UNKNOWN_COUNT in dead[0].detail
    # the damaged member's records cannot be counted: the 47 others are all accounted for
    assert len(docs) == 21 and stats["records"] == 47 and stats["unknown_losses"] == 1


def test_trailing_garbage_and_zero_padding(shared_data, tmp_path):
    data = sample(shared_data, DOLMA[0]).read_bytes()
    (tmp_path / "t.warc.gz").write_bytes(data + b"\0" * 1024 + b"not gzip" * 10)
    docs, dead, _ = read(tmp_path / "t.warc.gz")
    assert len(docs) == 22 and [(d.reason, d.records, d.scope) for d in dead] == [("trailing_garbage", 0, FILE)]
    assert f"from byte {len(data)} on" in dead[0].detail and "every record before them was read" in dead[0].detail
    (tmp_path / "z.warc.gz").write_bytes(data + b"\0" * 4096)
    assert read(tmp_path / "z.warc.gz")[1] == []


def test_digest_mismatch_and_opt_out(shared_data, tmp_path):
    data = sample(shared_data, "chatnoir-eu_chatnoir-resiliparse/warcfile.warc").read_bytes()
    assert data.count(b"<title>") > 1
    (tmp_path / "d.warc").write_bytes(data.replace(b"<title>", b"<TITLE>", 1))  # same length, other bytes
    docs, dead, _ = read(tmp_path / "d.warc")
    assert [d.reason for d in dead] == ["digest_mismatch"] and len(docs) == 15
    docs, dead, _ = read(tmp_path / "d.warc", check_digests=False)
    assert dead == [] and len(docs) == 16 and "<TITLE>" in docs[0][1]["html"]


def test_record_over_the_cap_is_skipped_without_buffering(shared_data):
    docs, dead, stats = read(sample(shared_data, DOLMA[0]), max_record_bytes=30_000)
    assert {d.reason for d in dead} == {"too_large"} and len(docs) + len(dead) == 22
    assert stats["records"] == 48


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) file offsets of every record, found without the reader: gzip members (one per
    record here), else header + Content-Length (an ARC header is one line, its length the last field)."""
    spans = []
    if data[:2] == b"\x1f\x8b":
        pos = 0
        while pos < len(data):
            member = zlib.decompressobj(31)
            member.decompress(data[pos:])
            spans.append((pos, len(data) - len(member.unused_data)))
            pos = spans[-1][1]
        return spans
    pos = 0
    while True:
        while data[pos:pos + 1] in (b"\r", b"\n"):
            pos += 1
        if pos >= len(data):
            return spans
        if data.startswith(b"WARC/", pos):
            head_end = data.index(b"\r\n\r\n", pos) + 4
            length = int(re.search(rb"(?i)\r\nContent-Length: *(\d+)", data[pos:head_end]).group(1))
        else:
            head_end = data.index(b"\n", pos) + 1
            length = int(data[pos:head_end].split()[-1])
        spans.append((pos, head_end + length))
        pos = head_end + length


@pytest.mark.parametrize("name", [DOLMA[1], "chatnoir-eu_chatnoir-resiliparse/warcfile.warc",
                                  "webrecorder_warcio/example.warc.gz", "webrecorder_warcio/example.arc"])
def test_truncation_at_any_point_is_accounted(shared_data, tmp_path, name):
    """A file cut anywhere: the documents read are the full file's documents up to the cut, and a cut
    inside a record is reported at that record; a cut between records loses nothing and says nothing."""
    data = sample(shared_data, name).read_bytes()
    full, dead, _ = read(sample(shared_data, name))
    assert dead == [] and full
    spans = record_spans(data)
    assert spans[0][0] == 0 and spans[-1][1] <= len(data) and len(spans) >= 2
    end_of = dict(spans)
    doc_spans = [(loc["offset"], end_of[loc["offset"]]) for loc, _ in full]  # a document's offset is its record's start
    full_ids = [row["id"] for _, row in full]
    near_records = [c for start, end in spans for c in (start - 1, start, start + 1, end - 1, end, end + 1)]
    cuts = sorted({c for c in [*range(1, len(data), max(len(data) // 23, 1)), *near_records] if 0 < c < len(data)})
    inside_cuts = 0
    for cut in cuts:
        (tmp_path / "cut").write_bytes(data[:cut])
        docs, dead, stats = read(tmp_path / "cut")
        ids = [row["id"] for _, row in docs]
        assert ids == full_ids[: len(ids)], cut  # a prefix of the full file's documents, in order
        whole = sum(end <= cut for _, end in doc_spans)  # documents the cut leaves whole
        started = sum(start < cut for start, _ in doc_spans)
        assert whole <= len(ids) <= started, cut  # (a gzip member cut in its 8-byte trailer still decodes)
        inside = [start for start, end in spans if start < cut < end]
        if inside:
            inside_cuts += 1
            reasons = {d.reason for d in dead}
            # the cut record is reported at its offset (a 1-byte stub is not recognisable as a WARC)
            assert any(d.offset == inside[0] for d in dead) or reasons == {"not_warc"}, (cut, dead)
            assert reasons & {"truncated", "truncated_stream", "not_warc"}, (cut, reasons)
        else:
            assert dead == [] and len(ids) == whole, (cut, dead)  # at a record boundary: nothing lost
    assert 0 < inside_cuts < len(cuts)  # both kinds of cut were tried


def test_last_block_ending_exactly_at_eof_is_complete(shared_data, tmp_path):
    data = sample(shared_data, "webrecorder_warcio/example.warc").read_bytes()
    assert data.endswith(b"\r\n\r\n")
    (tmp_path / "e.warc").write_bytes(data[:-4])  # the closing CRLF CRLF missing, the block whole
    _, dead, stats = read(tmp_path / "e.warc")
    assert dead == [] and stats["skipped"]["request"] == 2
    (tmp_path / "f.warc").write_bytes(data[:-5])  # one byte of the block missing
    assert [d.reason for d in read(tmp_path / "f.warc")[1]] == ["truncated"]


def test_not_a_warc_and_empty_file(shared_data, tmp_path):
    _, dead, stats = read(shared_data / "bad_inputs" / "html" / "nul_bytes.html")
    assert [(d.reason, d.scope, d.records) for d in dead] == [("not_warc", FILE, 0)]
    assert dead[0].detail == f"neither a WARC nor an ARC file: {UNKNOWN_COUNT}"
    assert (stats["records"], stats["unknown_losses"]) == (0, 1)
    (tmp_path / "empty.warc").write_bytes(b"")
    assert read(tmp_path / "empty.warc") == ([], [], {"records": 0, "documents": 0, "dead_letters": 0,
                                                      "unknown_losses": 0, "warnings": 0, "skipped": {}})


def test_memory_stays_flat_on_a_long_file(shared_data, tmp_path):
    data = sample(shared_data, "chatnoir-eu_chatnoir-resiliparse/warcfile.warc").read_bytes()
    big = tmp_path / "big.warc"
    with open(big, "wb") as fh:
        for _ in range(30):  # 16 MB, 1500 records
            fh.write(data)
    tracemalloc.start()
    n = sum(1 for _ in iter_warc(str(big)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 30 * 16 and peak < 12 * 2**20, peak  # one read chunk + one record, not the file


def test_throughput_on_dolma_samples(shared_data, record_property):
    """Ten passes over both dolma samples read every record every time; the rate is reported, not asserted
    (timings on a shared machine are noise)."""
    paths = [str(sample(shared_data, name)) for name in DOLMA]
    total, start = 0, time.perf_counter()
    for _ in range(10):
        for path in paths:
            stats = warc_stats(path)
            assert stats["dead_letters"] == stats["unknown_losses"] == stats["warnings"] == 0
            total += stats["records"]
    elapsed = time.perf_counter() - start
    assert total == 10 * sum(DOLMA_RECORDS.values())
    record_property("warc_records_per_s", round(total / elapsed))  # in --junitxml reports
    print(f"\niter_warc on the dolma samples: {total / elapsed:,.0f} records/s ({total} records, {elapsed:.2f} s)")
