"""Beam integration on the real (pinned) FnApiRunner: same results as the plain loop, counts that
reconcile, dead letters for bad input and failing rows, atomic outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataflywheel.errors import UserError
from dataflywheel.io import expand_paths, read
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.stages import Scorer
from dataflywheel.stats import ReconcileError, RunReport, StageReport


def write_input(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(120):
        words = " ".join(["word"] * (i % 12)) + f" row{i}"
        lines.append(json.dumps({"id": f"d{i:03d}", "text": words}))
    lines += [json.dumps({"id": "dup", "text": "Word word  word word word row5"}),  # copy of d005
              "{not json", json.dumps({"id": "no-text"}), json.dumps({"id": "boom", "text": "explode " * 9})]
    (folder / "a.jsonl").write_text("\n".join(lines[:70]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(lines[70:]) + "\n")
    return str(folder / "*.jsonl")


def config(inputs: str, out: Path, engine: str = "local", stages=None, **runner) -> dict:
    stages = stages or [{"stage": "length", "min_words": 5, "batch_size": 7}, {"stage": "exact_dedup"}]
    return {"name": "t", "runner": {"engine": engine, **runner},
            "input": {"paths": inputs, "kind": "document", "batch_rows": 16},
            "stages": stages, "output": {"path": str(out), "format": "jsonl", "rows_per_shard": 25}}


def run(cfg: dict) -> RunReport:
    parsed = parse_config(cfg, "<test>")
    return run_job(parsed.jobs[0], parsed.runner)


def rows_in(folder: Path) -> list[dict]:
    return sorted((r for r in read(str(folder))), key=lambda r: r["id"])


def dead_rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "_dead_letter").glob("part-*")) for line in f.read_text().splitlines()]


def test_beam_equals_plain_and_reconciles(tmp_path):
    inputs = write_input(tmp_path / "in")
    plain = run(config(inputs, tmp_path / "plain", "plain"))
    beam = run(config(inputs, tmp_path / "beam", "local"))
    for report in (plain, beam):
        report.check()
        by = {s.stage: s for s in report.stages}
        assert by["read"].rows_in == 124 and by["read"].dead_letter == 2  # "{not json" and the row without text
        assert by["length"].rows_in == 122 and by["length"].rejected == {"too_short": 40}
        assert by["exact_dedup"].rejected == {"duplicate": 1}
    assert rows_in(tmp_path / "plain") == rows_in(tmp_path / "beam")
    assert len(rows_in(tmp_path / "beam")) == 81
    kept_files = sorted(p.name for p in (tmp_path / "beam").glob("part-*"))
    named = json.loads((tmp_path / "beam" / "_SUCCESS.json").read_text())["shards"]
    assert len(kept_files) >= 3 and kept_files == sorted(s["file"] for s in named)  # no stray shard is left
    rejected = rows_in(tmp_path / "beam" / "_rejected")
    assert len(rejected) == 41 and {r["rejected"]["stage"] for r in rejected} == {"length", "exact_dedup"}
    reasons = sorted(d["reason"] for d in dead_rows(tmp_path / "beam"))
    assert reasons == ["json_syntax", "missing_field"]
    assert all(d["source"].endswith(".jsonl") and "line" in d for d in dead_rows(tmp_path / "beam"))
    success = json.loads((tmp_path / "beam" / "_SUCCESS.json").read_text())
    assert success["rows"] == 81


class Explode(Scorer):
    """Raises on rows whose text starts with 'explode' (a stage bug meeting odd data)."""

    def score(self, rows):
        if any(r["text"].startswith("explode") for r in rows):
            raise RuntimeError("cannot handle this row")
        return rows


def test_stage_errors_become_dead_letters_on_beam(tmp_path):
    inputs = write_input(tmp_path / "in")
    stages = [{"stage": "test_pipeline:Explode", "batch_size": 50}]
    report = run(config(inputs, tmp_path / "out", "local", stages=stages))
    by = {s.stage: s for s in report.stages}
    assert by["Explode"].dead_letter == 1 and by["Explode"].kept == 121
    dead = [d for d in dead_rows(tmp_path / "out") if d["stage"] == "Explode"]
    assert dead[0]["record"]["id"] == "boom" and "RuntimeError: cannot handle this row" in dead[0]["detail"]


def test_multi_processing_workers_give_same_rows(tmp_path):
    inputs = write_input(tmp_path / "in")
    run(config(inputs, tmp_path / "one", "plain"))
    report = run(config(inputs, tmp_path / "two", "local", workers=2, mode="multi_processing"))
    report.check()
    assert rows_in(tmp_path / "one") == rows_in(tmp_path / "two")


class FailSetup(Scorer):
    def setup(self):
        raise OSError("model file missing")

    def score(self, rows):
        return rows


def test_failed_run_leaves_no_complete_looking_output(tmp_path):
    inputs = write_input(tmp_path / "in")
    out = tmp_path / "out"
    run(config(inputs, out, "local"))  # an earlier good run
    assert (out / "_SUCCESS.json").exists()
    with pytest.raises(Exception, match="model file missing"):
        run(config(inputs, out, "local", stages=[{"stage": "test_pipeline:FailSetup"}]))
    # The job withdrew the old marker when it started: neither the old rows nor a partial new set
    # is taken as this job's output, and readers refuse the folder until a run completes.
    assert not (out / "_SUCCESS.json").exists()
    with pytest.raises(UserError, match="unfinished pipeline output"):
        expand_paths(str(out))


def test_report_check_fails_loudly():
    bad = RunReport("x", [StageReport("s", rows_in=10, kept=5, rejected={"r": 3}, dead_letter=1)])
    with pytest.raises(ReconcileError, match=r"stage s: 10 rows in != 9 out \(kept 5 \+ rejected 3 \+ dead letter 1\)"):
        bad.check()
    text = bad.table()
    assert "NO" in text and "s" in text


def test_dataflow_dry_run_graph_contains_our_transforms(tmp_path):
    pytest.importorskip("apitools", reason="needs apache-beam[gcp]")
    inputs = write_input(tmp_path / "in")
    stages = [{"stage": "length", "min_words": 5, "gpu": True}, {"stage": "exact_dedup"}]
    cfg = config(inputs, tmp_path / "out", "dataflow", stages=stages,
                 dataflow={"project": "dummy-proj", "temp_location": "gs://dummy-bucket/tmp", "dry_run": True,
                           "gpu_type": "nvidia-l4"})
    report = run(cfg)
    assert report.outputs == {"dry_run": True}
    proto = report.job_graph
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert any("Stage[length]" in n for n in names) and any("Stage[exact_dedup]" in n for n in names)
    assert any(n.startswith("Read") for n in names) and any("WriteKept" in n for n in names)
    hinted = [t.unique_name for t in proto.components.transforms.values()
              if any(b"nvidia-l4" in v for v in (t.annotations or {}).values())
              or any(b"nvidia-l4" in v for v in proto.components.environments[t.environment_id].resource_hints.values())
              if t.environment_id]
    assert hinted and all("Stage[length]" in n for n in hinted)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_dataflow_dry_run_with_bucket_paths_touches_no_bucket(tmp_path, monkeypatch):
    """gs:// inputs and outputs: the launcher lists nothing (no GCS here, no emulator set), the
    read step gets the glob and expands it on the workers, and nothing is written anywhere."""
    pytest.importorskip("apitools", reason="needs apache-beam[gcp]")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    cfg = parse_config({"name": "t", "runner": {"engine": "dataflow", "dataflow": {
        "project": "dummy-proj", "temp_location": "gs://dummy-bucket/tmp", "dry_run": True}},
        "jobs": [{"name": "t", "input": {"paths": "gs://dummy-bucket/crawl/**/*.warc.gz", "kind": "document"},
                  "output": {"path": "gs://dummy-bucket/docs"}, "stages": [{"stage": "extract"}, {"stage": "exact_dedup"}]}]},
        "t.yaml")
    report = run_job(cfg.jobs[0], cfg.runner)
    names = {t.unique_name for t in report.job_graph.components.transforms.values()}
    assert any("Stage[extract]" in n for n in names) and any("WriteKept" in n for n in names)
    assert not (tmp_path / "docs").exists()


def test_read_step_expands_a_glob_on_the_worker(tmp_path):
    """What the workers of a dry-run graph do with the pattern they are given: expand and read it."""
    from dataflywheel.pipelines.io_transforms import ReadFilesDoFn

    inputs = write_input(tmp_path / "in")
    fn = ReadFilesDoFn("auto", "document", 1000, {})
    fn.setup()
    batches = list(fn.process(inputs))
    kept = [row for b in batches if isinstance(b, list) for row in b]
    assert len(kept) == 122 and len(batches) > 1  # every file of the glob, dead letters aside


def test_apply_stage_on_single_rows_batches_them():
    """A user's own PCollection of rows: BatchElements first, then the same three outputs."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    from dataflywheel.filters.basic import Length
    from dataflywheel.pipelines.stage_transform import ApplyStage

    rows = [{"id": f"r{i}", "text": "w " * i} for i in range(30)] + [{"id": "bad", "text": 5}]  # unvalidated input: the stage raises on it
    with beam.Pipeline(runner=FnApiRunner()) as p:
        outs = p | beam.Create(rows) | ApplyStage(Length(min_words=10, batch_size=8), batched=False)
        kept = outs["kept"] | "K" >> beam.FlatMap(lambda b: [r["id"] for r in b])
        rejected = outs["rejected"] | "R" >> beam.FlatMap(lambda b: [r["rejected"]["reason"] for r in b])
        dead = outs["dead_letter"] | "D" >> beam.FlatMap(lambda b: [d["record"]["id"] for d in b])
        assert_that(kept, equal_to([f"r{i}" for i in range(10, 30)]), label="kept")
        assert_that(rejected, equal_to(["too_short"] * 10), label="rejected")
        assert_that(dead, equal_to(["bad"]), label="dead")


def test_shipped_dataflow_config_dry_runs_offline(monkeypatch, capsys):
    """configs/dataflow.yaml reads a crawl from gs:// and writes to gs://: its graph builds here."""
    pytest.importorskip("apitools", reason="needs apache-beam[gcp]")
    from dataflywheel.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    for var, value in {"DATAFLOW_PROJECT": "dummy-proj", "DATAFLOW_BUCKET": "dummy-bucket", "DATAFLOW_IMAGE": "img:1"}.items():
        monkeypatch.setenv(var, value)
    assert main(["run", "configs/dataflow.yaml", "--dry-run"]) == 0
    assert "job graph was built and validated" in capsys.readouterr().out
