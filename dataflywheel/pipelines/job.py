"""A job: read -> stages -> write, on Beam (any engine) or in a plain Python loop.

Both engines call the same ``process_batch`` / ``process_group`` on the same stage objects and
write through the same atomic shard writers, and both end with the same reconciliation check,
so the plain loop is a faithful reference for tests and small jobs.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..config import JobConfig
from ..errors import UserError
from ..io import DeadLetter, ShardWriter, expand_paths, read_file
from ..runner import RunnerConfig, make_pipeline
from ..stages import GlobalStep, Outcome, Stage, batches, group_rows, process_batch, process_group
from ..stats import ReconcileError, RunReport, StageReport, reports_from_beam
from .io_transforms import TMP_PREFIX, finalize_shards, read_success

READ = "read"


def output_dirs(job: JobConfig) -> dict[str, str]:
    base = job.output.path
    return {"kept": base, "rejected": os.path.join(base, "_rejected"), "dead_letter": os.path.join(base, "_dead_letter")}


def output_format(job: JobConfig, which: str) -> str:
    return job.output.format if which == "kept" else "jsonl"


def run_job(job: JobConfig, runner: RunnerConfig) -> RunReport:
    """Run one job; returns its checked report (raises ReconcileError when counts do not add up)."""
    stages = job.build_stages()
    dry = runner.engine == "dataflow" and runner.dataflow is not None and runner.dataflow.dry_run
    try:
        files = expand_paths(job.input.paths)
    except UserError:
        if not dry:
            raise
        files = list(job.input.paths)  # a dry run builds the graph: the workers would read these later
    start = time.perf_counter()
    if runner.engine == "plain":
        reports = _run_plain(job, stages, files)
    else:
        reports = _run_beam(job, stages, files, runner)
    report = RunReport(job.name, reports, time.perf_counter() - start)
    if runner.engine == "dataflow" and runner.dataflow and runner.dataflow.dry_run:
        report.outputs = {"dry_run": True}
        return report
    report.outputs = {k: read_success(d) for k, d in output_dirs(job).items()}
    report.config = job.model_dump()
    report.check()
    _check_outputs(report)
    return report


def _check_outputs(report: RunReport) -> None:
    """What reached the files must match the counters: nothing lost between stage and sink."""
    last_kept = report.stages[-1].kept if report.stages else 0
    rejected = sum(s.rejected_total for s in report.stages)
    written_kept = report.outputs["kept"]["rows"]
    written_rejected = report.outputs["rejected"]["rows"] if report.outputs.get("rejected") else rejected
    if written_kept != last_kept or written_rejected != rejected:
        raise ReconcileError(f"rows written (kept {written_kept}, rejected {written_rejected}) do not match "
                             f"the stage counts (kept {last_kept}, rejected {rejected})")


def _run_beam(job: JobConfig, stages: list[Stage], files: list[str], runner: RunnerConfig) -> list[StageReport]:
    import apache_beam as beam

    from .io_transforms import ReadFiles, WriteShards
    from .stage_transform import DEAD, KEPT, REJECTED, ApplyStage

    accel = runner.dataflow.accelerator_hint() if runner.engine == "dataflow" and runner.dataflow else None
    dirs = output_dirs(job)
    p = make_pipeline(runner, job.name)
    read = p | "Read" >> ReadFiles(files, job.input.format, job.input.kind, job.input.batch_rows, job.input.options, READ)
    current, rejected, dead = read[KEPT], [], [read[DEAD]]
    for stage in stages:
        outs = current | ApplyStage(stage, accelerator=accel if stage.config.gpu else None)
        current = outs[KEPT]
        rejected.append(outs[REJECTED])
        dead.append(outs[DEAD])
    current | "WriteKept" >> WriteShards(dirs["kept"], job.output.format, job.output.rows_per_shard)
    if job.output.write_rejected and rejected:
        (rejected | "AllRejected" >> beam.Flatten()
         | "WriteRejected" >> WriteShards(dirs["rejected"], "jsonl", job.output.rows_per_shard))
    (dead | "AllDead" >> beam.Flatten()
     | "WriteDead" >> WriteShards(dirs["dead_letter"], "jsonl", job.output.rows_per_shard))
    result = p.run()
    result.wait_until_finish()
    if runner.engine == "dataflow" and runner.dataflow and runner.dataflow.dry_run:
        job_graph = getattr(getattr(result, "job", None), "proto_pipeline", None)
        _LAST_DRY_RUN["proto"] = job_graph
        return []
    return reports_from_beam(result, [READ] + [s.name for s in stages])


_LAST_DRY_RUN: dict = {}  # the job graph of the last Dataflow dry run, for inspection and tests


class _Sinks:
    """The plain loop's writers: hidden shards while running, finalized like the Beam sink."""

    def __init__(self, job: JobConfig):
        self.job, self.dirs = job, output_dirs(job)
        self.writers: dict[str, ShardWriter] = {}

    def write(self, which: str, rows: list[dict]) -> None:
        if which == "rejected" and not self.job.output.write_rejected:
            return
        if which not in self.writers:
            Path(self.dirs[which]).mkdir(parents=True, exist_ok=True)
            self.writers[which] = ShardWriter(self.dirs[which], output_format(self.job, which),
                                              prefix=f"{TMP_PREFIX}plain", rows_per_shard=self.job.output.rows_per_shard)
        for row in rows:
            self.writers[which].write(row)

    def close(self) -> None:
        for which, d in self.dirs.items():
            if which == "rejected" and not self.job.output.write_rejected:
                continue
            shards = self.writers[which].close() if which in self.writers else []
            finalize_shards(d, output_format(self.job, which), shards)


def _run_plain(job: JobConfig, stages: list[Stage], files: list[str]) -> list[StageReport]:
    sinks = _Sinks(job)
    read_report = StageReport(READ)
    reports = [read_report] + [StageReport(s.name) for s in stages]

    def read_rows() -> Iterator[dict]:
        for path in files:
            items, kept, busy = read_file(path, job.input.format, kind=job.input.kind, **job.input.options), 0, 0.0
            while True:  # time only the reader: while suspended at `yield`, later stages run
                t0 = time.perf_counter()
                item = next(items, None)
                busy += time.perf_counter() - t0
                if item is None:
                    break
                if isinstance(item, DeadLetter):
                    read_report.add(dead=item.records)
                    sinks.write("dead_letter", [item.to_row()])
                else:
                    kept += 1
                    yield item
            read_report.add(kept=kept, seconds=busy)

    def record(report: StageReport, out: Outcome) -> list[dict]:
        report.add(len(out.kept), Counter(r["rejected"]["reason"] for r in out.rejected), len(out.dead), out.seconds,
                   out.stats)
        sinks.write("rejected", out.rejected)
        sinks.write("dead_letter", out.dead)
        return out.kept

    def apply(stage: Stage, report: StageReport, stream: Iterator[list[dict]]) -> Iterator[list[dict]]:
        if isinstance(stage, GlobalStep):  # needs all rows: the plain loop groups in memory
            groups, dead = group_rows(stage, (row for batch in stream for row in batch))
            record(report, Outcome(dead=dead))
            kept = [row for rows in groups.values() for row in record(report, process_group(stage, rows))]
            yield from batches(kept, job.input.batch_rows)
            return
        for batch in stream:
            for chunk in batches(batch, stage.config.batch_size):
                kept = record(report, process_batch(stage, chunk))
                if kept:
                    yield kept

    for stage in stages:
        stage.setup()
    try:
        stream: Iterator[list[dict]] = batches(read_rows(), job.input.batch_rows)
        for stage, report in zip(stages, reports[1:]):
            stream = apply(stage, report, stream)
        for batch in stream:
            sinks.write("kept", batch)
        sinks.close()
    finally:
        for stage in stages:
            stage.teardown()
    return reports
