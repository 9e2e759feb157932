"""The one thin Beam wrapper around a stage (DESIGN §3).

Elements between our transforms are *batches* (lists of rows): Beam costs microseconds per
element (REFERENCES §1.5), which is more than a cheap filter spends on a row, so rows travel in
lists and the per-element cost is paid once per batch. A PCollection of single rows (a user's own,
or one after a GroupByKey) is batched with ``BatchElements`` first.

``ApplyStage`` returns a ``DoOutputsTuple`` with ``kept`` (main), ``rejected`` and ``dead_letter``,
each a PCollection of batches; counts go to Beam metrics under ``dfw/<stage>``.
"""

from __future__ import annotations

from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics

from ..stages import GlobalStep, Outcome, Stage, batches, dead_row, process_batch, process_group
from ..stats import counter_name

KEPT, REJECTED, DEAD = "kept", "rejected", "dead_letter"


class StageCounters:
    """Beam counters of one stage; created lazily per DoFn instance (not picklable state)."""

    def __init__(self, stage_name: str):
        ns = counter_name(stage_name)
        self.ns = ns
        self.rows_in = Metrics.counter(ns, "in")
        self.kept = Metrics.counter(ns, "kept")
        self.dead = Metrics.counter(ns, "dead_letter")
        self.busy_ms = Metrics.counter(ns, "busy_ms")
        self.rejected: dict[str, object] = {}
        self.stats: dict[str, object] = {}

    def record(self, out: Outcome) -> None:
        self.rows_in.inc(out.rows_in)
        self.kept.inc(len(out.kept))
        self.dead.inc(len(out.dead))
        self.busy_ms.inc(int(out.seconds * 1000))
        for reason, n in Counter(r["rejected"]["reason"] for r in out.rejected).items():
            if reason not in self.rejected:
                self.rejected[reason] = Metrics.counter(self.ns, f"rejected/{reason}")
            self.rejected[reason].inc(n)
        for key, n in out.stats.items():
            if key not in self.stats:
                self.stats[key] = Metrics.counter(self.ns, f"stat/{key}")
            self.stats[key].inc(n)


def _emit(out: Outcome):
    if out.kept:
        yield out.kept
    if out.rejected:
        yield beam.pvalue.TaggedOutput(REJECTED, out.rejected)
    if out.dead:
        yield beam.pvalue.TaggedOutput(DEAD, out.dead)


class _StageFn(beam.DoFn):
    """Holds a stage: its models load once per worker in ``setup``, its counters live per DoFn."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def setup(self) -> None:
        self.stage.setup()
        self.counters = StageCounters(self.stage.name)

    def teardown(self) -> None:
        self.stage.teardown()


class StageDoFn(_StageFn):
    """Runs a Scorer/Filter over batches, in chunks of the stage's ``batch_size``."""

    def process(self, batch: list[dict]):
        for chunk in batches(batch, self.stage.config.batch_size):
            out = process_batch(self.stage, chunk)
            self.counters.record(out)
            yield from _emit(out)


class _KeyDoFn(_StageFn):
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
            self.counters.record(Outcome(dead=dead))
            yield beam.pvalue.TaggedOutput(DEAD, dead)


class _GroupDoFn(_StageFn):
    def process(self, keyed):
        _, rows = keyed
        out = process_group(self.stage, list(rows))
        self.counters.record(out)
        yield from _emit(out)


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


class ApplyStage(beam.PTransform):
    """``pcoll | ApplyStage(stage)`` -> outputs ``kept`` / ``rejected`` / ``dead_letter`` (batches).

    ``batched=False`` when the input holds single rows; they are grouped with ``BatchElements``.
    ``accelerator`` (a Dataflow resource hint string) pins a GPU stage to accelerator workers.
    """

    def __init__(self, stage: Stage, batched: bool = True, accelerator: str | None = None):
        super().__init__(label=f"Stage[{stage.name}]")
        self.stage, self.batched, self.accelerator = stage, batched, accelerator

    def expand(self, pcoll):
        if not self.batched:
            size = self.stage.config.batch_size
            pcoll = pcoll | "Batch" >> beam.BatchElements(min_batch_size=min(8, size), max_batch_size=size)
        own_plan = self.stage.beam_transform() if isinstance(self.stage, GlobalStep) else None
        if own_plan is not None:
            return pcoll | "Run" >> own_plan
        if isinstance(self.stage, GlobalStep):
            keyed = pcoll | "Key" >> beam.ParDo(_KeyDoFn(self.stage)).with_outputs(DEAD, main="keyed")
            grouped = keyed.keyed | "Group" >> beam.GroupByKey()
            outs = grouped | "Run" >> beam.ParDo(_GroupDoFn(self.stage)).with_outputs(REJECTED, DEAD, main=KEPT)
            dead = (keyed[DEAD], outs[DEAD]) | "Dead" >> beam.Flatten()
            size = self.stage.config.batch_size
            return {KEPT: outs[KEPT] | "RebatchKept" >> Rebatch(size),
                    REJECTED: outs[REJECTED] | "RebatchRejected" >> Rebatch(size), DEAD: dead}
        pardo = beam.ParDo(StageDoFn(self.stage))
        if self.accelerator:
            pardo = pardo.with_resource_hints(accelerator=self.accelerator)
        outs = pcoll | "Run" >> pardo.with_outputs(REJECTED, DEAD, main=KEPT)
        return {KEPT: outs[KEPT], REJECTED: outs[REJECTED], DEAD: outs[DEAD]}
