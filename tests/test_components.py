"""Connected components: in-memory union-find vs the Beam large-star/small-star rounds.

The two engines must give the identical ``node -> smallest id of its component`` map on every
graph shape, including the ones that make label propagation slow (long chains).
"""

from __future__ import annotations

import math
import random

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from dataflywheel.filters.dedup.components import cluster_table, survivors, union_find_components
from dataflywheel.pipelines.components import ComponentsNotConverged, ConnectedComponents, components_metrics


def reference_components(nodes, edges) -> dict[str, str]:
    """Breadth-first search: a third, obviously-correct engine to check union-find against."""
    adj: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    out: dict[str, str] = {}
    for start in adj:
        if start in out:
            continue
        seen, frontier = {start}, [start]
        while frontier:
            u = frontier.pop()
            frontier += [v for v in adj[u] if v not in seen]
            seen.update(adj[u])
        label = min(seen)
        out.update(dict.fromkeys(seen, label))
    return out


def graph_families(rng: random.Random) -> dict[str, tuple[list[str], list[tuple[str, str]]]]:
    """Named (nodes, edges) graphs; ids carry the family name so their union stays disjoint."""
    fams = {}

    def ids(name, n):
        return [f"{name}-{i:04d}" for i in range(n)]

    c = ids("chain", 1000)  # sorted ids along a path: the slowest shape for star rounds
    fams["chain"] = (c, [(c[i], c[i + 1]) for i in range(len(c) - 1)])
    r = ids("rchain", 500)
    perm = r[:]
    rng.shuffle(perm)
    fams["rchain"] = (r, [(perm[i], perm[i + 1]) for i in range(len(perm) - 1)])
    s = ids("star", 200)  # centre is the largest id, so every leaf must be re-linked
    fams["star"] = (s, [(s[-1], leaf) for leaf in s[:-1]])
    small = ids("small", 600)  # many components of 2-5 nodes
    edges, i = [], 0
    while i < len(small):
        k = rng.randint(1, 5)
        edges += [(small[j], small[rng.randrange(i, j)]) for j in range(i + 1, min(i + k, len(small)))]
        i += k
    fams["small"] = (small, edges)
    fams["isolated"] = (ids("isolated", 50), [])
    loops = ids("loop", 20)
    fams["loops"] = (loops, [(n, n) for n in loops] + [(loops[0], loops[1])])
    d = ids("dup", 30)
    fams["dups"] = (d, [(d[i], d[i + 1]) for i in range(0, 29, 3)] * 3 + [(d[i + 1], d[i]) for i in range(0, 29, 3)])
    # ids that appear only in edges, never in the node list; mixed lengths test str order ("b" > "ab")
    fams["edge_only"] = (["eo-b"], [("eo-b", "eo-ab"), ("eo-ab", "eo-zz9"), ("eo-x", "eo-x")])
    g = ids("gnp", 400)  # sparse random graph around the giant-component threshold
    fams["gnp"] = (g, [(rng.choice(g), rng.choice(g)) for _ in range(380)])
    return fams


def union_of(fams):
    nodes = [n for ns, _ in fams.values() for n in ns]
    edges = [e for _, es in fams.values() for e in es]
    return nodes, edges


def run_beam(nodes, edges, max_rounds: int, with_nodes: bool = True):
    """Run the Beam rounds on FnApiRunner; assert they equal union-find; return the metrics."""
    expected = union_find_components(nodes if with_nodes else [], edges)
    p = beam.Pipeline(runner=FnApiRunner())
    inputs = {"edges": p | "Edges" >> beam.Create(edges)}
    if with_nodes:
        inputs["nodes"] = p | "Nodes" >> beam.Create(nodes)
    assert_that(inputs | ConnectedComponents(max_rounds=max_rounds), equal_to(sorted(expected.items())))
    result = p.run()
    result.wait_until_finish()
    return components_metrics(result)


def test_union_find_small_graph():
    nodes = ["d", "c", "b", "a", "e"]
    edges = [("d", "b"), ("c", "d"), ("e", "e"), ("x", "e")]
    assert union_find_components(nodes, edges) == {"a": "a", "b": "b", "c": "b", "d": "b", "e": "e", "x": "e"}
    assert union_find_components([], []) == {}


def test_union_find_matches_bfs_on_all_families():
    fams = graph_families(random.Random(0))
    nodes, edges = union_of(fams)
    assign = union_find_components(nodes, edges)
    assert assign == reference_components(nodes, edges)
    assert set(assign.values()) >= {"chain-0000", "star-0000", "eo-ab", "eo-x"}
    assert all(assign[n] == "chain-0000" for n in fams["chain"][0])
    assert all(assign[n] == n for n in fams["isolated"][0])


def test_labels_and_survivors_do_not_depend_on_order():
    fams = graph_families(random.Random(1))
    nodes, edges = union_of(fams)
    assign = union_find_components(nodes, edges)
    for seed in range(3):
        rng = random.Random(seed)
        shuffled = [(b, a) if rng.random() < 0.5 else (a, b) for a, b in rng.sample(edges, len(edges))]
        again = union_find_components(rng.sample(nodes, len(nodes)), shuffled)
        assert again == assign
        assert survivors(again) == survivors(assign)
    keep = survivors(assign)
    assert all(assign[n] in keep for n in assign)  # every cluster keeps exactly its smallest id
    assert len(keep) == len(set(assign.values()))


def test_cluster_table():
    assign = union_find_components(["a", "b", "c", "d"], [("b", "a"), ("c", "a")])
    assert cluster_table(assign) == [
        {"id": "a", "cluster": "a", "cluster_size": 3, "survivor": True},
        {"id": "b", "cluster": "a", "cluster_size": 3, "survivor": False},
        {"id": "c", "cluster": "a", "cluster_size": 3, "survivor": False},
        {"id": "d", "cluster": "d", "cluster_size": 1, "survivor": True},
    ]


def test_beam_rounds_equal_union_find_on_all_families():
    nodes, edges = union_of(graph_families(random.Random(2)))
    metrics = run_beam(nodes, edges, max_rounds=16)
    # The 1,000-node sorted chain dominates: ceil(log2 1000) = 10 work rounds, then one with no change.
    assert 1 <= metrics["rounds_to_converge"] <= math.ceil(math.log2(1000))
    assert metrics["rounds_run"] == metrics["rounds_to_converge"] + 1
    assert len(metrics["changed_per_round"]) == metrics["rounds_to_converge"]
    assert all(n > 0 for n in metrics["changed_per_round"])


@pytest.mark.parametrize("seed", [3, 4])
def test_beam_rounds_equal_union_find_on_random_graphs(seed):
    rng = random.Random(seed)
    # random-length ids so string order and id order disagree; duplicates and self-loops included
    nodes = sorted({"".join(rng.choices("abc0", k=rng.randint(1, 6))) for _ in range(400)})
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(rng.randint(150, 450))]
    edges += edges[:20] + [(b, a) for a, b in edges[20:40]]
    assert union_find_components(nodes, edges) == reference_components(nodes, edges)
    run_beam(nodes, edges, max_rounds=14, with_nodes=seed % 2 == 0)


def test_beam_chain_of_1000_converges_within_default_cap():
    c = [f"c{i:04d}" for i in range(1000)]
    metrics = run_beam(c, [(c[i + 1], c[i]) for i in range(len(c) - 1)], max_rounds=ConnectedComponents().max_rounds)
    assert metrics["rounds_to_converge"] == 10  # ceil(log2 1000)
    assert metrics["rounds_run"] < ConnectedComponents().max_rounds


def test_beam_fails_loudly_when_not_converged_at_cap():
    c = [f"c{i:03d}" for i in range(100)]
    with pytest.raises(ComponentsNotConverged, match="max_rounds"):
        run_beam(c, [(c[i], c[i + 1]) for i in range(len(c) - 1)], max_rounds=3)
    with pytest.raises(ValueError):
        ConnectedComponents(max_rounds=0)


def test_beam_no_edges():
    assert run_beam(["b", "a"], [], max_rounds=2)["rounds_to_converge"] == 0
