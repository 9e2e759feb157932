"""The MinHash near-dedup stage: the in-memory run and the Beam plan (both components modes)
decide every row identically, match the library's verified pairs, and reconcile."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from test_pipeline import run

from dataflywheel.filters.dedup.components import union_find_components
from dataflywheel.filters.dedup.lsh import near_duplicate_pairs
from dataflywheel.filters.dedup.stage import MinHashDedup
from dataflywheel.io import read
from dataflywheel.stages import process_group

BASE = ("the river bank was quiet in the early morning and a heron stood in the shallow water "
        "waiting for fish while the mist lifted slowly from the fields beyond the old stone bridge")


def variant(words: list[str], i: int) -> str:
    out = list(words)
    out[i % len(out)] = f"changed{i}"
    return " ".join(out)


def corpus() -> list[dict]:
    words = BASE.split()
    rows = [{"id": "a0", "text": BASE}]
    rows += [{"id": f"a{i}", "text": variant(words, i)} for i in range(1, 4)]  # one word changed: J ~ 0.8
    rows += [{"id": f"u{i}", "text": f"unrelated text number {i} " + " ".join(f"w{i}x{j}" for j in range(30))}
             for i in range(8)]
    rows += [{"id": "a2", "text": BASE.upper()}]  # repeats id a2: same normalized text as a0
    rows += [{"id": "empty", "text": ""}]
    return rows


def decisions(out) -> dict[str, tuple[str | None, dict]]:
    got = {}
    for row in out.kept:
        got.setdefault(row["id"], []).append((None, row.get("meta") or {}))
    for row in out.rejected:
        got.setdefault(row["id"], []).append((row["rejected"]["reason"], row.get("meta") or {}))
    return {k: sorted(v, key=lambda x: str(x[0])) for k, v in got.items()}


def test_in_memory_clusters_and_survivor():
    stage = MinHashDedup(threshold=0.7)
    out = process_group(stage, corpus())
    got = decisions(out)
    assert out.rows_in == len(corpus())
    assert got["a0"] == [(None, {"cluster": "a0", "cluster_size": 4})]
    for rid in ("a1", "a3"):
        assert got[rid] == [("near_duplicate", {"cluster": "a0", "cluster_size": 4, "duplicate_of": "a0"})]
    # Two rows share id a2; the upper-case copy of a0 sorts first (by signature) and stands for the id.
    reasons = [r for r, _ in got["a2"]]
    assert sorted(map(str, reasons)) == ["duplicate_id", "near_duplicate"]
    assert all(got[f"u{i}"] == [(None, {})] for i in range(8)) and got["empty"] == [(None, {})]
    assert out.stats == {"clusters": 1, "rows_in_clusters": 4}


def test_order_does_not_change_decisions():
    rows = corpus()
    a = decisions(process_group(MinHashDedup(threshold=0.7), rows))
    b = decisions(process_group(MinHashDedup(threshold=0.7), list(reversed(rows))))
    assert a == b


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def outputs(out: Path) -> dict[str, tuple]:
    kept = {r["id"]: (None, r.get("meta", {}).get("cluster")) for r in read(str(out))}
    rejected = {(r["id"], r["rejected"]["reason"]): r["meta"].get("duplicate_of") for r in read(str(out / "_rejected"))}
    return kept, rejected


@pytest.mark.parametrize("components, spill", [("union_find", False), ("beam", False), ("union_find", True)])
def test_beam_plan_equals_in_memory(tmp_path, components, spill):
    """The distributed plan (spill false: as on Dataflow) and the local engine's bounded plan (spill
    true) decide as the plain engine does."""
    rows = corpus()
    inputs = write_jsonl(tmp_path / "in" / "rows.jsonl", rows)
    stage = {"stage": "minhash_dedup", "threshold": 0.7, "components": components, "max_rounds": 6}
    plain = run(_cfg(inputs, tmp_path / "plain", "plain", stage))
    beam = run(_cfg(inputs, tmp_path / "beam", "local", stage, spill))
    assert outputs(tmp_path / "plain") == outputs(tmp_path / "beam")
    for report in (plain, beam):
        dedup = report.stages[-1]
        assert dedup.rows_in == len(rows) - 1 and dedup.rejected  # the reader dead-letters the empty text
        assert dedup.rejected == {"near_duplicate": 3, "duplicate_id": 1}
        rounds = {k: v for k, v in dedup.stats.items() if k.startswith("components_relinked/")}
        assert {k: v for k, v in dedup.stats.items() if k not in rounds} == {"clusters": 1, "rows_in_clusters": 4}
        assert bool(rounds) == (components == "beam" and report is beam)  # the star rounds report re-links
        assert dedup.seconds > 0  # busy time is measured inside the Beam plan too (signing, judging, deciding)


def _cfg(inputs: str, out: Path, engine: str, stage: dict, spill: bool = True) -> dict:
    return {"name": "t", "runner": {"engine": engine, "spill": spill},
            "input": {"paths": inputs, "kind": "document", "batch_rows": 5},
            "stages": [stage], "output": {"path": str(out), "format": "jsonl"}}


def test_neardup_benchmark_slice_matches_library(shared_data, tmp_path):
    """On 3,000 benchmark rows, the Beam plan's clusters are those of the library's verified pairs."""
    with gzip.open(shared_data / "neardup" / "corpus.jsonl.gz", "rt") as f:
        rows = [{"id": r["id"], "text": r["text"]} for r in map(json.loads, f)]
    rows = sorted(rows, key=lambda r: r["id"])[:3000]
    expected = union_find_components((r["id"] for r in rows), ((a, b) for a, b, _ in near_duplicate_pairs(rows, 0.8)))
    inputs = write_jsonl(tmp_path / "in" / "rows.jsonl", rows)
    run(_cfg(inputs, tmp_path / "beam", "local", {"stage": "minhash_dedup", "threshold": 0.8}, spill=False))
    kept, rejected = outputs(tmp_path / "beam")
    assert set(kept) == set(expected.values())
    assert {rid: dup for (rid, _), dup in rejected.items()} == {k: v for k, v in expected.items() if k != v}
    assert len(rejected) > 20  # the slice does hold near-duplicates
