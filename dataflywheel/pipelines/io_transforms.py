"""Beam sources and sinks over our readers and the commit protocol of ``io/commit.py``.

Reading happens inside a DoFn from a (small) list of file paths, never by ``beam.Create`` of the
rows themselves (a 200k-row ``Create`` is ~110x slower than reading the same rows in a DoFn).
Writing is two-phase, as Beam's own file sinks do, but needs no rename, copy or batch call, so it
runs on object stores: each bundle writes complete shards under unique final names (``fs.atomic_path``)
and reports them with their row counts and id checksums; one finalize step commits the shards of
committed bundles (``io.commit.finalize_shards``: ``_SUCCESS.json`` names them, then strays of
retried bundles are deleted one by one).
"""

from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from ..io import DeadLetter, ShardWriter, expand_paths, fs, is_pattern, read_file
from ..io.base import FILE
from ..io.commit import finalize_shards, shard_prefix
from ..io.sink import ROWS_PER_SHARD
from ..progress import input_size, reporter
from ..stats import FILE_PROBLEMS, counter_name
from .stage_transform import count_ids, id_counters


def read_batches(path: str, fmt: str, kind: str | None, batch_rows: int, options: dict):
    """Yield ("rows", [row...]) and ("dead", [dead_letter_row...], n_records) for one file."""
    rows: list[dict] = []
    for item in read_file(path, fmt, kind=kind, **options):
        if isinstance(item, DeadLetter):
            yield "dead", [item.to_row()], item.records
            continue
        rows.append(item)
        if len(rows) >= batch_rows:
            yield "rows", rows, len(rows)
            rows = []
    if rows:
        yield "rows", rows, len(rows)


class ReadFilesDoFn(beam.DoFn):
    """Reads files into batches, counting records in, kept rows and dead letters (with id checksums)."""

    def __init__(self, fmt: str, kind: str | None, batch_rows: int, options: dict, stage: str = "read",
                 progress: str | None = None, spool: str | None = None):
        self.fmt, self.kind, self.batch_rows, self.options, self.stage = fmt, kind, batch_rows, options, stage
        self.progress, self.spool = progress, spool  # the watched run's token and spool folder (progress.py)

    def setup(self) -> None:
        ns = counter_name(self.stage)
        self.rows_in, self.kept, self.dead, self.busy_us, self.file_problems = (
            Metrics.counter(ns, n) for n in ("in", "kept", "dead_letter", "busy_us", f"stat/{FILE_PROBLEMS}"))
        self.files_done, self.bytes_done = Metrics.counter(ns, "files_done"), Metrics.counter(ns, "bytes_done")
        self.ids = {which: id_counters(ns, which) for which in ("kept", "dead")}
        self.report = reporter(self.progress, self.spool)

    def finish_bundle(self) -> None:
        if self.report is not None:
            self.report.flush()

    def process(self, path: str):
        # A glob or folder is expanded here, on the worker (a Dataflow job launched where the bucket
        # cannot be listed); the launcher normally expands it and sends files.
        for file in expand_paths(path) if is_pattern(path) else [path]:
            yield from self._read(file)

    def _read(self, path: str):
        start = time.perf_counter()
        for what, batch, n in read_batches(path, self.fmt, self.kind, self.batch_rows, self.options):
            self.rows_in.inc(n)
            if self.report is not None:
                self.report.add(rows=n)
            if what == "rows":
                self.kept.inc(n)
                count_ids(self.ids["kept"], batch)
            else:
                self.dead.inc(n)
                count_ids(self.ids["dead"], batch)
                if batch[0].get("scope") == FILE:
                    self.file_problems.inc()
            self.busy_us.inc(int((time.perf_counter() - start) * 1e6))
            yield batch if what == "rows" else beam.pvalue.TaggedOutput("dead_letter", batch)
            start = time.perf_counter()  # time spent downstream of the yield is not ours
        self.files_done.inc()
        if self.progress is not None:  # sizes only while watched: a remote file's size costs a request
            size = input_size(path)
            self.bytes_done.inc(size)
            if self.report is not None:
                self.report.add(files=1, bytes=size)


class ReadFiles(beam.PTransform):
    """file paths (a small list) -> PCollection of row batches; tagged output ``dead_letter``."""

    def __init__(self, paths: list[str], fmt: str = "auto", kind: str | None = None, batch_rows: int = 1000,
                 options: dict | None = None, stage: str = "read", progress: str | None = None,
                 spool: str | None = None):
        super().__init__()
        self.paths, self.fmt, self.kind, self.batch_rows = paths, fmt, kind, batch_rows
        self.options, self.stage, self.progress, self.spool = options or {}, stage, progress, spool

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self.paths) | "Spread" >> beam.Reshuffle()
        outs = files | "Read" >> beam.ParDo(
            ReadFilesDoFn(self.fmt, self.kind, self.batch_rows, self.options, self.stage, self.progress, self.spool)
        ).with_outputs("dead_letter", main="kept")
        return {"kept": outs.kept, "dead_letter": outs.dead_letter}


class _WriteBundleDoFn(beam.DoFn):
    def __init__(self, out_dir: str, fmt: str, rows_per_shard: int):
        self.out_dir, self.fmt, self.rows_per_shard = out_dir, fmt, rows_per_shard

    def start_bundle(self) -> None:
        self.writer = None

    def process(self, batch: list[dict]):
        if self.writer is None:
            fs.makedirs(self.out_dir)
            self.writer = ShardWriter(self.out_dir, self.fmt, prefix=shard_prefix(), rows_per_shard=self.rows_per_shard)
        for row in batch:
            self.writer.write(row)

    def finish_bundle(self):
        if self.writer is not None:
            for path, rows in self.writer.close():
                yield WindowedValue((path, rows, self.writer.ids[path]), MIN_TIMESTAMP, [GlobalWindow()])


class WriteShards(beam.PTransform):
    """PCollection of row batches -> ``out_dir/part-*.<fmt>`` + ``_SUCCESS.json``."""

    def __init__(self, out_dir: str, fmt: str = "jsonl", rows_per_shard: int = ROWS_PER_SHARD):
        super().__init__()
        self.out_dir, self.fmt, self.rows_per_shard = out_dir, fmt, rows_per_shard

    def expand(self, pcoll):
        return (
            pcoll
            | "WriteBundles" >> beam.ParDo(_WriteBundleDoFn(self.out_dir, self.fmt, self.rows_per_shard))
            | "Collect" >> beam.combiners.ToList()
            | "Finalize" >> beam.Map(lambda committed: finalize_shards(self.out_dir, self.fmt, committed))
        )
