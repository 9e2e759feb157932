"""Beam sources and sinks over our readers and the commit protocol of ``io/commit.py``.

Reading happens inside a DoFn from a (small) list of file paths, never by ``beam.Create`` of the
rows themselves (a 200k-row ``Create`` is ~110x slower than reading the same rows in a DoFn).
Writing is two-phase, as Beam's own file sinks do: each bundle writes complete *hidden* shards
(temp file + rename, so no half-written shard ever exists) and reports them with their row counts
and id checksums; one finalize step commits the shards of committed bundles
(``io.commit.finalize_shards``: final names, leftovers of retried bundles removed, ``_SUCCESS.json``
last).
"""

from __future__ import annotations

import os
import time
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from ..io import DeadLetter, ShardWriter, read_file
from ..io.base import FILE
from ..io.commit import TMP_PREFIX, finalize_shards
from ..io.sink import ROWS_PER_SHARD
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

    def __init__(self, fmt: str, kind: str | None, batch_rows: int, options: dict, stage: str = "read"):
        self.fmt, self.kind, self.batch_rows, self.options, self.stage = fmt, kind, batch_rows, options, stage

    def setup(self) -> None:
        ns = counter_name(self.stage)
        self.rows_in, self.kept, self.dead, self.busy_us, self.file_problems = (
            Metrics.counter(ns, n) for n in ("in", "kept", "dead_letter", "busy_us", f"stat/{FILE_PROBLEMS}"))
        self.ids = {which: id_counters(ns, which) for which in ("kept", "dead")}

    def process(self, path: str):
        start = time.perf_counter()
        for what, batch, n in read_batches(path, self.fmt, self.kind, self.batch_rows, self.options):
            self.rows_in.inc(n)
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


class ReadFiles(beam.PTransform):
    """file paths (a small list) -> PCollection of row batches; tagged output ``dead_letter``."""

    def __init__(self, paths: list[str], fmt: str = "auto", kind: str | None = None, batch_rows: int = 1000,
                 options: dict | None = None, stage: str = "read"):
        super().__init__()
        self.paths, self.fmt, self.kind, self.batch_rows = paths, fmt, kind, batch_rows
        self.options, self.stage = options or {}, stage

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self.paths) | "Spread" >> beam.Reshuffle()
        outs = files | "Read" >> beam.ParDo(
            ReadFilesDoFn(self.fmt, self.kind, self.batch_rows, self.options, self.stage)
        ).with_outputs("dead_letter", main="kept")
        return {"kept": outs.kept, "dead_letter": outs.dead_letter}


class _WriteBundleDoFn(beam.DoFn):
    def __init__(self, out_dir: str, fmt: str, rows_per_shard: int):
        self.out_dir, self.fmt, self.rows_per_shard = out_dir, fmt, rows_per_shard

    def start_bundle(self) -> None:
        self.writer = None

    def process(self, batch: list[dict]):
        if self.writer is None:
            os.makedirs(self.out_dir, exist_ok=True)
            prefix = f"{TMP_PREFIX}{uuid.uuid4().hex}"
            self.writer = ShardWriter(self.out_dir, self.fmt, prefix=prefix, rows_per_shard=self.rows_per_shard)
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
