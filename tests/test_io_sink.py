"""Atomic shard writers, the success marker, and the path / format dispatch that must skip their leftovers."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from dataflywheel.errors import UserError
from dataflywheel.io import ShardWriter, detect_format, expand_paths, open_shard, read, write_success
from dataflywheel.io.commit import finalize_shards, shard_prefix, shards_of
from dataflywheel.io.jsonl import iter_jsonl

ROWS = [{"id": str(i), "text": f"row {i}"} for i in range(25)]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_a_killed_writer_leaves_no_final_file_and_no_temp(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"shard.{fmt}"
    with pytest.raises(Boom), open_shard(str(path), fmt) as write:
        write(ROWS[0])
        assert all(n.startswith(f".shard.{fmt}.tmp-") for n in os.listdir(tmp_path))  # hidden while written
        assert not path.exists()
        raise Boom
    assert os.listdir(tmp_path) == []


def test_an_old_file_survives_a_failed_rewrite(tmp_path: Path) -> None:
    path = str(tmp_path / "keep.jsonl")
    with open_shard(path, "jsonl") as write:
        write(ROWS[0])
    with pytest.raises(ValueError, match="id='nan'"), open_shard(path, "jsonl") as write:
        write({"id": "nan", "score": float("nan")})  # not JSON: refused rather than written
    assert [row for _, row in iter_jsonl(path)] == [ROWS[0]]
    assert os.listdir(tmp_path) == ["keep.jsonl"]


def test_gzip_shards_are_reproducible_and_do_not_carry_the_temp_name(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"{n}.jsonl.gz") for n in ("a", "b")]
    for path in paths:
        with open_shard(path, "jsonl.gz") as write:
            for row in ROWS:
                write(row)
    a, b = (Path(p).read_bytes() for p in paths)
    assert a == b and b".tmp-" not in a
    assert gzip.decompress(a).decode().splitlines()[1] == '{"id":"1","text":"row 1"}'


def test_shard_writer_rolls_shards(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path / "out"), "jsonl.zst", prefix="docs", rows_per_shard=10) as writer:
        for row in ROWS:
            writer.write(row)
    shards = writer.close()
    assert [(Path(p).name, n) for p, n in shards] == [
        ("docs-00000.jsonl.zst", 10),
        ("docs-00001.jsonl.zst", 10),
        ("docs-00002.jsonl.zst", 5),
    ]
    assert list(read(str(tmp_path / "out"))) == ROWS


def test_shard_writer_exception_keeps_finished_shards_only(tmp_path: Path) -> None:
    writer = ShardWriter(str(tmp_path), "jsonl", rows_per_shard=10)
    with pytest.raises(Boom), writer:
        for row in ROWS:
            writer.write(row)
        raise Boom
    assert sorted(os.listdir(tmp_path)) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert [n for _, n in writer.shards] == [10, 10]


def test_commit_reads_only_the_named_shards(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path), "jsonl", prefix=shard_prefix(), rows_per_shard=10) as writer:
        for row in ROWS:
            writer.write(row)
    with ShardWriter(str(tmp_path), "jsonl", prefix=shard_prefix()) as stray:  # a retried bundle's first try
        stray.write(ROWS[0])
    (tmp_path / ".part-00009.jsonl.tmp-dead").write_text("half a row")  # a killed writer's leftover
    with pytest.raises(UserError, match="unfinished pipeline output"):  # part files, no marker yet
        expand_paths(str(tmp_path))
    info = finalize_shards(str(tmp_path), "jsonl", shards_of(writer))
    assert info["rows"] == 25 and [s["rows"] for s in info["shards"]] == [10, 10, 5]
    assert expand_paths(str(tmp_path)) == [str(tmp_path / s["file"]) for s in info["shards"]]
    assert list(read(str(tmp_path))) == list(read(str(tmp_path / "*.jsonl"))) == ROWS
    assert sorted(os.listdir(tmp_path)) == sorted([s["file"] for s in info["shards"]] + ["_SUCCESS.json"])
    marker = write_success(str(tmp_path), {"rows": 25, "shards": ["not a dict"]})
    with pytest.raises(UserError, match="_SUCCESS.json: shards"):
        expand_paths(str(tmp_path))
    assert Path(marker).name == "_SUCCESS.json"


def test_expand_paths(tmp_path: Path) -> None:
    files = ["a/1.jsonl", "a/b/2.jsonl.gz", "a/b/3.parquet", "a/_rejected/x.jsonl", "a/.hidden/y.jsonl", "a/notes.txt"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "a" / "hf" / "data").mkdir(parents=True)
    (tmp_path / "a" / "hf" / "data" / "train-00000-of-00001.parquet").write_text("")
    root = str(tmp_path)
    want = [f"{root}/a/1.jsonl", f"{root}/a/b/2.jsonl.gz", f"{root}/a/b/3.parquet", f"{root}/a/hf"]
    assert expand_paths(f"{root}/a") == want
    assert expand_paths(f"{root}/a/**/*.jsonl*") == [f"{root}/a/1.jsonl", f"{root}/a/b/2.jsonl.gz"]
    assert expand_paths([f"{root}/a/b/*", f"{root}/a/1.jsonl", f"{root}/a/b/3.parquet"]) == [
        f"{root}/a/b/2.jsonl.gz",
        f"{root}/a/b/3.parquet",
        f"{root}/a/1.jsonl",
    ]
    assert expand_paths(f"{root}/a/*") == [f"{root}/a/1.jsonl"] + want[1:3] + [f"{root}/a/hf", f"{root}/a/notes.txt"]
    with pytest.raises(UserError, match=r"no input files match '.*/nothing/\*\.jsonl'"):
        expand_paths([f"{root}/a/1.jsonl", f"{root}/nothing/*.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        expand_paths(f"{root}/empty")


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("x.jsonl", "jsonl"),
        ("x.JSONL.GZ", "jsonl"),
        ("x.ndjson.zst", "jsonl"),
        ("x.json-lines", "jsonl"),
        ("x.parquet", "parquet"),
        ("crawl.warc.gz", "warc"),
        ("old.arc", "warc"),
        ("page.htm", "html"),
        ("page.html.gz", "html"),
    ],
)
def test_detect_format_by_extension(name: str, fmt: str) -> None:
    assert detect_format(f"/data/{name}") == fmt


def test_detect_format_errors_name_the_file_and_the_formats(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"/data/x\.csv: unknown input format; expected one of jsonl, parquet, hf"):
        detect_format("/data/x.csv")
    with pytest.raises(UserError, match="one object per line"):
        detect_format("/data/pairs.json")
    with pytest.raises(UserError, match="not a Hugging Face dataset folder"):
        detect_format(str(tmp_path))
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    assert detect_format(str(tmp_path)) == "hf"
    with pytest.raises(UserError, match="unknown format 'csv'"):
        read(str(tmp_path / "dataset_dict.json"), fmt="csv")


def test_other_tools_part_files_are_data(tmp_path: Path) -> None:
    """Only our own shard names without a marker mean 'unfinished': Spark-style part files are read."""
    (tmp_path / "part-00000-3c1e-c000.jsonl").write_text('{"id": "1", "text": "a"}\n')
    (tmp_path / "_SUCCESS").write_text("")  # Hadoop's empty marker
    assert [r["id"] for r in read(str(tmp_path))] == ["1"]
