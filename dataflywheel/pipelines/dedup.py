"""MinHash near-dedup on Beam: the distributed execution of ``filters/dedup/stage.py``.

    batches --Sign--> (id, row)                         (rows, keyed for the final join)
                 \\--> (band key, member) --GroupByKey--> edges judged per bucket
    edges --union-find on one worker | star rounds--> (id, cluster) --GroupBy cluster--> (id, cluster, size)
    (id, row) + (id, cluster, size) --CoGroupByKey--> decide --> kept / rejected, re-batched

Members carry the signature (and, when verifying, the sorted shingle-hash set), so a bucket judges
its pairs without another join; that puts ``bands`` copies of each in the shuffle, which is why
exact verification stops at ``max_exact_shingles``. Only rows in a cluster of two or more get a
label; every other row meets an empty label list in the join and is kept as is. Each decision is
the one ``MinHashDedup.run`` makes (tests run both on the same rows).
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from ..filters.dedup.components import union_find_components
from ..filters.dedup.stage import DUPLICATE_ID, MinHashDedup, _meta, decide
from ..stages import Outcome, dead_row, rejected_row
from ..stats import counter_name
from .components import ConnectedComponents
from .stage_transform import DEAD, KEPT, REJECTED, Rebatch, _emit, _StageFn

_ROWS, _BANDS = "rows", "bands"


def _pack(member) -> tuple:
    rid, sig, shingles = member
    return rid, sig.tobytes(), None if shingles is None else shingles.tobytes()


def _unpack(packed: tuple):
    rid, sig, shingles = packed
    return rid, np.frombuffer(sig, dtype=np.uint32), None if shingles is None else np.frombuffer(shingles, np.uint32)


class _SignFn(_StageFn):
    """Batches of rows -> rows keyed by id, and one member per band key; a row that cannot be
    signed (no id, a text that breaks the shingler) is a dead letter."""

    def process(self, batch: list[dict]):
        try:
            signed = list(zip(batch, self.stage.sign(batch)))
        except Exception:  # noqa: BLE001 - find the bad rows one by one
            signed, dead = [], []
            for row in batch:
                try:
                    signed.append((row, self.stage.sign([row])[0]))
                except Exception as err:  # noqa: BLE001
                    dead.append(dead_row(self.stage, row, err))
            self.counters.record(Outcome(dead=dead))
            if dead:
                yield beam.pvalue.TaggedOutput(DEAD, dead)
        for row, (rid, keys, member) in signed:
            yield beam.pvalue.TaggedOutput(_ROWS, (rid, row))
            packed = _pack(member)
            for key in keys:
                yield key, packed


class _BucketFn(_StageFn):
    def process(self, keyed):
        key, packed = keyed
        members = [_unpack(p) for p in packed]
        if len(members) > 1:
            yield from self.stage.edges(key, members)


def _with_sizes(keyed):
    cluster, ids = keyed
    ids = list(ids)
    for rid in ids:
        yield rid, (cluster, len(ids))


class _DecideFn(_StageFn):
    """One id's rows and its label (none for a singleton) -> the stage's decision, with counts."""

    def process(self, keyed):
        rid, joined = keyed
        rows, labels = list(joined[_ROWS]), list(joined["label"])
        if not rows:  # an id seen only in edges cannot happen: edges come from signed rows
            return
        firsts, repeats = self.stage.split_repeated_ids(rows) if len(rows) > 1 else (rows, [])
        cluster, size = labels[0] if labels else (rid, 1)
        row, reason = decide(firsts[0], cluster, size)
        decided = [(row, reason)] + [(_meta(r, duplicate_of=first), DUPLICATE_ID) for r, first in repeats]
        out = Outcome(stats=self.stage.tally([r for r, _ in decided]))
        for r, why in decided:
            (out.kept if why is None else out.rejected).append(r if why is None else rejected_row(self.stage, r, why))
        self.counters.record(out)
        yield from _emit(out)


class MinHashDedupTransform(beam.PTransform):
    """``batches | MinHashDedupTransform(stage)`` -> {kept, rejected, dead_letter} of batches."""

    def __init__(self, stage: MinHashDedup):
        super().__init__(label=f"MinHashDedup[{stage.name}]")
        self.stage = stage

    def expand(self, pcoll):
        stage = self.stage
        signed = pcoll | "Sign" >> beam.ParDo(_SignFn(stage)).with_outputs(_ROWS, DEAD, main=_BANDS)
        edges = (signed[_BANDS]
                 | "GroupBands" >> beam.GroupByKey()
                 | "JudgeBuckets" >> beam.ParDo(_BucketFn(stage)))
        if stage.config.components == "beam":
            # Re-links per round land in the report as components_relinked/rNN: the rounds it took.
            labels = {"edges": edges} | "Components" >> ConnectedComponents(
                stage.config.max_rounds, counter_name(stage.name), "stat/components_relinked/r")
        else:  # the edge list (near-duplicate pairs only) on one worker
            labels = (edges
                      | "AllEdges" >> beam.combiners.ToList()
                      | "UnionFind" >> beam.FlatMap(lambda es: union_find_components((), es).items()))
        sized = (labels
                 | "ByCluster" >> beam.Map(lambda nc: (nc[1], nc[0]))
                 | "GroupClusters" >> beam.GroupByKey()
                 | "Sizes" >> beam.FlatMap(_with_sizes))
        decided = (({_ROWS: signed[_ROWS], "label": sized})
                   | "JoinById" >> beam.CoGroupByKey()
                   | "Decide" >> beam.ParDo(_DecideFn(stage)).with_outputs(REJECTED, DEAD, main=KEPT))
        size = stage.config.batch_size
        dead = (signed[DEAD], decided[DEAD]) | "Dead" >> beam.Flatten()
        return {KEPT: decided[KEPT] | "RebatchKept" >> Rebatch(size),
                REJECTED: decided[REJECTED] | "RebatchRejected" >> Rebatch(size),
                DEAD: dead}
