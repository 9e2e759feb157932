"""A job: read -> stages -> write, on Beam (any engine) or in a plain Python loop.

Both engines call the same ``process_batch`` / ``process_group`` on the same stage objects, write
through the same shard writers and commit protocol, and count the same things the same way: the
rows entering each stage before it runs, the rows of each output after it, each with its id
checksum (``stats.py``). ``run_job`` then checks the accounting (every stage, the hand-over
between stages, the rows written) and fails with one line naming the stage and the numbers; a
failed job's output folders are uncommitted (no ``_SUCCESS.json``), so nothing downstream takes
them as complete. The report is saved to ``<output>/_report.json`` either way.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

from .. import progress
from ..io import DeadLetter, ShardWriter, expand_paths, fs, read, read_file
from ..io.base import FILE
from ..io.commit import finalize_shards, read_success, shard_prefix, shards_of, uncommit
from ..runner import RunnerConfig, make_pipeline
from ..stages import (
    GlobalStep,
    Outcome,
    Stage,
    batches,
    group_rows,
    outcome_of,
    process_batch,
    process_group,
    runs_bounded,
)
from ..stats import FILE_PROBLEMS, RunReport, StageReport
from .config import JobConfig

READ = "read"
REPORT = "_report.json"


def output_dirs(job: JobConfig) -> dict[str, str]:
    base = job.output.path
    return {"kept": base, "rejected": fs.join(base, "_rejected"), "dead_letter": fs.join(base, "_dead_letter")}


def output_format(job: JobConfig, which: str) -> str:
    return job.output.format if which == "kept" else "jsonl"


def run_job(job: JobConfig, runner: RunnerConfig) -> RunReport:
    """Run one job and check its accounting; returns the report (a Dataflow dry run: the job graph
    in ``report.job_graph``, nothing run). Raises ReconcileError when the rows do not add up."""
    stages = job.build_stages()
    # A dry run builds the graph without touching the inputs (the launcher may not reach the bucket):
    # its read step expands the globs on the workers.
    files = list(job.input.paths) if runner.dry_run else expand_paths(job.input.paths)
    if not runner.dry_run:
        for folder in output_dirs(job).values():  # incomplete from here: a killed run leaves no complete output
            uncommit(folder)
    if progress.enabled() and runner.spills:
        from ..spill import disk_note

        bounded = [(s.name, s.spill_factor) for s in stages if runs_bounded(s)]
        # the local engine first writes each bundle's rows to a file, removed as they are read
        progress.note(disk_note(bounded, files, extra=1.0 if runner.engine == "local" else 0.0))
    start = time.perf_counter()
    graph = None
    with progress.run(files, job.name, enabled=not runner.dry_run) as prog:
        if runner.engine == "plain":
            reports = _run_plain(job, stages, files, prog, runner.memory_budget_mb)
        else:
            reports, graph = _run_beam(job, stages, files, runner, prog)
    report = RunReport(job.name, reports, time.perf_counter() - start, config=job.model_dump(mode="json"))
    if runner.dry_run:
        report.job_graph, report.outputs = graph, {"dry_run": True}
        return report
    dirs = output_dirs(job)
    report.outputs = {k: read_success(d) for k, d in dirs.items()}
    if reports[0].stats.get(FILE_PROBLEMS):
        reports[0].problems = file_problems(dirs["dead_letter"])
    failed = report.mismatches()
    if failed:
        for folder in dirs.values():
            uncommit(folder)
    report.save(fs.join(job.output.path, REPORT))
    report.check()
    return report


def file_problems(dead_dir: str) -> list[str]:
    """The reader's file-level dead letters (a broken stream, an unreadable file), one line each."""
    if not read_success(dead_dir):
        return []
    return [str(DeadLetter(**{k: v for k, v in row.items() if k in DeadLetter.__dataclass_fields__}))
            for row in read(dead_dir) if isinstance(row, dict) and row.get("scope") == FILE]


def _run_beam(job: JobConfig, stages: list[Stage], files: list[str], runner: RunnerConfig,
              prog: progress.RunProgress | None = None) -> tuple[list[StageReport], Any]:
    import apache_beam as beam

    from ..spill import spill_folder
    from .io_transforms import ReadFiles, WriteShards
    from .stage_transform import DEAD, KEPT, REJECTED, ApplyStage, reports_from_beam
    from .watch import finish, spool_for, watch

    accel = runner.dataflow.accelerator_hint() if runner.engine == "dataflow" and runner.dataflow else None
    # Workers in other processes (portable, Dataflow) do not share this process's working directory.
    dirs = {k: _absolute(v) for k, v in output_dirs(job).items()}
    files = [_absolute(f) for f in files]
    p = make_pipeline(runner, job.name)
    read_out = p | "Read" >> ReadFiles(files, job.input.format, job.input.kind, job.input.batch_rows,
                                       job.input.options, READ, progress=prog.token if prog else None,
                                       spool=spool_for(prog, runner))
    current, rejected, dead = read_out[KEPT], [], [read_out[DEAD]]
    # On the local engine whole-dataset steps spill to local disk instead of a shuffle held in memory.
    spill = spill_folder() if runner.spills and any(map(runs_bounded, stages)) else None
    for stage in stages:
        bounded = (runner.memory_budget_mb, spill) if spill and runs_bounded(stage) else None
        outs = current | ApplyStage(stage, accelerator=accel if stage.config.gpu else None, bounded=bounded)
        current = outs[KEPT]
        rejected.append(outs[REJECTED])
        dead.append(outs[DEAD])
    current | "WriteKept" >> WriteShards(dirs["kept"], job.output.format, job.output.rows_per_shard)
    if job.output.write_rejected and rejected:
        (rejected | "AllRejected" >> beam.Flatten()
         | "WriteRejected" >> WriteShards(dirs["rejected"], "jsonl", job.output.rows_per_shard))
    (dead | "AllDead" >> beam.Flatten()
     | "WriteDead" >> WriteShards(dirs["dead_letter"], "jsonl", job.output.rows_per_shard))
    try:
        result = p.run()
        watch(prog, result, READ)
        result.wait_until_finish()
    finally:
        if spill:
            shutil.rmtree(spill, ignore_errors=True)
    if runner.dry_run:
        return [], getattr(getattr(result, "job", None), "proto_pipeline", None)
    finish(prog, result, READ)
    reports = reports_from_beam(result, [READ] + [s.name for s in stages])
    for report, new_rows in zip(reports, [True] + [s.new_rows for s in stages]):
        report.new_rows = new_rows
    return reports, None


def _absolute(path: str) -> str:
    return path if fs.is_remote(path) else os.path.abspath(fs.local_path(path))


class _Sinks:
    """The plain loop's writers: hidden shards while running, committed like the Beam sink."""

    def __init__(self, job: JobConfig):
        self.job, self.dirs = job, output_dirs(job)
        self.writers: dict[str, ShardWriter] = {}

    def wanted(self, which: str) -> bool:
        return which != "rejected" or self.job.output.write_rejected

    def write(self, which: str, rows: list[dict]) -> None:
        if not rows or not self.wanted(which):
            return
        if which not in self.writers:
            fs.makedirs(self.dirs[which])
            self.writers[which] = ShardWriter(self.dirs[which], output_format(self.job, which),
                                              prefix=shard_prefix(), rows_per_shard=self.job.output.rows_per_shard)
        for row in rows:
            self.writers[which].write(row)

    def close(self) -> None:
        for which, folder in self.dirs.items():
            if self.wanted(which):
                shards = shards_of(self.writers[which]) if which in self.writers else []
                finalize_shards(folder, output_format(self.job, which), shards)


class _Timed:
    """An iterator that adds up the time spent getting its items (``take`` returns and resets it)."""

    def __init__(self, items: Iterator):
        self.items, self.seconds = items, 0.0

    def __iter__(self) -> _Timed:
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.seconds += time.perf_counter() - t0

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _counted(stream: Iterator[list[dict]], report: StageReport, which: str) -> Iterator[list[dict]]:
    """Pass batches through, counting them into ``report`` (rows in, or a reader's kept rows)."""
    for batch in stream:
        report.count(which, batch)
        yield batch


def _run_plain(job: JobConfig, stages: list[Stage], files: list[str], prog: progress.RunProgress | None,
               memory_mb: int) -> list[StageReport]:
    sinks = _Sinks(job)
    reader = StageReport(READ, new_rows=True)
    reports = [reader] + [StageReport(s.name, new_rows=s.new_rows) for s in stages]
    if prog is not None:  # the printer reads the reader's row count itself: nothing to do per row
        prog.sources.append(lambda: (0, 0, reader.rows_in))

    def read_rows() -> Iterator[dict]:
        for path in files:
            items, busy = read_file(path, job.input.format, kind=job.input.kind, **job.input.options), 0.0
            while True:  # time only the reader: while suspended at `yield`, later stages run
                t0 = time.perf_counter()
                item = next(items, None)
                busy += time.perf_counter() - t0
                if item is None:
                    break
                if isinstance(item, DeadLetter):
                    letter = item.to_row()
                    reader.rows_in += item.records
                    reader.count("dead", [letter], item.records)
                    if item.scope == FILE:
                        reader.add_stats({FILE_PROBLEMS: 1})
                    sinks.write("dead_letter", [letter])
                else:
                    reader.rows_in += 1
                    yield item
            reader.seconds += busy
            if prog is not None:
                prog.file_done(path)

    def record(report: StageReport, out: Outcome) -> list[dict]:
        for which, rows in (("kept", out.kept), ("rejected", out.rejected), ("dead", out.dead)):
            report.count(which, rows)
        report.add_stats(out.stats, out.seconds)
        sinks.write("rejected", out.rejected)
        sinks.write("dead_letter", out.dead)
        return out.kept

    def apply(stage: Stage, report: StageReport, stream: Iterator[list[dict]]) -> Iterator[list[dict]]:
        if runs_bounded(stage):  # a whole-dataset step that spills to disk: flat memory
            upstream = _Timed(row for batch in stream for row in batch)
            bounded = stage.run_bounded(upstream, memory_mb)
            t0 = time.perf_counter()
            for chunk in batches(bounded, job.input.batch_rows):
                busy = time.perf_counter() - t0 - upstream.take()  # not the stages it pulls its rows through
                kept = record(report, outcome_of(stage, chunk, busy, not stage.whole_tally))
                t0 = time.perf_counter()
                if kept:
                    yield kept
            if stage.whole_tally:
                record(report, Outcome(stats=stage.bounded_stats or {}))
            return
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
        stream = _counted(batches(read_rows(), job.input.batch_rows), reader, "kept")
        for stage, report in zip(stages, reports[1:]):
            stream = apply(stage, report, _counted(stream, report, "in"))
        for batch in stream:
            sinks.write("kept", batch)
        sinks.close()
    finally:
        for stage in stages:
            stage.teardown()
    return reports
