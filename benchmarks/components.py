"""Connected components on real near-duplicate edges: in-memory union-find vs the Beam star rounds.

Edges: the verified near-duplicate edges of ``lsh.near_duplicate_pairs`` (defaults, as in
benchmarks/dedup_quality.py) on ../shared/data/neardup at J >= 0.7 and 0.8.  Both engines get every
row as a node and the same edge list:

- ``union_find_components`` (filters/dedup/components.py), one process;
- ``ConnectedComponents`` (pipelines/components.py, Kiveris et al. large-star/small-star rounds) on
  the pinned local FnApiRunner (``runner.make_pipeline``, engine local), default ``max_rounds``;
  its output is written to JSONL and read back.

The claim is correctness at the same labels, not speed: the clusters (node -> smallest id of its
component) must be identical; rounds to converge come from ``components_metrics``.  Timings of both
are printed (the Beam figure is the whole pipeline: start-up, every unrolled round, the write).
Full mode also times the Beam pipeline with no edges (its fixed cost) and adds a synthetic worst
case, a chain of 10,000 sorted ids (ceil(log2 n) = 14 work rounds, pipelines/components.py).
``--quick``: the ~4,000-row subset of dedup_quality.py, neither of those.
Ends with one ``BENCH components_<graph> ... PASS|FAIL`` line per graph (PASS = identical clusters).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import tempfile
import time

import apache_beam as beam
from dedup_quality import NEARDUP, load_corpus  # benchmarks/ is on sys.path when run as a script

from dataflywheel.filters.dedup import lsh
from dataflywheel.filters.dedup.components import union_find_components
from dataflywheel.pipelines.components import ComponentsNotConverged, ConnectedComponents, components_metrics
from dataflywheel.runner import RunnerConfig, make_pipeline

THRESHOLDS = (0.7, 0.8)
CHAIN = 10_000  # synthetic worst case (full mode): sorted ids along a path


def beam_components(nodes: list[str], edges: list[tuple[str, str]]) -> tuple[dict[str, str], float, dict]:
    """(node -> cluster, seconds, components_metrics) from ConnectedComponents on the local FnApiRunner."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        p = make_pipeline(RunnerConfig(engine="local"), "bench-components")
        graph = {"edges": p | "Edges" >> beam.Create(edges), "nodes": p | "Nodes" >> beam.Create(nodes)}
        (graph | ConnectedComponents()
         | beam.Map(json.dumps)
         | beam.io.WriteToText(f"{tmp}/cc", file_name_suffix=".jsonl"))
        result = p.run()
        result.wait_until_finish()
        took = time.perf_counter() - start
        out: dict[str, str] = {}
        for path in glob.glob(f"{tmp}/cc*.jsonl"):
            with open(path) as f:
                for line in f:
                    node, cluster = json.loads(line)
                    assert node not in out, f"node {node} labelled twice"
                    out[node] = cluster
    return out, took, components_metrics(result)


def compare(name: str, nodes: list[str], edges: list[tuple[str, str]]) -> str:
    """Run both engines on one graph, print the comparison, return its BENCH line."""
    start = time.perf_counter()
    expected = union_find_components(nodes, edges)
    uf_s = time.perf_counter() - start
    sizes: dict[str, int] = {}
    for c in expected.values():
        sizes[c] = sizes.get(c, 0) + 1
    print(f"\n{name}: {len(nodes):,} nodes, {len(edges):,} edges -> {len(sizes):,} components "
          f"({sum(s > 1 for s in sizes.values()):,} non-singleton, largest {max(sizes.values(), default=0)})")
    try:
        got, beam_s, metrics = beam_components(nodes, edges)
    except ComponentsNotConverged as e:
        print(f"  Beam rounds did not converge: {e}")
        return f"BENCH components_{name} union_find={uf_s:.3f}s beam=- identical=no FAIL"
    diff = [n for n in expected if got.get(n) != expected[n]] + [n for n in got if n not in expected]
    same = not diff
    print(f"  union-find      {uf_s:8.3f} s")
    print(f"  Beam star rounds {beam_s:7.2f} s  rounds to converge {metrics['rounds_to_converge']} "
          f"(+1 confirming = {metrics['rounds_run']} run, of {ConnectedComponents().max_rounds} unrolled); "
          f"edges re-linked per round {metrics['changed_per_round']}")
    print(f"  identical clusters: {same}" + ("" if same else f" ({len(diff)} nodes differ, e.g. {diff[:3]})"))
    return (f"BENCH components_{name} beam={beam_s:.2f}s union_find={uf_s:.3f}s "
            f"rounds={metrics['rounds_to_converge']} identical={'yes' if same else 'no'} {'PASS' if same else 'FAIL'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the ~4k-row subset, no synthetic chain")
    args = ap.parse_args()
    if not (NEARDUP / "corpus.jsonl.gz").is_file():
        print(f"SKIP components: {NEARDUP} not found")
        return 0
    rows = load_corpus(args.quick)
    nodes = [r["id"] for r in rows]
    size = "" if len(rows) == 20_000 else f"{len(rows) // 1000}k_"
    bench = []
    for t in THRESHOLDS:
        start = time.perf_counter()
        edges = [(a, b) for a, b, _ in lsh.near_duplicate_pairs(rows, t)]
        print(f"\nverified edges at J >= {t}: {len(edges):,} from {len(rows):,} rows "
              f"in {time.perf_counter() - start:.1f} s (near_duplicate_pairs defaults)")
        bench.append(compare(f"neardup_{size}t{t}", nodes, edges))
    if not args.quick:
        # what the Beam figure is made of: the same pipeline with no edges (start-up, 32 bypassed rounds, write)
        _, fixed_s, _ = beam_components(nodes, [])
        print(f"\nBeam fixed cost: {len(nodes):,} nodes, no edges: {fixed_s:.2f} s")
        chain = [f"c{i:05d}" for i in range(CHAIN)]
        print(f"\nsynthetic worst case: expect ceil(log2 {CHAIN}) = {math.ceil(math.log2(CHAIN))} work rounds")
        bench.append(compare(f"sorted_chain_{CHAIN // 1000}k", chain,
                             [(chain[i + 1], chain[i]) for i in range(CHAIN - 1)]))
    print("\n" + "\n".join(bench))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
