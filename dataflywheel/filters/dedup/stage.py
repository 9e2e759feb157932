"""The MinHash near-dedup stage: signatures -> LSH buckets -> verified edges -> clusters -> one survivor.

Two executions of one algorithm, which must decide every row identically:

- ``run(rows)`` (the plain engine, and a whole-dataset group anywhere): everything in memory, with
  union-find over the edges;
- the Beam plan registered for this class in ``pipelines/plans.py`` (every Beam engine): band keys
  as a keyed ``GroupByKey``, candidate pairs judged after joining each end's signature by id,
  connected components by union-find on one worker or by distributed star rounds
  (``components: beam``), joined back to the rows by id (``pipelines/dedup.py``).

Both share ``sign`` (signatures + band keys), ``lsh.bucket_pairs`` (candidates), ``is_edge``
(exact Jaccard verification of a candidate) and ``decide_id`` (the cluster's smallest id survives:
deterministic, whatever the engine, order or sharding). Every row of a cluster of two or more gets
``meta.cluster`` and ``meta.cluster_size`` for audit, and duplicates get ``meta.duplicate_of``, so
the kept output and ``_rejected`` together hold the full cluster table.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Literal

from pydantic import Field, model_validator

from ...registry import register
from ...stages import GlobalStep, StageConfig
from ..text import row_text
from .components import union_find_components
from .lsh import (
    MAX_EXACT_SHINGLES,
    THRESHOLD,
    Member,
    band_keys,
    bucket_pairs,
    judge,
    lsh_params,
    member_order,
    s_curve_table,
)
from .minhash import NGRAM, NUM_PERM, SEED, document_signatures

DUPLICATE, DUPLICATE_ID = "near_duplicate", "duplicate_id"


class MinHashDedupConfig(StageConfig):
    threshold: float = Field(THRESHOLD, gt=0.0, lt=1.0)  # Jaccard at which two rows are duplicates
    num_perm: int = Field(NUM_PERM, ge=8)  # datasketch 2.0 MinHash default
    seed: int = SEED  # datasketch default
    ngram: int = Field(NGRAM, ge=1)  # word 5-grams: datatrove, data-juicer, text-dedup
    char_ngram: int | None = Field(None, ge=1)  # character n-grams instead of words (NeMo uses 24)
    verify: bool = True  # judge candidates by exact Jaccard (MinHash estimate past max_exact_shingles)
    max_exact_shingles: int = Field(MAX_EXACT_SHINGLES, ge=1)
    lsh_threshold: float | None = Field(None, gt=0.0, lt=1.0)  # default: threshold - 0.2 with verify, else threshold
    components: Literal["union_find", "beam"] = "union_find"  # beam: star rounds, for edge sets past one worker
    max_rounds: int = Field(32, ge=1)  # cap of the star rounds (pipelines/components.py)
    batch_size: int = 512

    @model_validator(mode="after")
    def _lsh_below_threshold(self) -> MinHashDedupConfig:
        if self.lsh_threshold is not None and self.lsh_threshold > self.threshold and self.verify:
            raise ValueError(f"lsh_threshold {self.lsh_threshold} above threshold {self.threshold} loses pairs")
        return self


@register("minhash_dedup")
class MinHashDedup(GlobalStep):
    """Near-duplicate removal: keeps the smallest id of each cluster of rows with Jaccard >= threshold."""

    Config = MinHashDedupConfig
    # rows, signatures, shingle sets, ids, band keys and their partitions: 2.9 bytes a byte of input
    # (measured by benchmarks/scale.py on ~1 KB documents: 0.28 GB for 96 MB at 100k, 8.4 GB at 3M)
    spill_factor = 2.9

    def __init__(self, config: MinHashDedupConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        c = self.config
        self.bands, self.rows_per_band = lsh_params(c.threshold, c.num_perm, c.verify, c.lsh_threshold)

    def describe(self) -> str:
        """The S-curve of the chosen bands x rows, printed at the start of a run: the probability
        that a pair at each Jaccard similarity becomes a candidate, 1 - (1 - s^r)^b."""
        return f"{self.name}: threshold {self.config.threshold}\n" + s_curve_table(self.bands, self.rows_per_band)

    # -- shared by both executions -----------------------------------------------------------------

    def sign(self, rows: list[dict]) -> list[tuple[str, list[str], Member]]:
        """Per row: (id, band keys, (id, signature, shingle set if verifying))."""
        c = self.config
        sigs, sets = document_signatures((row_text(r) for r in rows), c.num_perm, c.seed, c.ngram, c.char_ngram)
        keys = band_keys(sigs, self.bands, self.rows_per_band)
        out = []
        for i, row in enumerate(rows):
            rid = str(row["id"])
            out.append((rid, keys[i], (rid, sigs[i], sets[i] if c.verify else None)))
        return out

    def is_edge(self, a: Member, b: Member) -> bool:
        c = self.config
        return judge(a, b, c.threshold, verify=c.verify, max_exact=c.max_exact_shingles) is not None

    def tally(self, rows: list[dict]) -> dict[str, int]:
        """``clusters`` (of two or more rows) and ``rows_in_clusters``: from the survivors' audit fields."""
        counts: Counter = Counter()
        for row in rows:
            size = (row.get("meta") or {}).get("cluster_size", 1)
            if size > 1:
                counts["rows_in_clusters"] += 1
                counts["clusters"] += (row["meta"]["cluster"] == str(row["id"]))
        return dict(counts)

    # -- in memory ---------------------------------------------------------------------------------

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        firsts, repeats = self.split_repeated_ids(rows)
        signed = self.sign(firsts)
        members = {rid: member for rid, _, member in signed}
        buckets: dict[str, list[str]] = defaultdict(list)
        for rid, keys, _ in signed:
            for key in keys:
                buckets[key].append(rid)
        candidates = {pair for ids in buckets.values() if len(ids) > 1 for pair in bucket_pairs(ids)}
        edges = [(a, b) for a, b in candidates if self.is_edge(members[a], members[b])]
        assign = union_find_components((str(r["id"]) for r in firsts), edges)
        sizes = Counter(assign.values())
        for row in firsts:
            cluster = assign[str(row["id"])]
            yield decide(row, cluster, sizes[cluster])
        for row, first_id in repeats:
            yield with_meta(row, duplicate_of=first_id), DUPLICATE_ID

    def run_bounded(self, rows: Iterable[dict], memory_mb: int) -> Iterator[tuple[dict, str | None]]:
        """``run`` in bounded memory: rows spilled to disk, band keys partitioned and paired on disk (spill.py)."""
        from .spill import run_spilled

        return run_spilled(self, rows, memory_mb)

    def decide_id(self, rows: list[dict], cluster: str, size: int) -> list[tuple[dict, str | None]]:
        """The decisions for the rows sharing one id, given the id's cluster and the cluster's size
        (what ``run`` decides for them; the Beam plan calls this once per id)."""
        firsts, repeats = self.split_repeated_ids(rows) if len(rows) > 1 else (rows, [])
        return [decide(firsts[0], cluster, size)] + [(with_meta(r, duplicate_of=first), DUPLICATE_ID)
                                                     for r, first in repeats]

    def split_repeated_ids(self, rows: list[dict]) -> tuple[list[dict], list[tuple[dict, str]]]:
        """Rows sharing an id cannot be told apart in the graph: one stands for the id and the
        others are rejected as ``duplicate_id``. The one chosen is first in ``member_order`` (its
        signature, then shingles: what the Beam buckets see), then in content order, so the choice
        is the same in both executions and independent of input order."""
        by_id: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_id[str(row["id"])].append(row)
        firsts, repeats = [], []
        for rid, group in by_id.items():
            if len(group) > 1:
                order = {id(row): member_order(member) for row, (_, _, member) in zip(group, self.sign(group))}
                group = sorted(group, key=lambda row: (order[id(row)], _content_order(row)))
            firsts.append(group[0])
            repeats.extend((row, rid) for row in group[1:])
        return firsts, repeats

def _content_order(row: dict) -> str:
    return repr(sorted(row.items(), key=lambda kv: kv[0]))


def decide(row: dict, cluster: str, size: int) -> tuple[dict, str | None]:
    """Keep the cluster's smallest id; the others are duplicates of it. Audit fields on all members."""
    if size <= 1:
        return row, None
    if str(row["id"]) == cluster:
        return with_meta(row, cluster=cluster, cluster_size=size), None
    return with_meta(row, cluster=cluster, cluster_size=size, duplicate_of=cluster), DUPLICATE


def with_meta(row: dict, **fields) -> dict:
    return {**row, "meta": {**(row.get("meta") or {}), **fields}}

