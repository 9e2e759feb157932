"""MinHash near-dedup on Beam: the distributed execution of ``filters/dedup/stage.py``.

    batches --Sign--> (id, row)            rows, for the final join
                 \\--> (id, member)         signature (+ shingle set), for judging pairs
                 \\--> (band key, id) --GroupByKey--> candidate pairs --Distinct
    pairs + members --CoGroupByKey by one end, then by the other--> judged edges
    edges --union-find on one worker | star rounds--> (id, cluster) --GroupBy cluster--> (id, cluster, size)
    (id, row) + (id, cluster, size) --CoGroupByKey--> decide --> kept / rejected, re-batched

Buckets carry ids only and each signature travels once per join, not once per band: on the
20k-row benchmark, carrying members in the buckets held 2.5-3.4 GB in the local runner. Only rows
in a cluster of two or more get a label; every other row meets an empty label list in the join
and is kept as is. Each decision is the one ``MinHashDedup.run`` makes (tests run both on the
same rows, and the dedup benchmark checks identical clusters on 20k rows).
"""

from __future__ import annotations

import time

import apache_beam as beam
import numpy as np

from ..filters.dedup.components import union_find_components
from ..filters.dedup.lsh import bucket_pairs
from ..filters.dedup.stage import MinHashDedup
from ..stages import Outcome, dead_row, rejected_row, retry_singly
from ..stats import counter_name
from .components import ConnectedComponents
from .stage_transform import DEAD, KEPT, REJECTED, Rebatch, StageFn, emit

_ROWS, _MEMBERS = "rows", "members"


def _pack(member) -> tuple:
    rid, sig, shingles = member
    return rid, sig.tobytes(), None if shingles is None else shingles.tobytes()


def _unpack(packed: tuple):
    rid, sig, shingles = packed
    return rid, np.frombuffer(sig, dtype=np.uint32), None if shingles is None else np.frombuffer(shingles, np.uint32)


def _first(packed_members) -> tuple:
    """The (packed) member standing for an id: where rows share an id, the first in
    ``member_order``, compared on the packed bytes (the same order, nothing unpacked)."""
    return min(packed_members, key=lambda p: (p[1], p[2] if p[2] is not None else b""))


class _SignFn(StageFn):
    """Batches of rows -> rows and members keyed by id, and (band key, id) for every band; a row
    that cannot be signed (no id, a text that breaks the shingler) is a dead letter."""

    def process(self, batch: list[dict]):
        dead: list[dict] = []

        def sign(rows: list[dict]) -> list[tuple[dict, tuple]]:
            return list(zip(rows, self.stage.sign(rows), strict=True))

        def dead_letter(row: dict, err: Exception) -> list:
            dead.append(dead_row(self.stage, row, err))
            return []

        with self.busy():
            signed = retry_singly(sign, batch, dead_letter)
        if dead:
            yield beam.pvalue.TaggedOutput(DEAD, dead)
        for row, (rid, keys, member) in signed:
            yield beam.pvalue.TaggedOutput(_ROWS, (rid, row))
            yield beam.pvalue.TaggedOutput(_MEMBERS, (rid, _pack(member)))
            for key in keys:
                yield key, rid


def _candidates(keyed):
    _, ids = keyed
    ids = list(ids)
    if len(ids) > 1:
        yield from bucket_pairs(ids)


def _half(keyed):
    """Pairs keyed by their first end + that end's member -> (second end, first end's member)."""
    _, joined = keyed
    if joined["pairs"] and joined[_MEMBERS]:
        packed = _first(joined[_MEMBERS])
        for other in joined["pairs"]:
            yield other, packed


class _JudgeFn(StageFn):
    def process(self, keyed):
        _, joined = keyed
        if not (joined["halves"] and joined[_MEMBERS]):
            return
        with self.busy():
            b = _unpack(_first(joined[_MEMBERS]))
            edges = [(a[0], b[0]) for a in map(_unpack, joined["halves"]) if self.stage.is_edge(a, b)]
        yield from edges


def _with_sizes(keyed):
    cluster, ids = keyed
    ids = list(ids)
    for rid in ids:
        yield rid, (cluster, len(ids))


class _DecideFn(StageFn):
    """One id's rows and its label (none for a singleton) -> the stage's decision, with counts."""

    def process(self, keyed):
        rid, joined = keyed
        rows, labels = list(joined[_ROWS]), list(joined["label"])
        if not rows:  # labels come from signed rows, so every label meets its row
            return
        start = time.perf_counter()
        cluster, size = labels[0] if labels else (rid, 1)
        decided = self.stage.decide_id(rows, cluster, size)
        out = Outcome(rows_in=len(rows), stats=self.stage.tally([r for r, _ in decided]))
        for row, why in decided:
            if why is None:
                out.kept.append(row)
            else:
                out.rejected.append(rejected_row(self.stage, row, why))
        out.seconds = time.perf_counter() - start
        self.counters.record(out)
        yield from emit(out)


class MinHashDedupTransform(beam.PTransform):
    """``batches | MinHashDedupTransform(stage)`` -> {kept, rejected, dead_letter} of batches."""

    def __init__(self, stage: MinHashDedup):
        super().__init__(label=f"MinHashDedup[{stage.name}]")
        self.stage = stage

    def expand(self, pcoll):
        stage = self.stage
        signed = pcoll | "Sign" >> beam.ParDo(_SignFn(stage)).with_outputs(_ROWS, _MEMBERS, DEAD, main="bands")
        members = signed[_MEMBERS]
        pairs = (signed.bands
                 | "GroupBands" >> beam.GroupByKey()
                 | "Candidates" >> beam.FlatMap(_candidates)
                 | "OncePerPair" >> beam.Distinct())
        halves = (({"pairs": pairs, _MEMBERS: members})
                  | "JoinFirstEnd" >> beam.CoGroupByKey()
                  | "Halves" >> beam.FlatMap(_half))
        edges = (({"halves": halves, _MEMBERS: members})
                 | "JoinSecondEnd" >> beam.CoGroupByKey()
                 | "Judge" >> beam.ParDo(_JudgeFn(stage)))
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
