"""Every JSONL / Parquet file of the bad-input corpus, read with validation, checked against its manifest.

Per record: "keep" kept (by id, or by not being reported where the manifest has no id), "reject"
reported at its line/row with the manifest's reason, "either" kept or reported (never both, never
neither), "skip" (blank) not reported. Per file: the file-level expectation, and
``kept + sum(dead.records) == records`` (blank lines excluded).

Files whose record count cannot be recovered from their bytes (UNCOUNTABLE) get a documented,
file-specific check instead of the count identity.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from dataflywheel.io import DeadLetter, read_file
from dataflywheel.io.base import UNKNOWN_COUNT

KIND = {
    "text": "document",
    "sft": "conversation",
    "pref": "preference",
    "pref_conv": "preference",
    "pref_hh": "preference",
}
MANIFEST = SHARED_DATA / "bad_inputs" / "manifest.json"
FILES = (
    [f for f in json.loads(MANIFEST.read_text())["files"] if f["format"] in ("jsonl", "parquet")]
    if MANIFEST.is_file()
    else []
)

# Why the count identity cannot hold for these files, and what is checked instead:
UNCOUNTABLE = {
    # The gzip stream stops mid-member: the lines after the cut (and their number) are not in the
    # file. Lines 1-25 are kept, the partial line 26 is reported, plus a file-level report.
    "gz/truncated.jsonl.gz",
    # The flipped bytes garble the deflate output from line 19 on: garbled lines merge or split,
    # so neither manifest line numbers nor the count survive; the intact prefix is kept.
    "gz/corrupt_deflate.jsonl.gz",
    # Footer missing / footer length wrong / not Parquet: the row count lives in the footer, so
    # the one file-level report counts records=0 and says "row count unknown".
    "parquet/truncated.parquet",
    "parquet/bad_footer_length.parquet",
    "parquet/not_parquet.parquet",
}

# The file-level report of each damaged file: reason, records, and what its detail must say.
FILE_REPORTS = {
    "gz/bad_crc.jsonl.gz": ("crc_mismatch", 0, ["gzip CRC32 check failed", "nothing follows that member",
                                                "lines 1-20 were read (kept if they validate)", UNKNOWN_COUNT]),
    "gz/corrupt_deflate.jsonl.gz": ("crc_mismatch", 0, ["gzip CRC32 check failed", "lines 1-37 were read",
                                                        UNKNOWN_COUNT]),
    "gz/trailing_garbage.jsonl.gz": ("trailing_garbage", 0, ["300 bytes after the last gzip member",
                                                             "all 30 lines before them were read"]),
    "gz/truncated.jsonl.gz": ("truncated_stream", 0, ["the stream breaks after line 25 (line 26 is cut off",
                                                      "lines 1-25 were read before the break", UNKNOWN_COUNT]),
    "parquet/truncated.parquet": ("file_unreadable", 0, ["not a readable Parquet file", UNKNOWN_COUNT]),
    "parquet/bad_footer_length.parquet": ("file_unreadable", 0, ["not a readable Parquet file", UNKNOWN_COUNT]),
    "parquet/not_parquet.parquet": ("file_unreadable", 0, ["looks like JSON text", UNKNOWN_COUNT]),
    "parquet/empty.parquet": ("empty_file", 0, ["0-byte file"]),
}


def _read(shared_data: Path, entry: dict) -> tuple[str, list[dict], list[DeadLetter]]:
    path = str(shared_data / "bad_inputs" / entry["path"])
    items = list(read_file(path, kind=KIND[entry["schema"]]))
    kept = [item for item in items if not isinstance(item, DeadLetter)]
    dead = [item for item in items if isinstance(item, DeadLetter)]
    return path, kept, dead


def _position(dead: DeadLetter) -> int | None:
    return dead.line if dead.line is not None else dead.row


def _record_count(entry: dict) -> int:
    counts = entry["counts"]
    if "rows" in counts:
        return counts["rows"]
    return counts["lines"] - counts.get("blank", 0)


@pytest.mark.parametrize("entry", FILES, ids=[f["path"] for f in FILES])
def test_bad_input_file(shared_data: Path, entry: dict) -> None:
    path, kept, dead = _read(shared_data, entry)
    for d in dead:
        assert d.source == path and d.reason and d.detail, d
    per_record = [d for d in dead if _position(d) is not None]
    file_level = [d for d in dead if _position(d) is None]
    assert all((d.scope, d.records) == ("record", 1) for d in per_record), per_record
    assert all(d.scope == "file" for d in file_level), file_level
    if entry["path"] in FILE_REPORTS:
        reason, records, phrases = FILE_REPORTS[entry["path"]]
        (report,) = file_level
        assert (report.reason, report.records) == (reason, records), report
        assert all(p in report.detail for p in phrases), report.detail
    else:
        assert file_level == [], file_level
    positions = Counter(_position(d) for d in per_record)
    assert not [p for p, n in positions.items() if n > 1], "a record reported twice"
    reported = {_position(d): d for d in per_record}
    kept_ids = Counter(row["id"] for row in kept)
    assert all(n == 1 for n in kept_ids.values()), "a record kept twice"

    if entry.get("file_level") == "must_report":
        assert file_level, "the file-level problem is not reported"
    if entry["path"] in UNCOUNTABLE:
        _check_uncountable(entry, kept, per_record, file_level)
        return

    for rec in entry.get("records", []):
        pos = rec.get("line", rec.get("row"))
        is_reported = pos in reported
        is_kept = rec["id"] in kept_ids if "id" in rec else not is_reported
        where = f"{entry['path']} @ {pos} ({rec['expect']}: {rec.get('detail', '')})"
        if rec["expect"] == "keep":
            assert is_kept and not is_reported, where
        elif rec["expect"] == "reject":
            assert is_reported and not is_kept, where
            if rec.get("reason"):
                assert reported[pos].reason == rec["reason"], where
        elif rec["expect"] == "either":
            assert is_kept != is_reported, where
        else:  # skip: a blank line is no record
            assert not is_reported, where
    assert len(kept) + sum(d.records for d in dead) == _record_count(entry)


def _check_uncountable(entry: dict, kept: list[dict], per_record: list, file_level: list) -> None:
    name = entry["path"]
    assert file_level, "a broken file must be reported as such"
    records = entry.get("records", [])
    if name == "gz/truncated.jsonl.gz":
        recoverable = entry["recoverable_complete_lines"]
        assert [row["id"] for row in kept] == [r["id"] for r in records[:recoverable]]
        assert [(d.line, d.reason, d.records) for d in per_record] == [(recoverable + 1, "lost_in_truncation", 1)]
        assert [d.reason for d in file_level] == ["truncated_stream"]
    elif name == "gz/corrupt_deflate.jsonl.gz":
        # Kept rows are exactly an intact prefix of the original lines: no garbled row gets through.
        assert kept, "the lines before the corruption decode intact and are kept"
        assert [row["id"] for row in kept] == [r["id"] for r in records[: len(kept)]]
        assert min(d.line for d in per_record) == len(kept) + 1
        assert [d.reason for d in file_level] == ["crc_mismatch"]
        assert len(kept) + len(per_record) <= _record_count(entry)
    else:  # checked by FILE_REPORTS: one file_unreadable report, records=0, "row count unknown"
        assert not kept and not per_record
