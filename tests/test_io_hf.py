"""Hugging Face dataset folders, checked against the real ``datasets`` library, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataflywheel.errors import UserError
from dataflywheel.io import DeadLetter, detect_format, expand_paths, read, read_file
from dataflywheel.io.hf import iter_hf, write_hf_folder

# datasets reads these when it is imported: nothing here may touch the network.
datasets = pytest.importorskip("datasets")

ROWS = [
    {
        "id": f"r{i}",
        "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
        "meta": {"round": i},
        "scores": {"reward": i / 4},
    }
    for i in range(10)
]


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


def rows_of(items) -> list[dict]:
    items = list(items)
    assert not [i for i in items if isinstance(i, DeadLetter)]
    return items


def test_save_to_disk_folder(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder), num_shards=3)  # read in state.json order
    assert detect_format(str(folder)) == "hf"
    assert rows_of(read_file(str(folder))) == ROWS
    locs = [loc for loc, _ in iter_hf(str(folder))]
    assert locs[0] == {"file": "data-00000-of-00003.arrow", "row": 0}
    assert locs[-1] == {"file": "data-00002-of-00003.arrow", "row": 2}


def test_dataset_dict_folder_and_splits(tmp_path: Path) -> None:
    folder = tmp_path / "dd"
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:7]), "test": datasets.Dataset.from_list(ROWS[7:])}
    )
    dd.save_to_disk(str(folder))
    assert rows_of(read_file(str(folder))) == ROWS[:7]
    assert rows_of(read_file(str(folder), split="test", kind="conversation")) == ROWS[7:]
    with pytest.raises(UserError, match="no split 'dev'"):
        list(read_file(str(folder), split="dev"))


def test_corrupt_arrow_shard_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    (shard,) = folder.glob("*.arrow")
    good = shard.read_bytes()
    shard.write_bytes(b"not arrow at all")
    (dead,) = read_file(str(folder))
    assert (dead.reason, dead.records, dead.scope, dead.source) == ("file_unreadable", 0, "file", str(shard))
    assert "no row was read" in dead.detail and dead.detail.endswith("row count unknown")
    shard.write_bytes(good[: len(good) * 3 // 4])  # an Arrow stream has no row count up front
    items = list(read_file(str(folder)))
    dead = [i for i in items if isinstance(i, DeadLetter)]
    assert [(d.reason, d.records, d.scope) for d in dead] == [("file_unreadable", 0, "file")]
    assert "row count unknown" in dead[0].detail


def test_missing_column_in_an_arrow_shard_stands_for_all_its_rows(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    (dead,) = iter_hf(str(folder), columns=["id", "text"])
    assert (dead.reason, dead.records, dead.scope) == ("missing_field", len(ROWS), "file")
    assert "'text'" in dead.detail and f"all {len(ROWS)} rows" in dead.detail


def test_hub_layout_written_by_datasets(tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    (folder / "data").mkdir(parents=True)
    for k, part in enumerate((ROWS[:4], ROWS[4:8])):
        datasets.Dataset.from_list(part).to_parquet(str(folder / "data" / f"train-{k:05d}-of-00002.parquet"))
    datasets.Dataset.from_list(ROWS[8:]).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    assert detect_format(str(folder)) == "hf" and expand_paths(str(folder)) == [str(folder)]
    assert rows_of(read_file(str(folder))) == ROWS[:8]
    assert rows_of(read_file(str(folder), split="test")) == ROWS[8:]
    assert rows_of(read_file(str(folder), split="test")) == list(
        datasets.load_dataset(str(folder), split="test", cache_dir=str(tmp_path / "c"))
    )


def test_split_named_folders_with_jsonl(tmp_path: Path) -> None:
    for split, part in (("train", ROWS[:6]), ("validation", ROWS[6:])):
        (tmp_path / "j" / split).mkdir(parents=True)
        (tmp_path / "j" / split / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    folder = str(tmp_path / "j")
    assert rows_of(read_file(folder, fmt="hf")) == ROWS[:6]
    assert [loc for loc, _ in iter_hf(folder, split="validation")][0] == {"file": "validation/rows.jsonl", "line": 1}
    with pytest.raises(UserError, match="no data files for split 'test'"):
        list(iter_hf(folder, split="test"))


def test_readme_configs_choose_the_files(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    (folder / "extra").mkdir(parents=True)
    (folder / "extra" / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    (folder / "ignored.jsonl").write_text(json.dumps(ROWS[3]) + "\n")
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: validation\n    path: extra/*.jsonl\n---\n# x\n"
    (folder / "README.md").write_text(card)
    assert detect_format(str(folder)) == "hf"
    assert rows_of(read_file(str(folder), split="validation")) == ROWS[:3]
    loaded = datasets.load_dataset(str(folder), split="validation", cache_dir=str(tmp_path / "c"))
    assert list(loaded) == ROWS[:3]


def test_write_hf_folder_loads_with_datasets(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    mixed = [{**row, "meta": {"round": 1} if i < 4 else {"note": "late"}} for i, row in enumerate(ROWS)]
    shards = write_hf_folder(str(folder), {"train": iter(mixed[:8]), "test": mixed[8:]}, rows_per_shard=3)
    assert [Path(p).name for p in shards["train"]] == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    assert [Path(p).name for p in shards["test"]] == ["test-00000-of-00001.parquet"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # staging removed
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "c"))
    assert loaded["train"].num_rows == 8 and loaded["test"].num_rows == 2
    expected = [{**row, "meta": {"round": row["meta"].get("round"), "note": row["meta"].get("note")}} for row in mixed]
    assert list(loaded["train"]) == expected[:8]
    assert rows_of(read(str(folder))) == expected[:8]
    assert "| train | 8 |" in (folder / "README.md").read_text()


def test_rewriting_replaces_old_shards(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    write_hf_folder(str(folder), {"train": ROWS}, rows_per_shard=2)
    write_hf_folder(str(folder), {"train": ROWS[:3]}, rows_per_shard=5)
    assert sorted(p.name for p in (folder / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    assert list(datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "c"))) == ROWS[:3]


def test_bad_split_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid split name"):
        write_hf_folder(str(tmp_path / "x"), {"train/../../etc": ROWS})
