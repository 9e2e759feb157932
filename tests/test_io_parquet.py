"""Parquet reading (row-group streaming, page checksums, broken files) and the parquet shard writer."""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataflywheel.io import DeadLetter, ShardWriter, open_shard, read_file
from dataflywheel.io.parquet import iter_parquet

CONVERSATIONS = [
    {
        "id": f"c{i}",
        "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
        "meta": {"source": "test", "round": i, "lineage": ["seed", f"gen{i}"]},
        "scores": {"reward": i / 10},
        "tags": ["a", "b"][: i % 3],
    }
    for i in range(25)
]


def split(items) -> tuple[list, list[DeadLetter]]:
    items = list(items)
    return [i for i in items if not isinstance(i, DeadLetter)], [i for i in items if isinstance(i, DeadLetter)]


def text_table(n: int) -> pa.Table:
    return pa.table({"id": [f"t{i}" for i in range(n)], "text": [f"document number {i} " * 8 for i in range(n)]})


def test_round_trip_keeps_nested_dicts_and_lists(tmp_path: Path) -> None:
    path = str(tmp_path / "conv.parquet")
    with open_shard(path, "parquet") as write:
        for row in CONVERSATIONS:
            write(row)
    kept, dead = split(iter_parquet(path))
    assert dead == []
    assert [row for _, row in kept] == CONVERSATIONS
    assert [loc for loc, _ in kept] == [{"row": i} for i in range(25)]
    assert pq.ParquetFile(path).metadata.num_rows == 25
    validated = list(read_file(path, kind="conversation"))
    assert [row["id"] for row in validated] == [row["id"] for row in CONVERSATIONS]


def test_dicts_with_different_keys_come_back_with_none_for_the_missing_keys(tmp_path: Path) -> None:
    """The documented Parquet limitation: a struct column holds the union of the keys."""
    path = str(tmp_path / "meta.parquet")
    with open_shard(path, "parquet") as write:
        write({"id": "1", "meta": {"a": 1}})
        write({"id": "2", "meta": {"b": "x"}})
    assert [row["meta"] for _, row in iter_parquet(path)] == [{"a": 1, "b": None}, {"a": None, "b": "x"}]


def test_rows_are_numbered_across_batches_and_row_groups(tmp_path: Path) -> None:
    path = str(tmp_path / "groups.parquet")
    pq.write_table(text_table(95), path, row_group_size=20)
    kept, _ = split(iter_parquet(path, batch_rows=7))
    assert [loc["row"] for loc, _ in kept] == list(range(95))
    assert [row["id"] for _, row in kept] == [f"t{i}" for i in range(95)]


def test_corrupt_page_fails_only_its_row_group(tmp_path: Path) -> None:
    path = tmp_path / "crc.parquet"
    pq.write_table(
        text_table(40), path, row_group_size=10, write_page_checksum=True, compression="none", use_dictionary=False
    )
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(1)  # the text column of row group 2
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    kept, dead = split(iter_parquet(str(path)))
    assert [loc["row"] for loc, _ in kept] == list(range(20)) + list(range(30, 40))
    assert [(d.row, d.reason) for d in dead] == [(r, "page_checksum_mismatch") for r in range(20, 30)]
    assert all("row group 2" in d.detail and d.records == 1 for d in dead)


def test_broken_files_are_one_file_level_report(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(text_table(10), good)
    data = good.read_bytes()
    cases = {
        "truncated.parquet": data[: len(data) * 2 // 3],
        "json.parquet": b'{"id": "1", "text": "x"}\n',
        "empty.parquet": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    # the row count lives in the footer: with the footer gone it cannot be known
    (dead,) = iter_parquet(str(tmp_path / "truncated.parquet"))
    assert (dead.reason, dead.records, dead.row, dead.scope) == ("file_unreadable", 0, None, "file")
    assert dead.detail.endswith("no readable footer: row count unknown")
    (dead,) = iter_parquet(str(tmp_path / "json.parquet"))
    assert (dead.reason, dead.records, dead.scope) == ("file_unreadable", 0, "file")
    assert "looks like JSON" in dead.detail and "row count unknown" in dead.detail
    (dead,) = iter_parquet(str(tmp_path / "empty.parquet"))
    assert (dead.reason, dead.records, dead.scope) == ("empty_file", 0, "file")
    assert "row count unknown" not in dead.detail  # 0 bytes: 0 rows, known
    (dead,) = iter_parquet(str(tmp_path / "missing.parquet"))
    assert (dead.reason, dead.records, dead.scope) == ("file_unreadable", 0, "file")
    assert str(tmp_path / "missing.parquet") in str(dead) and "row count unknown" in dead.detail


def test_unreadable_file_with_a_readable_footer_counts_the_footer_rows(tmp_path: Path) -> None:
    path = tmp_path / "schema.parquet"
    pq.write_table(text_table(30), path, row_group_size=10)
    data = bytearray(path.read_bytes())
    arrow_schema = pq.read_metadata(path).metadata[b"ARROW:schema"]  # base64 of pyarrow's schema, in the footer
    at = data.index(arrow_schema)
    data[at + 20 : at + 40] = b"A" * 20  # still base64, no longer a schema: pyarrow refuses the whole file
    path.write_bytes(bytes(data))
    with pytest.raises(pa.ArrowInvalid):
        pq.ParquetFile(path)
    (dead,) = iter_parquet(str(path))
    assert (dead.reason, dead.records, dead.scope, dead.row) == ("file_unreadable", 30, "file", None)
    assert dead.detail.endswith("its footer says 30 rows, none of which can be read")
    cut = tmp_path / "footer_gone.parquet"  # the same file without its last bytes: no footer, no count
    cut.write_bytes(bytes(data[:-20]))
    (dead,) = iter_parquet(str(cut))
    assert (dead.reason, dead.records, dead.scope) == ("file_unreadable", 0, "file")
    assert "row count unknown" in dead.detail


def test_footer_read_but_schema_not_is_one_report_for_every_row(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(text_table(25), path, row_group_size=10)

    def broken(self):
        raise pa.ArrowNotImplementedError("unsupported logical type")

    monkeypatch.setattr(pq.ParquetFile, "schema_arrow", property(broken))
    (dead,) = iter_parquet(str(path))
    assert (dead.reason, dead.records, dead.scope) == ("file_unreadable", 25, "file")
    assert "the footer says 25 rows, but the file cannot be read from row 0 on" in dead.detail
    assert dead.detail.endswith("rows 0-24 lost")


def test_unreadable_pages_with_a_readable_footer_are_reported_row_by_row(tmp_path: Path) -> None:
    path = tmp_path / "zeroed.parquet"
    pq.write_table(text_table(30), path, row_group_size=10, write_page_checksum=True)
    meta = pq.read_metadata(path)
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - meta.serialized_size
    data[4:footer_start] = bytes(footer_start - 4)  # every page gone, the footer intact
    path.write_bytes(bytes(data))
    kept, dead = split(iter_parquet(str(path)))
    assert kept == [] and [d.row for d in dead] == list(range(30))  # the footer's 30 rows, each at its number
    assert {(d.records, d.scope) for d in dead} == {(1, "record")}
    assert {d.detail.split(":")[0] for d in dead} == {f"row group {g} unreadable" for g in range(3)}


def test_column_selection(tmp_path: Path) -> None:
    path = str(tmp_path / "t.parquet")
    pq.write_table(text_table(5), path)
    assert [row for _, row in iter_parquet(path, columns=["id"])] == [{"id": f"t{i}"} for i in range(5)]
    (dead,) = iter_parquet(path, columns=["id", "body"])
    assert (dead.reason, dead.records) == ("missing_field", 5) and "'body'" in dead.detail


def test_non_json_arrow_types_become_json_values(tmp_path: Path) -> None:
    path = str(tmp_path / "types.parquet")
    table = pa.table(
        {
            "when": pa.array([dt.datetime(2024, 5, 1, 12, 30)], pa.timestamp("us")),
            "day": pa.array([dt.date(2024, 5, 1)]),
            "price": pa.array([decimal.Decimal("1.10")], pa.decimal128(5, 2)),
            "blob": pa.array([b"\x00\xff"]),
            "counts": pa.array([[("a", 1)]], pa.map_(pa.string(), pa.int64())),
            "nested": pa.array([{"raw": b"hi"}]),
        }
    )
    pq.write_table(table, path)
    ((_, row),) = iter_parquet(path)
    assert row == {
        "when": "2024-05-01T12:30:00",
        "day": "2024-05-01",
        "price": "1.10",
        "blob": "AP8=",
        "counts": {"a": 1},
        "nested": {"raw": "aGk="},
    }


def test_shard_writer_parquet_shards_read_back_in_order(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path), "parquet", rows_per_shard=10) as writer:
        for row in CONVERSATIONS:
            writer.write(row)
    shards = writer.close()
    assert [(Path(p).name, n) for p, n in shards] == [
        ("part-00000.parquet", 10),
        ("part-00001.parquet", 10),
        ("part-00002.parquet", 5),
    ]
    rows = [row for path, _ in shards for _, row in iter_parquet(path)]
    assert rows == CONVERSATIONS


def test_explicit_schema(tmp_path: Path) -> None:
    path = str(tmp_path / "s.parquet")
    schema = pa.schema([("id", pa.string()), ("score", pa.float32())])
    with open_shard(path, "parquet", schema=schema) as write:
        write({"id": "1", "score": 1})
    assert pq.read_schema(path).field("score").type == pa.float32()
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)), open_shard(path, "parquet", schema=schema) as write:
        write({"id": "2", "score": "high"})
    assert [row for _, row in iter_parquet(path)] == [{"id": "1", "score": 1.0}]  # the old file is intact
