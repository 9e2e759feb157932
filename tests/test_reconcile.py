"""Row accounting that can fail: a stage (or a Beam plan) that loses, duplicates or replaces rows
fails the run on both engines, with one line naming the stage and the numbers, and its outputs are
not committed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam
import pytest

from dataflywheel.cli import main
from dataflywheel.io.commit import read_success
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.pipelines.plans import PLANS
from dataflywheel.pipelines.stage_transform import KEPT, GroupPlan
from dataflywheel.registry import register
from dataflywheel.stages import GlobalStep, Scorer
from dataflywheel.stats import ReconcileError

ENGINES = ["plain", "local"]


@register("test_swap_rows")
class SwapRows(GlobalStep):
    """Broken on purpose: decides every row once by count, but emits r0 twice and loses the last."""

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        rows = sorted(rows, key=lambda r: r["id"])
        for row in [rows[0]] + rows[:-1]:
            yield row, None


@register("test_replace_row")
class ReplaceRow(Scorer):
    """Broken on purpose: returns a different row in place of one of its inputs."""

    def score(self, rows: list[dict]) -> list[dict]:
        return [{"id": "intruder", "text": r["text"]} if r["id"] == "r2" else r for r in rows]


@register("test_drop_in_plan")
class DropInPlan(GlobalStep):
    """A correct step whose Beam plan (registered by the test) drops a row."""

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        for row in rows:
            yield row, None


class _DropOnePlan(beam.PTransform):
    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def expand(self, pcoll):
        outs = pcoll | GroupPlan(self.stage)
        dropped = outs[KEPT] | beam.Map(lambda batch: [r for r in batch if r["id"] != "r3"])
        return {**outs, KEPT: dropped}


@register("test_new_rows")
class Summarize(Scorer):
    """Declares new rows: one row out per row in, each with a new id."""

    new_rows = True

    def score(self, rows: list[dict]) -> list[dict]:
        return [{"id": f"summary-of-{r['id']}", "text": r["text"][:3]} for r in rows]


def write_input(folder: Path, n: int = 5) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"row number {i}"}) + "\n"
                                            for i in range(n)))
    return str(folder / "a.jsonl")


def config(inputs: str, out: Path, engine: str, stages: list[dict]) -> dict:
    return {"name": "t", "runner": {"engine": engine}, "input": {"paths": inputs},
            "stages": stages, "output": {"path": str(out)}}


def run(cfg: dict):
    parsed = parse_config(cfg, "<test>")
    return run_job(parsed.jobs[0], parsed.runner)


@pytest.mark.parametrize("engine", ENGINES)
def test_global_step_that_swaps_rows_fails_the_run(tmp_path, engine):
    out = tmp_path / "out"
    with pytest.raises(ReconcileError) as err:
        run(config(write_input(tmp_path / "in"), out, engine, [{"stage": "test_swap_rows"}]))
    line = str(err.value)
    assert "\n" not in line
    assert "stage test_swap_rows: the 5 rows out are not the 5 rows in" in line and "emitted twice" in line
    assert read_success(out) is None  # nothing downstream takes this output as complete
    report = json.loads((out / "_report.json").read_text())
    assert report["reconciled"] is False and report["problems"]


@pytest.mark.parametrize("engine", ENGINES)
def test_scorer_that_replaces_a_row_fails_the_run(tmp_path, engine):
    with pytest.raises(ReconcileError, match="stage test_replace_row: the 5 rows out are not the 5 rows in"):
        run(config(write_input(tmp_path / "in"), tmp_path / "out", engine,
                   [{"stage": "length"}, {"stage": "test_replace_row"}]))


def test_beam_plan_that_drops_a_row_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(PLANS, DropInPlan, _DropOnePlan)
    with pytest.raises(ReconcileError, match=r"stage test_drop_in_plan: 5 rows in != 4 out \(kept 4"):
        run(config(write_input(tmp_path / "in"), tmp_path / "out", "local", [{"stage": "test_drop_in_plan"}]))
    monkeypatch.delitem(PLANS, DropInPlan)  # the default plan is correct
    report = run(config(write_input(tmp_path / "in"), tmp_path / "out2", "local", [{"stage": "test_drop_in_plan"}]))
    assert report.stages[-1].kept == 5 and not report.mismatches()


@pytest.mark.parametrize("engine", ENGINES)
def test_declared_new_rows_are_checked_on_counts(tmp_path, engine):
    report = run(config(write_input(tmp_path / "in"), tmp_path / "out", engine,
                        [{"stage": "test_new_rows"}, {"stage": "length", "min_words": 1}]))
    by = {s.stage: s for s in report.stages}
    assert by["test_new_rows"].rows_in == by["test_new_rows"].kept == 5 and by["test_new_rows"].new_rows
    assert by["length"].rows_in == 5 and not report.mismatches()
    assert report.outputs["kept"]["rows"] == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_cli_exits_1_with_one_line_naming_the_stage(tmp_path, engine, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config(write_input(tmp_path / "in"), tmp_path / "out", engine,
                                      [{"stage": "test_swap_rows"}])))
    assert main(["run", str(path), "--quiet"]) == 1  # no progress lines: stderr holds the error alone
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_swap_rows" in err[0] and "5 rows" in err[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_checksums_agree_across_engines_and_with_the_files(tmp_path, engine):
    report = run(config(write_input(tmp_path / "in", 40), tmp_path / "out", engine,
                        [{"stage": "length", "min_words": 3}, {"stage": "exact_dedup"}]))
    by = {s.stage: s for s in report.stages}
    assert by["read"].ids["kept"] == by["length"].ids["in"] != 0
    assert by["length"].ids["kept"] == by["exact_dedup"].ids["in"]
    assert int(report.outputs["kept"]["ids"], 16) == by["exact_dedup"].ids["kept"]


@pytest.mark.parametrize("engine", ENGINES)
def test_file_problems_appear_in_the_table_and_the_readers_row(tmp_path, engine, capsys):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    folder.mkdir()
    lines = "".join(json.dumps({"id": f"r{i}", "text": f"row number {i}"}) + "\n" for i in range(20)).encode()
    crc = bytearray(gzip.compress(lines))
    crc[-8] ^= 0xFF  # the member's CRC32, checked after its 20 lines were decoded and handed on
    (folder / "crc.jsonl.gz").write_bytes(bytes(crc))
    (folder / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:-30])  # a stream cut short
    pq.write_table(pa.Table.from_pylist([{"id": f"p{i}", "text": "x y z"} for i in range(30)]), folder / "t.parquet")
    data = (folder / "t.parquet").read_bytes()
    (folder / "t.parquet").write_bytes(data[:-12])  # the footer gone: its row count with it
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config(str(folder), tmp_path / "out", engine, [{"stage": "length"}])))
    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().out
    problems = printed.split("file problems:\n", 1)[1].split("counts:", 1)[0].splitlines()
    assert len(problems) == 3, printed
    crc_line = next(p for p in problems if "crc.jsonl.gz" in p)
    assert "lines 1-20 were read" in crc_line
    assert any("cut.jsonl.gz" in p and "truncated" in p for p in problems)
    assert any("t.parquet" in p and "row count unknown" in p for p in problems)
    read_row = json.loads((tmp_path / "out" / "_report.json").read_text())["stages"][0]
    assert read_row["stage"] == "read" and len(read_row["problems"]) == 3
    assert read_row["stats"]["file_problems"] == 3
