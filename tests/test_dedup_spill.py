"""MinHash dedup in bounded memory (filters/dedup/spill.py): the same decisions as the in-memory
run, row for row, on a generated corpus (repeated ids, empty and long documents, both verification
modes) and on a slice of the shared near-duplicate benchmark; the spill folder is removed after
success, after failure, and when a killed run left it behind."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
from test_dedup_stage import corpus

from dataflywheel import spill as spill_store
from dataflywheel.errors import UserError
from dataflywheel.filters.dedup import spill
from dataflywheel.filters.dedup.stage import MinHashDedup


def in_memory(stage: MinHashDedup, rows: list[dict]) -> list:
    return sorted((json.dumps(row, sort_keys=True), reason) for row, reason in stage.run(rows))


def spilled(stage: MinHashDedup, rows: list[dict], memory_mb: int = 64) -> list:
    return sorted((json.dumps(row, sort_keys=True), reason) for row, reason in spill.run_spilled(stage, iter(rows), memory_mb))


def generated(n: int, seed: int = 0) -> list[dict]:
    """Unique documents and near copies at several edit rates, some ids repeated, some texts empty."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    bases = [[rng.choice(vocab) for _ in range(rng.randint(40, 120))] for _ in range(n // 3)]
    rows = []
    for i in range(n):
        words = list(rng.choice(bases))
        for _ in range(rng.choice([0, 1, 3, 8, 30])):  # edit rates from none to unrelated
            words[rng.randrange(len(words))] = rng.choice(vocab)
        rows.append({"id": f"d{i:05d}", "text": " ".join(words), "meta": {"n": i}})
    rows += [{"id": "d00007", "text": rows[7]["text"].upper()}, {"id": "blank", "text": ""},
             {"id": "blank2", "text": "   "}]
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("options", [{"threshold": 0.7}, {"threshold": 0.8, "verify": False},
                                     {"threshold": 0.8, "max_exact_shingles": 60}])
def test_same_decisions_as_in_memory(options):
    rows = generated(1500) + corpus()
    stage = MinHashDedup(**options)
    expected = in_memory(stage, rows)
    assert spilled(stage, rows) == expected
    assert sum(reason == "near_duplicate" for _, reason in expected) > 100  # the corpus does hold clusters
    assert sum(reason == "duplicate_id" for _, reason in expected) == 2


def test_neardup_benchmark_slice(shared_data):
    with gzip.open(shared_data / "neardup" / "corpus.jsonl.gz", "rt") as f:
        rows = [{"id": r["id"], "text": r["text"]} for r in map(json.loads, f)][:4000]
    stage = MinHashDedup(threshold=0.8)
    assert spilled(stage, rows, memory_mb=64) == in_memory(stage, rows)


def test_spill_folder_removed_after_success_failure_and_kill(tmp_path, monkeypatch):
    monkeypatch.setenv(spill_store.SPILL_ENV, str(tmp_path))
    stale = tmp_path / f"{spill_store.PREFIX}999999999-x"  # a killed run's folder: its pid is gone
    stale.mkdir()
    stage = MinHashDedup(threshold=0.7)
    assert len(list(spill.run_spilled(stage, iter(corpus()), 64))) == len(corpus())
    assert os.listdir(tmp_path) == []

    def broken():
        yield from corpus()[:5]
        raise RuntimeError("the reader broke")

    with pytest.raises(RuntimeError, match="reader broke"):
        list(spill.run_spilled(stage, broken(), 64))
    assert os.listdir(tmp_path) == []


def test_minhash_needs_no_database_memory_and_a_too_small_budget_elsewhere_fails_in_one_line():
    from dataflywheel.filters.basic import ExactDedup

    rows = generated(3000)
    stage = MinHashDedup(threshold=0.7)  # partitions of 8,192 keys at 1 MB: slower, the same decisions
    assert spilled(stage, rows, memory_mb=1) == in_memory(stage, rows)
    with pytest.raises(UserError, match=r"MB is too little .*, in: SELECT .* raise runner.memory_budget_mb"):
        list(ExactDedup().run_bounded(iter(rows), 1))


def test_exact_dedup_bounded_equals_grouping_in_memory():
    from dataflywheel.filters.basic import ExactDedup
    from dataflywheel.stages import group_rows

    rows = generated(800) + [{"id": "z1", "text": "Same Text"}, {"id": "z0", "text": "same   text"},
                             {"id": "z0", "text": "SAME TEXT"}, {"id": "bad", "text": 7}]
    stage = ExactDedup()
    groups, dead = group_rows(stage, rows)
    expected = sorted((json.dumps(row, sort_keys=True), reason) for group in groups.values()
                      for row, reason in stage.run(group))
    got = list(stage.run_bounded(iter(rows), 64))
    assert [r["id"] for r, reason in got if isinstance(reason, BaseException)] == ["bad"] and len(dead) == 1
    assert sorted((json.dumps(r, sort_keys=True), reason) for r, reason in got
                  if not isinstance(reason, BaseException)) == expected
    assert sum(reason == "duplicate" for _, reason in expected) >= 2


def test_many_partitions_in_several_sweeps_decide_the_same(monkeypatch):
    """A budget that gives ~50 partitions, partitioned 8 at a time, clusters named in ~20 partitions
    read back 64 at a time, arrays walked 97 docs at a time: the same decisions."""
    from dataflywheel.filters.dedup import band_join

    monkeypatch.setattr(band_join, "FANOUT", 8)
    monkeypatch.setattr(spill, "PART_BYTES", 64 * 2**20 // 500)  # 500 band keys a partition
    monkeypatch.setattr(band_join, "PAIRS", 7)
    monkeypatch.setattr(spill, "NAME_BYTES", 64 * 2**20 // 50)  # 50 clustered documents a partition
    monkeypatch.setattr(spill, "MERGE_BYTES", 64 * 2**20)
    monkeypatch.setattr(spill, "READ", 97)
    monkeypatch.setattr(band_join, "READ", 97)
    rows = generated(1500)
    stage = MinHashDedup(threshold=0.7)
    assert spilled(stage, rows) == in_memory(stage, rows)


def test_bucket_pairs_are_every_pair_of_each_run_once(monkeypatch):
    from itertools import combinations

    import numpy as np

    from dataflywheel.filters.dedup import band_join

    monkeypatch.setattr(band_join, "PAIRS", 5)
    rng = np.random.default_rng(0)
    part = np.zeros(400, band_join.RECORD)
    part["key"] = np.r_[np.full(100, 2), np.full(3, 2**63 + 5), rng.choice(np.arange(10, 300), size=297)]
    part["doc"] = rng.permutation(400)
    part["band"] = part["key"] % 7
    got = [(int(x), int(y), int(b)) for xs, ys, bs in band_join._bucket_pairs(part) for x, y, b in zip(xs, ys, bs)]
    by_key: dict = {}
    for rec in part:
        by_key.setdefault(int(rec["key"]), []).append(int(rec["doc"]))
    expected = [(x, y, key % 7) for key, docs in by_key.items() for x, y in combinations(sorted(docs), 2)]
    assert sorted(got) == sorted(expected) and len(got) == len(set(got)) and len(got) > 4000


def test_spill_root_created_or_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(spill_store.SPILL_ENV, str(tmp_path / "new" / "spill"))
    stage = MinHashDedup(threshold=0.7)
    assert len(list(spill.run_spilled(stage, iter(corpus()), 64))) == len(corpus())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(spill_store.SPILL_ENV, str(blocker / "spill"))
    with pytest.raises(UserError, match=r"spill folder .*a-file/spill \(DATAFLYWHEEL_SPILL\): cannot create"):
        list(spill.run_spilled(stage, iter(corpus()), 64))


def test_roots_in_chunks_equal_find(monkeypatch):
    import numpy as np

    monkeypatch.setattr(spill, "READ", 97)
    rng = np.random.default_rng(1)
    parent = np.arange(5000, dtype=np.int32)
    for x, y in rng.integers(0, 5000, size=(3000, 2)):
        spill._union(parent, int(x), int(y))
    expected = [spill._find(parent.copy(), i) for i in range(5000)]
    assert spill._roots(parent).tolist() == expected
    assert len(set(expected)) < 3000  # long chains: many unions merged
