"""JSONL reading over sniffed gzip / zstd streams: round trips, broken streams, line rules, memory."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import zstandard

from dataflywheel.errors import UserError
from dataflywheel.io import DeadLetter, open_shard, read, read_file
from dataflywheel.io.compress import READ_BYTES
from dataflywheel.io.jsonl import iter_jsonl, parse_line

ROWS = [
    {"id": "a", "text": "plain"},
    {"id": "b", "text": "line\u2028sep\u2029para\u0085nel and \r\n inside", "meta": {"n": [1, 2.5, None, True]}},
    {"id": "c", "text": "ünïcödé ✓ 😀", "tags": ["x"]},
]


def lines_of(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def rows_for(i: int) -> list[dict]:
    return [{"id": f"r{i}-{j}", "text": f"text {i} {j}"} for j in range(5)]


def split(items) -> tuple[list, list[DeadLetter]]:
    items = list(items)
    return [i for i in items if not isinstance(i, DeadLetter)], [i for i in items if isinstance(i, DeadLetter)]


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / f"out.{fmt}")
    with open_shard(path, fmt) as write_row:
        for row in ROWS:
            write_row(row)
    kept, dead = split(iter_jsonl(path))
    assert dead == []
    assert [loc for loc, _ in kept] == [{"line": 1}, {"line": 2}, {"line": 3}]
    assert [row for _, row in kept] == ROWS


def test_compression_is_sniffed_not_taken_from_the_name(tmp_path: Path) -> None:
    gz_named_plain = write(tmp_path / "a.jsonl", gzip.compress(lines_of(ROWS)))
    zst_named_gz = write(tmp_path / "b.jsonl.gz", zstandard.ZstdCompressor().compress(lines_of(ROWS)))
    plain_named_gz = write(tmp_path / "c.jsonl.gz", lines_of(ROWS))
    for path in (gz_named_plain, zst_named_gz, plain_named_gz):
        assert [row for _, row in iter_jsonl(path)] == ROWS


def test_multimember_gzip_and_zstd_frames_are_all_read(tmp_path: Path) -> None:
    parts = [rows_for(i) for i in range(3)]
    gz = write(tmp_path / "m.jsonl.gz", b"".join(gzip.compress(lines_of(p)) for p in parts))
    zst = write(tmp_path / "m.jsonl.zst", b"".join(zstandard.ZstdCompressor().compress(lines_of(p)) for p in parts))
    expected = [r for p in parts for r in p]
    for path in (gz, zst):
        kept, dead = split(iter_jsonl(path))
        assert dead == [] and [row for _, row in kept] == expected
        assert kept[-1][0] == {"line": 15}


def test_trailing_zeros_are_ignored_and_trailing_garbage_is_a_warning_after_the_data(tmp_path: Path) -> None:
    body = gzip.compress(lines_of(ROWS))
    kept, dead = split(iter_jsonl(write(tmp_path / "z.jsonl.gz", body + b"\0" * 4096)))
    assert len(kept) == 3 and dead == []
    items = list(iter_jsonl(write(tmp_path / "g.jsonl.gz", body + b"\0\0not gzip at all")))
    assert [type(i) for i in items] == [tuple, tuple, tuple, DeadLetter]
    warning = items[-1]
    assert (warning.reason, warning.records, warning.source) == ("trailing_garbage", 0, str(tmp_path / "g.jsonl.gz"))
    assert (warning.scope, warning.line) == ("file", None)
    assert f"17 bytes after the last gzip member (from byte {len(body)})" in warning.detail
    assert warning.detail.endswith("all 3 lines before them were read")  # nothing lost: no unknown count


def test_truncated_gzip_keeps_complete_lines_and_reports_the_cut(tmp_path: Path) -> None:
    rows = [{"id": str(i), "text": "x" * 50 + str(i)} for i in range(200)]
    data = gzip.compress(lines_of(rows))
    cut = write(tmp_path / "t.jsonl.gz", data[: len(data) // 2])
    kept, dead = split(iter_jsonl(cut))
    assert kept and [row for _, row in kept] == rows[: len(kept)]
    partial, file_level = dead
    assert (partial.reason, partial.line, partial.records, partial.scope) == (
        "lost_in_truncation", len(kept) + 1, 1, "record")
    assert (file_level.reason, file_level.records, file_level.line, file_level.scope) == (
        "truncated_stream", 0, None, "file")
    n = len(kept)
    assert file_level.detail.startswith("gzip stream ends inside a member: the file was cut short")
    assert f"the stream breaks after line {n} (line {n + 1} is cut off: reported on its own)" in file_level.detail
    assert f"lines 1-{n} were read before the break" in file_level.detail
    assert file_level.detail.endswith("row count unknown")  # the lines after the cut are not in the file
    whole = write(tmp_path / "w.jsonl.gz", data[: len(data) - 8])  # cut in the trailer: every line decoded
    kept, dead = split(iter_jsonl(whole))
    assert len(kept) == 200 and [(d.reason, d.scope) for d in dead] == [("truncated_stream", "file")]
    assert "breaks after line 200;" in dead[0].detail


def test_truncated_zstd_is_reported(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(lines_of(rows_for(0) * 200))
    kept, dead = split(iter_jsonl(write(tmp_path / "t.jsonl.zst", data[:-50])))
    assert dead[-1].reason == "truncated_stream"
    assert len(kept) + sum(d.line is not None for d in dead) <= 1000


def test_gzip_with_a_bad_crc_keeps_the_lines_and_reports_the_file(tmp_path: Path) -> None:
    data = bytearray(gzip.compress(lines_of(ROWS)))
    data[-8:-4] = struct.pack("<I", zlib.crc32(b"something else"))  # the CRC32 field of the trailer
    path = write(tmp_path / "crc.jsonl.gz", bytes(data))
    kept, dead = split(iter_jsonl(path))
    assert [row for _, row in kept] == ROWS  # recovered although the failing zlib call raised
    assert [(d.reason, d.records, d.scope, d.line) for d in dead] == [("crc_mismatch", 0, "file", None)]
    assert str(dead[0]).startswith(path)
    assert "gzip CRC32 check failed at the end of a member" in dead[0].detail
    assert "nothing follows that member; lines 1-3 were read (kept if they validate)" in dead[0].detail
    assert dead[0].detail.endswith("row count unknown")  # damaged data may hold more or fewer lines


def test_gzip_crc_mismatch_after_n_records_then_more_data_stops_there(tmp_path: Path) -> None:
    first, second = rows_for(0) * 4, rows_for(1)
    damaged = bytearray(gzip.compress(lines_of(first)))
    damaged[-8:-4] = struct.pack("<I", zlib.crc32(b"something else"))
    after = gzip.compress(lines_of(second))
    path = write(tmp_path / "crc2.jsonl.gz", bytes(damaged) + after)
    kept, dead = split(iter_jsonl(path))
    assert [row for _, row in kept] == first  # the damaged member's 20 lines were read; reading stops there
    (report,) = dead
    assert (report.reason, report.records, report.scope) == ("crc_mismatch", 0, "file")
    assert f"the {len(after)} bytes after it (from byte {len(damaged)}) are not read" in report.detail
    assert "the stream breaks after line 20; lines 1-20 were read before the break" in report.detail
    assert report.detail.endswith("row count unknown")
    damaged = bytearray(gzip.compress(lines_of(first) + b'{"id": "last", "text": "no newline"}'))
    damaged[-4:] = struct.pack("<I", 1)  # ISIZE, the member's length field
    kept, dead = split(iter_jsonl(write(tmp_path / "len.jsonl.gz", bytes(damaged))))
    assert len(kept) == 21 and kept[-1][1]["id"] == "last"  # nothing follows: the last line is whole
    assert [(d.reason, d.scope) for d in dead] == [("crc_mismatch", "file")]
    assert "gzip length check failed" in dead[0].detail and "lines 1-21 were read" in dead[0].detail


def test_crc_mismatch_with_the_length_field_in_the_next_read(tmp_path: Path) -> None:
    """The member's 4 length bytes after its CRC start the next read(): they are the member's, not junk."""
    rows = [{"id": str(i), "text": f"{i} " + "abcdefghij" * (i % 40)} for i in range(600)]

    def member(name: str) -> bytes:
        buf = io.BytesIO()
        with gzip.GzipFile(filename=name, mode="wb", fileobj=buf, mtime=0) as gz:
            gz.write(lines_of(rows))
        return buf.getvalue()

    size = len(member("a"))
    # reads start at file offsets 4 + k * READ_BYTES (the 4-byte sniff first): end the CRC just before one
    target = ((size - 8) // READ_BYTES + 1) * READ_BYTES + 8
    data = bytearray(member("a" * (1 + target - size)))  # the header's file name pads the member
    assert len(data) == target
    data[-8:-4] = struct.pack("<I", 0)
    kept, dead = split(iter_jsonl(write(tmp_path / "split.jsonl.gz", bytes(data))))
    assert len(kept) == 600 and [(d.reason, d.scope) for d in dead] == [("crc_mismatch", "file")]
    assert "nothing follows that member; lines 1-600 were read" in dead[0].detail


def test_corrupt_deflate_reports_the_file_and_no_garbled_row_is_kept(tmp_path: Path) -> None:
    rows = [{"id": str(i), "text": f"sentence number {i} " * 5} for i in range(300)]
    data = bytearray(gzip.compress(lines_of(rows)))
    for i in range(len(data) // 2, len(data) // 2 + 6):
        data[i] ^= 0xFF
    kept, dead = split(iter_jsonl(write(tmp_path / "bad.jsonl.gz", bytes(data))))
    assert [row for _, row in kept] == rows[: len(kept)]
    assert dead and dead[-1].reason in ("corrupt_stream", "crc_mismatch") and dead[-1].line is None


def test_corrupt_zstd_is_reported(tmp_path: Path) -> None:
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(lines_of(rows_for(1) * 100)))
    data[len(data) // 2] ^= 0xFF
    _, dead = split(iter_jsonl(write(tmp_path / "bad.jsonl.zst", bytes(data))))
    assert dead[-1].reason in ("corrupt_stream", "crc_mismatch")


def test_missing_file_is_one_file_level_report(tmp_path: Path) -> None:
    (dead,) = list(iter_jsonl(str(tmp_path / "nope.jsonl")))
    assert (dead.reason, dead.records, dead.scope) == ("file_unreadable", 0, "file")
    assert dead.detail.startswith("cannot read the file:") and dead.detail.endswith("; row count unknown")


def test_over_long_lines_are_reported_and_skipped_not_buffered(tmp_path: Path) -> None:
    data = b'{"id": "1", "text": "ok"}\n' + b'{"text": "' + b"x" * 5000 + b'"}\n' + b'{"id": "3", "text": "after"}\n'
    path = write(tmp_path / "long.jsonl", data + b'{"never": "ends' + b"y" * 5000)
    items = list(iter_jsonl(path, max_line_bytes=1000))
    assert [i[1]["id"] for i in items if isinstance(i, tuple)] == ["1", "3"]
    dead = [i for i in items if isinstance(i, DeadLetter)]
    assert [(d.reason, d.line) for d in dead] == [("line_too_long", 2), ("line_too_long", 4)]
    assert len(dead[0].snippet) <= 120
    exact = write(tmp_path / "exact.jsonl", b'{"t": "' + b"z" * 991 + b'"}\n')  # 1000 bytes + LF
    assert [type(i) for i in iter_jsonl(exact, max_line_bytes=1000)] == [tuple]
    assert [type(i) for i in iter_jsonl(exact, max_line_bytes=999)] == [DeadLetter]


def test_newline_conventions(tmp_path: Path) -> None:
    body = [json.dumps(r, ensure_ascii=False).encode() for r in ROWS]
    crlf = write(tmp_path / "crlf.jsonl", b"\r\n".join(body) + b"\r\n")
    cr_only = write(tmp_path / "cr.jsonl", b"\r".join(body) + b"\r")
    no_final_newline = write(tmp_path / "nofinal.jsonl", b"\n".join(body))
    for path in (crlf, cr_only, no_final_newline):
        kept, dead = split(iter_jsonl(path))
        assert dead == [] and [row for _, row in kept] == ROWS, path
        assert [loc["line"] for loc, _ in kept] == [1, 2, 3]


def test_boms_blank_lines_and_utf16(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    text = bom + lines_of(ROWS[:1]) + b"  \t\n\n" + bom + lines_of(ROWS[1:])
    kept, dead = split(iter_jsonl(write(tmp_path / "bom.jsonl", text)))
    assert dead == [] and [row for _, row in kept] == ROWS
    assert [loc["line"] for loc, _ in kept] == [1, 4, 5]
    decoded = lines_of(ROWS).decode()
    for codec in ("utf-16", "utf-16-be"):
        data = decoded.encode(codec) if codec == "utf-16" else b"\xfe\xff" + decoded.encode(codec)
        kept, dead = split(iter_jsonl(write(tmp_path / f"{codec}.jsonl", data)))
        assert dead == [] and [row for _, row in kept] == ROWS
    broken = b"\xff\xfe" + '{"a": 1}\n'.encode("utf-16-le") + b"\x00\xd8" + '{"b": 2}\n'.encode("utf-16-le")
    kept, dead = split(iter_jsonl(write(tmp_path / "bad16.jsonl", broken)))
    assert [row for _, row in kept] == [{"a": 1}] and dead[-1].reason == "invalid_utf16"


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"a": 1', "json_syntax"),
        (b'{"a": 1} {"b": 2}', "json_syntax"),
        (b"[1, 2]", "not_an_object"),
        (b"null", "not_an_object"),
        (b'{"a": NaN}', "nonstandard_json"),
        (b'{"a": -Infinity}', "nonstandard_json"),
        (b'{"a": 1e999}', "number_too_large"),
        (b'{"a": ' + b"9" * 5000 + b"}", "number_too_large"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nesting_too_deep"),
        (b'{"a": 1, "a": 2}', "duplicate_key"),
        (b'{"x": {"a": 1, "a": 1}}', "duplicate_key"),
        (b'{"a": "\\ud83d"}', "invalid_unicode"),
        (b'{"a": "caf\xe9"}', "invalid_utf8"),
        (b'{"a": "\x00"}', "nul_byte"),
        ('{"a": "\u0444"}'.encode("utf-16-le"), "invalid_utf8"),
    ],
)
def test_parse_line_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_line(raw)
    assert err.value.reason == reason


def test_parse_line_accepts_valid_json() -> None:
    assert parse_line(b'{"a": "\\ud83d\\ude00", "b": "\\u0000", "c": 1.5e3}') == {"a": "😀", "b": "\x00", "c": 1500.0}


def test_a_bad_line_never_stops_the_file(tmp_path: Path) -> None:
    data = b'{"id": "1", "text": "a"}\n\xff\xfe garbage\n{"id": "2", "text": "b"}\n{"id": 3\n{"id": "4", "text": "c"}\n'
    kept, dead = split(iter_jsonl(write(tmp_path / "mixed.jsonl", data)))
    assert [row["id"] for _, row in kept] == ["1", "2", "4"]
    assert [(d.reason, d.line) for d in dead] == [("invalid_utf8", 2), ("json_syntax", 4)]


def test_read_file_validates_kind_and_keeps_the_location(tmp_path: Path) -> None:
    data = lines_of([{"id": "1", "text": "fine"}, {"id": "2", "text": " "}, {"id": "3"}, {"text": "no id"}])
    path = write(tmp_path / "docs.jsonl", data)
    kept, dead = split(read_file(path, kind="document"))
    assert [row["text"] for row in kept] == ["fine", "no id"] and kept[1]["id"]  # content-hash id
    assert [(d.reason, d.line, d.source) for d in dead] == [("empty_value", 2, path), ("missing_field", 3, path)]
    assert "field 'text'" in dead[1].detail
    assert list(read_file(path)) == [json.loads(line) for line in data.splitlines()]
    with pytest.raises(UserError, match="record kind"):
        read_file(path, kind="poem")


def test_read_chains_files_in_order(tmp_path: Path) -> None:
    write(tmp_path / "b.jsonl", lines_of(rows_for(2)))
    write(tmp_path / "a.jsonl.gz", gzip.compress(lines_of(rows_for(1))))
    assert [row["id"] for row in read(str(tmp_path / "*.jsonl*"))] == [r["id"] for r in rows_for(1) + rows_for(2)]


def test_memory_stays_flat_while_streaming_a_large_gzip(tmp_path: Path) -> None:
    """200k rows (~50 MB of JSON): peak RSS may grow by < 60 MB; holding the rows would need > 200 MB."""
    path = tmp_path / "big.jsonl.gz"
    with open_shard(str(path), "jsonl.gz") as write_row:
        for i in range(200_000):
            write_row({"id": f"row-{i}", "text": f"document {i} " + "lorem ipsum " * 16, "meta": {"i": i}})
    script = textwrap.dedent(
        """
        import resource, sys
        from dataflywheel.io import read_file
        list(read_file(sys.argv[1] + ".missing.jsonl"))  # import and warm every code path first
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = sum(1 for _ in read_file(sys.argv[1], kind="document"))
        print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    rows, growth_kib = map(int, out.stdout.split())
    assert rows == 200_000
    assert growth_kib < 60 * 1024, f"peak RSS grew by {growth_kib / 1024:.0f} MB"
    assert os.path.getsize(path) > 1_000_000
