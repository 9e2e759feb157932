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

import apache_beam as beam
import numpy as np

from ..filters.dedup.components import union_find_components
from ..filters.dedup.lsh import bucket_pairs
from ..filters.dedup.stage import DUPLICATE_ID, MinHashDedup, _meta, decide
from ..stages import Outcome, dead_row, rejected_row
from ..stats import counter_name
from .components import ConnectedComponents
from .stage_transform import DEAD, KEPT, REJECTED, Rebatch, _emit, _StageFn

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


class _SignFn(_StageFn):
    """Batches of rows -> rows and members keyed by id, and (band key, id) for every band; a row
    that cannot be signed (no id, a text that breaks the shingler) is a dead letter."""

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


class _JudgeFn(_StageFn):
    def process(self, keyed):
        _, joined = keyed
        if not (joined["halves"] and joined[_MEMBERS]):
            return
        b = _unpack(_first(joined[_MEMBERS]))
        for packed in joined["halves"]:
            a = _unpack(packed)
            if self.stage.is_edge(a, b):
                yield a[0], b[0]


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
        if not rows:  # labels come from signed rows, so every label meets its row
            return
        firsts, repeats = self.stage.split_repeated_ids(rows) if len(rows) > 1 else (rows, [])
        cluster, size = labels[0] if labels else (rid, 1)
        decided = [decide(firsts[0], cluster, size)]
        decided += [(_meta(r, duplicate_of=first), DUPLICATE_ID) for r, first in repeats]
        out = Outcome(stats=self.stage.tally([r for r, _ in decided]))
        for row, why in decided:
            if why is None:
                out.kept.append(row)
            else:
                out.rejected.append(rejected_row(self.stage, row, why))
        self.counters.record(out)
        yield from _emit(out)


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
