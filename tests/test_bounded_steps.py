"""The whole-dataset selection steps in bounded memory (rows spilled to disk, the ranking or plan in
DuckDB) decide exactly as in memory: same rows, same reasons, same counts, on rows with ties,
missing and odd scores, repeated ids and rows without a group."""

from __future__ import annotations

import math
import random

import pytest

from dataflywheel.filters.perplexity import ScoreBand
from dataflywheel.selectors.mixture import Mixture
from dataflywheel.selectors.top import SelectRandom, SelectTop
from dataflywheel.spill import spill_root


def _rows(n: int = 700, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    odd = [None, float("nan"), math.inf, True, "high", -0.0, 0.0]
    rows = []
    for i in range(n):
        score = rng.choice(odd) if rng.random() < 0.1 else rng.choice([rng.random(), round(rng.random(), 1), 3])
        row = {"id": f"r{rng.randrange(n // 2) if rng.random() < 0.05 else i:05d}",
               "text": " ".join("w" * rng.randint(1, 5) for _ in range(rng.randint(0, 40))),
               "scores": {} if score is None else {"s": score}}
        if rng.random() < 0.9:
            row["source"] = rng.choice(["web", "code", "math", "chat", "é-ü"])
        rows.append(row)
    return rows


def _check(stage, rows: list[dict]) -> None:
    memory = list(stage.run(rows))
    whole = stage.tally(rows)
    bounded = list(stage.run_bounded(iter(rows), 64))
    assert repr(bounded) == repr(memory)  # repr: a NaN score is equal to itself only by identity
    if stage.whole_tally:
        assert stage.bounded_stats == whole


@pytest.mark.parametrize("options", [
    {"field": "s", "lower_pct": 10, "upper_pct": 90},
    {"field": "s", "upper_pct": 50, "min_value": 0.2},
    {"field": "s", "lower_pct": 33.3},
    {"field": "absent", "upper_pct": 50},
])
def test_score_band(options):
    _check(ScoreBand(**options), _rows())


@pytest.mark.parametrize("options", [
    {"field": "s", "budget": 37},
    {"field": "s", "fraction": 0.3, "ascending": True},
    {"field": "s", "budget": 10_000},
    {"field": "s", "budget": 0},
    {"field": "absent", "budget": 5},
])
def test_select_top(options):
    _check(SelectTop(**options), _rows())


@pytest.mark.parametrize("options", [{"budget": 40, "seed": 3}, {"fraction": 0.5}])
def test_select_random(options):
    _check(SelectRandom(**options), _rows())


@pytest.mark.parametrize("options", [
    {"group_by": "source", "budget": 120},
    {"group_by": "source", "strategy": "weights", "weights": {"web": 2, "code": 1, "math": 0, "absent": 1},
     "budget": 200, "order_by": "s"},
    {"group_by": "source", "strategy": "temperature", "fraction": 0.4, "unit": "tokens", "missing_group": "none"},
    {"group_by": "source", "strategy": "capped", "cap": 20, "caps": {"chat": 5}, "budget": 300,
     "replay_group": "web", "replay_share": 0.1, "order_by": "s", "ascending": True},
    {"group_by": "source", "budget": 90, "redistribute": False, "unit": "tokens", "seed": 7},
])
def test_mixture(options):
    _check(Mixture(**options), _rows())


def test_empty_input_and_no_spill_left():
    before = set(_listing())
    for stage in (ScoreBand(field="s", upper_pct=50), SelectTop(field="s", budget=3), SelectRandom(budget=3),
                  Mixture(group_by="source", budget=3)):
        assert list(stage.run_bounded(iter([]), 64)) == []
    assert set(_listing()) == before


def _listing() -> list[str]:
    import os

    return [n for n in os.listdir(spill_root()) if n.startswith("dfw-spill-")]


@pytest.mark.parametrize("method", ["repr_filter", "kcenter", "kmeans", "facility_location"])
def test_diversity_on_real_embeddings(method, tmp_path, monkeypatch):
    """Same vectors (the cache the in-memory run filled), same decisions; chunks of 5 so the walk spans several."""
    from test_diversity import pool

    from dataflywheel.selectors import diversity_spill
    from dataflywheel.selectors.diversity_stage import Diversity

    monkeypatch.setattr(diversity_spill, "REPR_CHUNK", 5)
    options = {"method": method, "budget": 5, "cache": str(tmp_path / "vectors.sqlite"),
               **({} if method == "kcenter" else {"order_by": "quality"})}
    rows = pool()
    memory, bounded = Diversity(**options), Diversity(**options)
    for stage in (memory, bounded):
        stage.setup()
    expected, whole = list(memory.run(rows)), memory.tally(rows)
    got = list(bounded.run_bounded(iter(rows), 64))
    for stage in (memory, bounded):
        stage.teardown()
    assert sorted(map(repr, got)) == sorted(map(repr, expected))  # run() yields candidates in walk order
    assert bounded.bounded_stats["selected"] == whole["selected"] == 5
    assert bounded.bounded_stats["too_similar"] == whole["too_similar"]


def test_diversity_repr_filter_embeds_only_what_its_walk_reaches(monkeypatch):
    from test_diversity import pool

    from dataflywheel.selectors import diversity_spill
    from dataflywheel.selectors.diversity_stage import Diversity

    monkeypatch.setattr(diversity_spill, "REPR_CHUNK", 4)
    stage = Diversity(method="repr_filter", order_by="quality", budget=2)
    stage.setup()
    kept = [row["id"] for row, why in stage.run_bounded(iter(pool()), 64) if why is None]
    assert len(kept) == 2 and stage.bounded_stats["embedded"] == 4  # one chunk of the 16 scored rows


def test_disk_note_estimates_uncompressed_input_and_warns_when_short(tmp_path, monkeypatch):
    import gzip
    import json
    import shutil
    from collections import namedtuple

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataflywheel import spill
    from dataflywheel.progress import human_bytes

    rows = [{"id": str(i), "text": "the same words again " * 20} for i in range(2000)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(text)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.jsonl.gz"):
        line = spill.disk_note([("minhash_dedup", 3.5)], [str(tmp_path / name)])
        assert f"about {human_bytes(len(text))} uncompressed" in line and "too little" not in line, line
    assert "uncompressed" in spill.disk_note([("select_top", 1.3)], [str(tmp_path / "a.parquet")])
    assert spill.disk_note([], [str(tmp_path / "a.jsonl")]) is None
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda root: usage(1, 1, 1000))
    assert "too little, set DATAFLYWHEEL_SPILL" in spill.disk_note([("x", 1.3)], [str(tmp_path / "a.jsonl")])


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="no /dev/full (a device that is always full)")
def test_a_full_disk_fails_in_one_line(monkeypatch):
    """The kernel's ENOSPC, from /dev/full, while spilling rows: one line naming the step and the way out."""
    from dataflywheel import spill
    from dataflywheel.errors import UserError

    monkeypatch.setattr(spill, "ROWS_FILE", "/dev/full")  # an absolute name: os.path.join gives it as is
    with pytest.raises(UserError, match=r"^select_top: the disk under .* is full: free space or set DATAFLYWHEEL_SPILL$"):
        list(SelectTop(field="s", budget=3).run_bounded(iter(_rows(20_000)), 64))
    assert set(_listing()) == set()
