"""The local engine's plan for whole-dataset steps that run in bounded memory (``run_bounded``).

The FnApiRunner holds a GroupByKey's input in memory, so on one machine the distributed plans
(band keys through a shuffle) grow with the corpus. Here the rows never meet in a shuffle:

    batches -> each bundle pickles its rows to a spill file (fused with the stage before it)
            -> the files' paths (a short list) -> one DoFn streams the rows from the files
               through ``stage.run_bounded`` (which spills to disk past its memory budget)
            -> kept / rejected batches, fused with the counting and the writers after it.

Only for engines whose workers share the launcher's disk (``local``, any mode); Dataflow and
portable runners keep the distributed plans. The spill folder is removed when the job ends,
successfully or not, and a killed run's folder by the next run (``filters/dedup/spill.py``).
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from ..spill import disk_full, is_full
from ..stages import GlobalStep, Outcome, outcome_of
from .stage_transform import DEAD, KEPT, REJECTED, StageFn, emit


class _SpillBundles(beam.DoFn):
    """Each bundle's rows into one pickle file of the spill folder; emits the file's path."""

    def __init__(self, folder: str, name: str):
        self.folder, self.name = folder, name

    def start_bundle(self) -> None:
        self.fh = None

    def process(self, batch: list[dict]):
        with self.full_disk():
            if self.fh is None:
                self.path = os.path.join(self.folder, f"bundle-{uuid.uuid4().hex}.pickle")
                self.fh = open(self.path, "wb")
            for row in batch:
                pickle.dump(row, self.fh, protocol=pickle.HIGHEST_PROTOCOL)
        return []

    def finish_bundle(self):
        if self.fh is not None:
            with self.full_disk():
                self.fh.close()
            yield WindowedValue(self.path, MIN_TIMESTAMP, [GlobalWindow()])

    @contextmanager
    def full_disk(self):
        try:
            yield
        except OSError as err:
            if is_full(err):
                raise disk_full(self.name, self.folder) from None
            raise


def _rows(paths: list[str]) -> Iterator[dict]:
    """The spilled rows, file by file (sorted: the same order on every run of the same bundles)."""
    for path in sorted(paths):
        with open(path, "rb") as fh:
            while True:
                try:
                    yield pickle.load(fh)
                except EOFError:
                    break
        os.remove(path)


class _RunBounded(StageFn):
    def __init__(self, stage: GlobalStep, memory_mb: int):
        super().__init__(stage)
        self.memory_mb = memory_mb

    def process(self, paths: list[str]):
        decisions = iter(self.stage.run_bounded(_rows(paths), self.memory_mb))
        while True:
            with self.busy():  # the step's work happens while its decisions are pulled
                chunk = list(islice(decisions, self.stage.config.batch_size))
                out = outcome_of(self.stage, chunk, 0.0, not self.stage.whole_tally)
                self.counters.record(out)
            if not chunk:
                break
            yield from emit(out)
        if self.stage.whole_tally:
            self.counters.record(Outcome(stats=self.stage.bounded_stats or {}))


class BoundedPlan(beam.PTransform):
    """``run_bounded`` of a whole-dataset step on the local engine (see the module docstring)."""

    def __init__(self, stage: GlobalStep, memory_mb: int, folder: str):
        super().__init__()
        self.stage, self.memory_mb, self.folder = stage, memory_mb, folder

    def expand(self, pcoll):
        outs = (pcoll
                | "Spill" >> beam.ParDo(_SpillBundles(self.folder, self.stage.name))
                | "Files" >> beam.combiners.ToList()
                | "RunBounded" >> beam.ParDo(_RunBounded(self.stage, self.memory_mb)).with_outputs(
                    REJECTED, DEAD, main=KEPT))
        return {KEPT: outs[KEPT], REJECTED: outs[REJECTED], DEAD: outs[DEAD]}
