"""select_top: top-k by any stored score, by budget or by fraction of the actual input; ties by id,
missing scores rejected, the same selection in any row order."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from dataflywheel.registry import stage_class
from dataflywheel.selectors.top import SelectTop
from dataflywheel.stages import process_group


def rows_with(values, field="ifd"):
    return [{"id": f"r{i:02d}", "scores": {field: v}} for i, v in enumerate(values)]


def decide(step: SelectTop, rows):
    out = process_group(step, rows)
    assert out.rows_in == len(rows) and not out.dead
    return [r["id"] for r in out.kept], {r["id"]: r["rejected"]["reason"] for r in out.rejected}, out.stats


def test_registered_and_exactly_one_budget():
    assert stage_class("select_top") is SelectTop
    with pytest.raises(ValidationError, match="exactly one"):
        SelectTop(field="ifd")
    with pytest.raises(ValidationError, match="exactly one"):
        SelectTop(field="ifd", budget=3, fraction=0.1)
    with pytest.raises(ValidationError):
        SelectTop(field="ifd", fraction=1.5)
    with pytest.raises(ValidationError):
        SelectTop(field="ifd", budget=-1)


def test_budget_keeps_the_highest_and_any_order_gives_the_same_rows():
    rng = random.Random(5)
    values = [rng.uniform(0, 1) for _ in range(40)]
    rows = rows_with(values)
    kept, rejected, stats = decide(SelectTop(field="ifd", budget=7), rows)
    expected = {r["id"] for r in sorted(rows, key=lambda r: -r["scores"]["ifd"])[:7]}
    assert set(kept) == expected and len(kept) == 7
    assert set(rejected.values()) == {"not_selected"} and len(rejected) == 33
    assert stats == {"selected": 7, "budget": 7}
    assert min(values[int(k[1:])] for k in kept) > max(values[int(k[1:])] for k in rejected)
    shuffled = rows[:]
    random.Random(9).shuffle(shuffled)
    assert set(decide(SelectTop(field="ifd", budget=7), shuffled)[0]) == expected


def test_fraction_is_of_the_actual_input_and_rounds_down():
    # Superfiltering counts int(52002 * rate) whatever the pool; ours counts the rows given
    for n, fraction, k in ((100, 0.05, 5), (100, 0.29, 29), (37, 0.1, 3), (10, 1.0, 10), (10, 0.0, 0), (3, 0.2, 0)):
        kept, rejected, stats = decide(SelectTop(field="ifd", fraction=fraction), rows_with(range(n)))
        assert len(kept) == k == stats["selected"], (n, fraction)
        assert set(kept) == {f"r{i:02d}" for i in range(n - k, n)}  # values 0..n-1: the top k are the last k
    # rows without the score count in the input but are never picked
    rows = rows_with([0.5, 0.7, 0.9]) + [{"id": f"x{i}"} for i in range(7)]
    kept, rejected, stats = decide(SelectTop(field="ifd", fraction=0.5), rows)
    assert kept == ["r00", "r01", "r02"] and stats == {"selected": 3, "budget": 5}
    assert rejected == {f"x{i}": "missing_score" for i in range(7)}


def test_ties_are_broken_by_id():
    rows = [{"id": rid, "scores": {"ifd": v}} for rid, v in [("c", 0.5), ("a", 0.5), ("d", 0.9), ("b", 0.5), ("e", 0.1)]]
    kept, _, _ = decide(SelectTop(field="ifd", budget=3), rows)
    assert sorted(kept) == ["a", "b", "d"]  # 0.9, then the two smallest ids of the 0.5 tie
    kept, _, _ = decide(SelectTop(field="ifd", budget=2, ascending=True), rows)
    assert sorted(kept) == ["a", "e"]  # 0.1, then the smallest id of the 0.5 tie
    for seed in range(5):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        assert sorted(decide(SelectTop(field="ifd", budget=3), shuffled)[0]) == ["a", "b", "d"]


def test_missing_and_unusable_scores_are_rejected():
    rows = rows_with([3.0, 1.0, 2.0]) + [
        {"id": "none"}, {"id": "other", "scores": {"reward": 9.0}}, {"id": "nan", "scores": {"ifd": float("nan")}},
        {"id": "inf", "scores": {"ifd": float("inf")}}, {"id": "bool", "scores": {"ifd": True}},
        {"id": "null", "scores": {"ifd": None}}]
    kept, rejected, _ = decide(SelectTop(field="ifd", budget=10), rows)
    assert sorted(kept) == ["r00", "r01", "r02"]  # a budget above what is there keeps all that is scored
    assert rejected == {k: "missing_score" for k in ("none", "other", "nan", "inf", "bool", "null")}


def test_ascending_and_any_field():
    rows = rows_with([40.0, 12.5, 7.0, 99.0], field="ppl")
    kept, rejected, _ = decide(SelectTop(field="ppl", budget=2, ascending=True), rows)
    assert sorted(kept) == ["r01", "r02"] and rejected == {"r00": "not_selected", "r03": "not_selected"}
    tags = [{"id": f"t{i}", "scores": {"tag_count": n}} for i, n in enumerate([1, 4, 2, 4])]
    kept, _, _ = decide(SelectTop(field="tag_count", budget=2), tags)  # integer scores work too
    assert sorted(kept) == ["t1", "t3"]


def test_empty_group():
    assert decide(SelectTop(field="ifd", fraction=0.5), []) == ([], {}, {})
