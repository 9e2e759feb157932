"""The one thin Beam wrapper around a stage.

Elements between our transforms are *batches* (lists of rows): Beam costs microseconds per
element, more than a cheap filter spends on a row (docs/engines.md), so rows travel in lists and
the per-element cost is paid once per batch. A PCollection of single rows (a user's own, or one
after a GroupByKey) is batched with ``BatchElements`` first.

``ApplyStage`` returns ``kept`` / ``rejected`` / ``dead_letter``, each a PCollection of batches.
It counts the rows entering the stage before the stage's plan runs, and the rows of each output
after it, with their id checksums (``stats.py``): the plan itself (a ParDo over batches, key ->
GroupByKey -> run, or a global step's own plan from ``plans.py``) only reports its busy time and
its ``tally()``. So a plan that loses, duplicates or replaces rows is caught by the run's checks.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from ..stages import GlobalStep, Outcome, Stage, batches, dead_row, process_batch, process_group
from ..stats import NAMESPACE_PREFIX, StageReport, checksum, counter_name, join64, split64

KEPT, REJECTED, DEAD = "kept", "rejected", "dead_letter"
_SETS = {KEPT: "kept", REJECTED: "rejected", DEAD: "dead"}  # output tag -> counted row set


def id_counters(ns: str, which: str) -> tuple[object, object]:
    """The two Beam counters carrying a row set's 64-bit id checksum (Beam counters are int64)."""
    return Metrics.counter(ns, f"ids/{which}/lo"), Metrics.counter(ns, f"ids/{which}/hi")


def count_ids(counters: tuple[object, object], rows: list[dict]) -> None:
    for counter, half in zip(counters, split64(checksum(rows))):
        counter.inc(half)


class CountRows(beam.DoFn):
    """Passes batches through, counting their rows and id checksum into ``dfw/<stage>``: ``in``,
    ``kept``, ``rejected`` (by reason) or ``dead`` (``dead_letter``)."""

    def __init__(self, stage: str, which: str):
        self.stage, self.which = stage, which

    def setup(self) -> None:
        self.ns = counter_name(self.stage)
        self.rows = Metrics.counter(self.ns, {"dead": "dead_letter"}.get(self.which, self.which))
        self.ids = id_counters(self.ns, self.which)
        self.reasons: dict[str, object] = {}

    def process(self, batch: list[dict]):
        count_ids(self.ids, batch)
        if self.which == "rejected":
            for reason, n in Counter(r["rejected"]["reason"] for r in batch).items():
                if reason not in self.reasons:
                    self.reasons[reason] = Metrics.counter(self.ns, f"rejected/{reason}")
                self.reasons[reason].inc(n)
        else:
            self.rows.inc(len(batch))
        yield batch


class StageCounters:
    """What a stage's own plan reports: busy time (µs) and its ``tally()`` counts."""

    def __init__(self, stage_name: str):
        self.ns = counter_name(stage_name)
        self.busy_us = Metrics.counter(self.ns, "busy_us")
        self.stats: dict[str, object] = {}

    def record(self, out: Outcome) -> None:
        self.busy_us.inc(int(out.seconds * 1e6))
        for key, n in out.stats.items():
            if key not in self.stats:
                self.stats[key] = Metrics.counter(self.ns, f"stat/{key}")
            self.stats[key].inc(n)


def emit(out: Outcome):
    """An outcome's rows as the main (kept) and tagged outputs of a DoFn."""
    if out.kept:
        yield out.kept
    if out.rejected:
        yield beam.pvalue.TaggedOutput(REJECTED, out.rejected)
    if out.dead:
        yield beam.pvalue.TaggedOutput(DEAD, out.dead)


class StageFn(beam.DoFn):
    """Holds a stage: its resources are built once per worker in ``setup``, its counters live per DoFn."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def setup(self) -> None:
        self.stage.setup()
        self.counters = StageCounters(self.stage.name)

    def teardown(self) -> None:
        self.stage.teardown()

    @contextmanager
    def busy(self):
        """Time the stage's own work (never around a ``yield``: downstream work runs inside it)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.counters.busy_us.inc(int((time.perf_counter() - start) * 1e6))


class StageDoFn(StageFn):
    """Runs a Scorer/Filter over batches, in chunks of the stage's ``batch_size``."""

    def process(self, batch: list[dict]):
        for chunk in batches(batch, self.stage.config.batch_size):
            out = process_batch(self.stage, chunk)
            self.counters.record(out)
            yield from emit(out)


class _KeyDoFn(StageFn):
    """Keys rows for a GlobalStep; a row whose key() raises is a dead letter, not a crash."""

    def process(self, batch: list[dict]):
        dead = []
        for row in batch:
            try:
                key = self.stage.key(row)
            except Exception as err:  # noqa: BLE001
                dead.append(dead_row(self.stage, row, err))
                continue
            yield ("" if key is None else str(key), row)
        if dead:
            yield beam.pvalue.TaggedOutput(DEAD, dead)


class _GroupDoFn(StageFn):
    def process(self, keyed):
        _, rows = keyed
        out = process_group(self.stage, list(rows))
        self.counters.record(out)
        yield from emit(out)


class Rebatch(beam.PTransform):
    """Batches -> batches of up to ``size`` rows. After a GroupByKey a step emits one small batch
    per group; without this, every later stage would pay Beam's per-element cost on tiny lists."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def expand(self, pcoll):
        return (pcoll
                | "Rows" >> beam.FlatMap(lambda batch: batch)
                | "Batch" >> beam.BatchElements(min_batch_size=self.size, max_batch_size=self.size))


class GroupPlan(beam.PTransform):
    """A GlobalStep's default plan: key -> GroupByKey -> run per group -> re-batched outputs."""

    def __init__(self, stage: GlobalStep):
        super().__init__()
        self.stage = stage

    def expand(self, pcoll):
        keyed = pcoll | "Key" >> beam.ParDo(_KeyDoFn(self.stage)).with_outputs(DEAD, main="keyed")
        grouped = keyed.keyed | "Group" >> beam.GroupByKey()
        outs = grouped | "Run" >> beam.ParDo(_GroupDoFn(self.stage)).with_outputs(REJECTED, DEAD, main=KEPT)
        size = self.stage.config.batch_size
        return {KEPT: outs[KEPT] | "RebatchKept" >> Rebatch(size),
                REJECTED: outs[REJECTED] | "RebatchRejected" >> Rebatch(size),
                DEAD: (keyed[DEAD], outs[DEAD]) | "Dead" >> beam.Flatten()}


class ApplyStage(beam.PTransform):
    """``pcoll | ApplyStage(stage)`` -> outputs ``kept`` / ``rejected`` / ``dead_letter`` (batches).

    ``batched=False`` when the input holds single rows; they are grouped with ``BatchElements``.
    ``accelerator`` (a Dataflow resource hint string) pins a GPU stage to accelerator workers.
    ``bounded`` (memory budget MB, spill folder) runs a whole-dataset step through ``run_bounded``
    on local disk (``bounded.py``) instead of its distributed plan.
    """

    def __init__(self, stage: Stage, batched: bool = True, accelerator: str | None = None,
                 bounded: tuple[int, str] | None = None):
        super().__init__(label=f"Stage[{stage.name}]")
        self.stage, self.batched, self.accelerator, self.bounded = stage, batched, accelerator, bounded

    def expand(self, pcoll):
        from .plans import plan_for

        stage = self.stage
        if not self.batched:
            size = stage.config.batch_size
            pcoll = pcoll | "Batch" >> beam.BatchElements(min_batch_size=min(8, size), max_batch_size=size)
        pcoll = pcoll | "CountIn" >> beam.ParDo(CountRows(stage.name, "in"))
        if isinstance(stage, GlobalStep) and self.bounded:  # (memory budget MB, spill folder): local engine
            from .bounded import BoundedPlan

            outs = pcoll | "Run" >> BoundedPlan(stage, *self.bounded)
        elif isinstance(stage, GlobalStep):
            outs = pcoll | "Run" >> plan_for(stage)
        else:
            pardo = beam.ParDo(StageDoFn(stage))
            if self.accelerator:
                pardo = pardo.with_resource_hints(accelerator=self.accelerator)
            outs = pcoll | "Run" >> pardo.with_outputs(REJECTED, DEAD, main=KEPT)
        return {tag: outs[tag] | f"Count{which.title()}" >> beam.ParDo(CountRows(stage.name, which))
                for tag, which in _SETS.items()}


def reports_from_beam(result: Any, stage_names: list[str]) -> list[StageReport]:
    """Read our counters back from a finished Beam pipeline result, in pipeline order."""
    by_stage: dict[str, StageReport] = {n: StageReport(n) for n in stage_names}
    halves: dict[tuple[str, str], list[int]] = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:
        ns = c.key.metric.namespace
        if not ns.startswith(NAMESPACE_PREFIX):
            continue
        report = by_stage.get(ns[len(NAMESPACE_PREFIX):])
        if report is None:  # another transform's metrics (e.g. dfw/components)
            continue
        name, value = c.key.metric.name, c.committed if c.committed is not None else c.attempted
        if name == "in":
            report.rows_in += value
        elif name == "kept":
            report.kept += value
        elif name == "dead_letter":
            report.dead_letter += value
        elif name.startswith("rejected/"):
            reason = name[len("rejected/"):]
            report.rejected[reason] = report.rejected.get(reason, 0) + value
        elif name.startswith("ids/"):  # ids/<set>/lo|hi
            _, which, half = name.split("/")
            halves.setdefault((report.stage, which), [0, 0])[half == "hi"] += value
        elif name == "busy_us":
            report.seconds += value / 1e6
        elif name.startswith("stat/"):
            key = name[len("stat/"):]
            report.stats[key] = report.stats.get(key, 0) + value
    for (stage, which), (lo, hi) in halves.items():
        by_stage[stage].ids[which] = join64(lo, hi)
    return list(by_stage.values())
