"""Embedding-diversity selection: each objective against a plain reference implementation, at 100k
rows, and the ``diversity`` stage with the real MiniLM embedder, its cache, and on Beam's FnApiRunner."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from dataflywheel.selectors import embed as embed_mod
from dataflywheel.selectors.diversity import (
    _proportional_quotas,
    _uniform_quotas,
    facility_location,
    k_center_greedy,
    kmeans_sample,
    repr_filter,
)
from dataflywheel.selectors.diversity_stage import Diversity
from dataflywheel.stages import process_group


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, centres: int, noise: float, seed: int) -> np.ndarray:
    """Rows scattered around ``centres`` random directions: many pairs above cosine 0.9."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + rng.standard_normal((n, d), dtype=np.float32) * np.float32(noise / d ** 0.5)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- plain references: the textbook loops, one candidate at a time ---------------------------


def naive_k_center(v, budget, initial=()):
    selected = list(dict.fromkeys(initial))[:budget] or [0]
    while len(selected) < min(budget, len(v)):
        dist = np.min([np.linalg.norm(v - v[s], axis=1) for s in selected], axis=0)
        dist[selected] = -1.0
        selected.append(int(np.argmax(dist)))
    return selected


def naive_repr(v, order, budget, threshold):
    selected = []
    for i in order:
        if all(float(v[i] @ v[s]) <= threshold for s in selected):
            selected.append(int(i))
            if budget is not None and len(selected) == budget:
                break
    return selected


def naive_facility_location(v, budget, kernel="cosine"):
    cos = v @ v.T
    sim = (1 + cos) / 2 if kernel == "cosine" else np.exp(-np.sqrt(np.maximum(2 - 2 * cos, 0)) / v.shape[1])
    cover, selected = np.zeros(len(v)), []
    for _ in range(min(budget, len(v))):
        gains = np.maximum(sim - cover[:, None], 0).sum(axis=0)  # every gain, recomputed every step
        gains[selected] = -np.inf
        selected.append(int(np.argmax(gains)))
        cover = np.maximum(cover, sim[:, selected[-1]])
    return selected


def round_robin_quotas(sizes, budget):
    quota, order = [0] * len(sizes), sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
    while budget > 0 and any(q < s for q, s in zip(quota, sizes)):
        for c in order:
            if budget and quota[c] < sizes[c]:
                quota[c] += 1
                budget -= 1
    return quota


# --- the objectives -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_center_equals_naive(seed):
    v = unit(300, 16, seed)
    expected = naive_k_center(v, 40)
    for block in (1, 7, 64, 4096):  # blocks lag behind and catch up; any size, same picks
        assert k_center_greedy(v, 40, block=block) == expected
        assert k_center_greedy(v, 40, initial=[7, 3, 7], block=block) == naive_k_center(v, 40, [7, 3])
    assert k_center_greedy(v, 40) == k_center_greedy(v.copy(), 40)  # deterministic


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_repr_filter_equals_one_at_a_time_loop(seed, threshold):
    v = clustered(400, 16, 60, 0.8, seed)
    order = np.random.default_rng(seed).permutation(len(v))
    expected = naive_repr(v, order, None, threshold)
    assert 20 < len(expected) < len(v)  # both accepting and rejecting happen
    for chunk in (1, 7, 64, 1024):
        assert repr_filter(v, order, None, threshold, chunk) == expected
        assert repr_filter(v, order, 15, threshold, chunk) == naive_repr(v, order, 15, threshold)


@pytest.mark.parametrize("kernel", ["cosine", "submodlib_euclidean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_facility_location_equals_brute_force_greedy(seed, kernel):
    v = unit(250, 16, seed)
    assert facility_location(v, 250, kernel) == naive_facility_location(v, 250, kernel)  # every pick, to n


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_copies_tie_to_the_lowest_index(seed):
    rows = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), 4))  # copies scattered over blocks
    v = unit(10, 8, seed)[rows]
    for block in (1, 2, 3, 5):  # blocked matmuls may round copies apart: copies are handled explicitly
        assert k_center_greedy(v, 40, block=block) == naive_k_center(v, 40)
    assert facility_location(v, 40) == naive_facility_location(v, 40)


def test_duplicates_past_the_distinct_rows_are_each_picked_once():
    v = np.repeat(unit(5, 8, 0), 3, axis=0)  # each row three times: all covered after 5 picks
    picks = facility_location(v, 15)
    assert sorted(picks) == list(range(15)) and picks == naive_facility_location(v, 15)
    for block in (2, 256):
        picks = k_center_greedy(v, 15, block=block)  # exact ties: the lowest index of each copy set
        assert sorted(picks) == list(range(15)) and sorted(picks[:5]) == [0, 3, 6, 9, 12]


def test_kmeans_sample_equals_reference():
    from sklearn.cluster import KMeans

    v = clustered(600, 16, 8, 1.0, 0)
    labels = KMeans(n_clusters=10, random_state=0, n_init=1).fit(v)
    dist = np.linalg.norm(v - labels.cluster_centers_[labels.labels_], axis=1)
    members = [sorted(np.flatnonzero(labels.labels_ == c), key=lambda i: (dist[i], i)) for c in range(10)]
    quotas = round_robin_quotas([len(m) for m in members], 47)
    expected = [int(members[c][r]) for r in range(max(quotas)) for c in range(10) if r < quotas[c]]
    assert kmeans_sample(v, 47, 10, seed=0) == expected
    assert kmeans_sample(v, 47, 10, seed=0) == expected  # deterministic
    by_priority = kmeans_sample(v, 47, 10, seed=0, order=np.arange(600))  # priority = lowest index first
    assert sorted(by_priority) == sorted(int(i) for c in range(10) for i in sorted(members[c])[:quotas[c]])


@pytest.mark.parametrize("sizes,budget", [([5, 1, 9, 3], 10), ([4, 4, 4], 11), ([2, 7], 9), ([3, 3, 8, 1], 4)])
def test_cluster_quotas(sizes, budget):
    assert _uniform_quotas(sizes, budget) == round_robin_quotas(sizes, budget)
    prop = _proportional_quotas(sizes, budget)
    assert sum(prop) == budget and all(q <= s for q, s in zip(prop, sizes))
    assert all(abs(q - budget * s / sum(sizes)) < 1 for q, s in zip(prop, sizes))


def test_proportional_quotas_round_by_largest_remainder():
    # shares 2.78, 0.56, 5.0, 1.67: floors 2, 0, 5, 1; the 2 left go to .78 and .67 (Hamilton)
    assert _proportional_quotas([5, 1, 9, 3], 10) == [3, 0, 5, 2]
    assert _proportional_quotas([2, 2, 2], 2) == [1, 1, 0]  # equal remainders: lower label first


@pytest.mark.parametrize("method", ["kcenter", "repr", "kmeans", "fl"])
def test_budget_past_n_and_empty_input(method):
    run = {"kcenter": lambda v, b: k_center_greedy(v, b), "repr": lambda v, b: repr_filter(v, range(len(v)), b, 0.999),
           "kmeans": lambda v, b: kmeans_sample(v, b, 3), "fl": lambda v, b: facility_location(v, b)}[method]
    v = unit(12, 8, 0)
    assert sorted(run(v, 50)) == list(range(12))
    assert run(np.zeros((0, 8), dtype=np.float32), 5) == []


# --- 100k rows: O(n * d) memory, the same answers -----------------------------------------------


@pytest.fixture(scope="module")
def big():
    return clustered(100_000, 384, 3000, 0.33, 7)  # same-centre pairs sit near cosine 0.9


def test_repr_filter_at_100k_rows_decides_every_row_as_the_loop_would(big):
    n, d = big.shape
    tracemalloc.start()
    picks = repr_filter(big, np.arange(n), 4000, 0.9)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * d * 4  # less than one more copy of the input (an n x n matrix would be 40 GB)
    assert len(picks) == 4000
    seen = picks[-1] + 1  # the walk stopped at the budget
    assert 5000 < seen < n  # ... after rejecting many rows
    # The loop's defining property, checked for every row walked: row i is selected iff no row
    # selected before it has cosine > 0.9. Chunked matmuls against the selected set check them all.
    sel = np.asarray(picks)
    is_selected = np.zeros(n, dtype=bool)
    is_selected[sel] = True
    for s in range(0, seen, 8192):
        rows = np.arange(s, min(s + 8192, seen))
        sims = big[rows] @ big[sel].T
        sims[sel[None, :] >= rows[:, None]] = -1  # only rows selected earlier count
        assert np.array_equal(sims.max(axis=1) <= 0.9, is_selected[rows])


def test_k_center_at_100k_rows_is_farthest_first(big):
    picks = k_center_greedy(big, 25)
    nearest = np.full(len(big), np.inf)
    for t in range(1, len(picks)):
        nearest = np.minimum(nearest, np.linalg.norm(big - big[picks[t - 1]], axis=1))
        assert nearest[picks[t]] == pytest.approx(nearest.max(), abs=1e-5)


# --- the stage ------------------------------------------------------------------------------------

TOPICS = [
    ("How do I bake sourdough bread at home?", "Feed a starter, mix flour and water, proof overnight, bake hot."),
    ("What is the capital of Australia?", "Canberra is the capital of Australia."),
    ("Explain how photosynthesis works.", "Plants turn light, water and CO2 into glucose and oxygen."),
    ("Write a haiku about autumn leaves.", "Red leaves drift and fall / the cold wind carries them home / branches stand alone"),
    ("How do I reverse a list in Python?", "Use my_list.reverse() in place, or my_list[::-1] for a copy."),
    ("What causes ocean tides?", "The Moon's and Sun's gravity pull on the oceans."),
    ("Give me tips for a job interview.", "Research the company, prepare examples, and ask questions."),
    ("Translate 'good morning' into Spanish.", "Buenos dias."),
]


def conversation(rid: str, q: str, a: str, score: float | None) -> dict:
    row = {"id": rid, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if score is not None:
        row["scores"] = {"quality": score}
    return row


def pool() -> list[dict]:
    """8 topics, each with a near-copy (one word added) scored lower, and one row with no score."""
    rows = []
    for i, (q, a) in enumerate(TOPICS):
        rows.append(conversation(f"t{i}", q, a, 10.0 - i))
        rows.append(conversation(f"t{i}-copy", q.replace("?", " please?").rstrip(".") + ", please.", a, 1.0 - i / 10))
    rows.append(conversation("unscored", "What is 2 + 2?", "4", None))
    return rows


def decide(stage: Diversity, rows: list[dict]):
    stage.setup()
    out = process_group(stage, rows)
    return out, {r["id"]: r["scores"]["diversity_rank"] for r in out.kept}, {r["id"]: r["rejected"]["reason"]
                                                                            for r in out.rejected}


def test_stage_repr_filter_is_deita_and_matches_the_loop_on_real_embeddings():
    rows = pool()
    stage = Diversity(method="repr_filter", order_by="quality", budget=100)
    out, kept, rejected = decide(stage, rows)
    assert rejected["unscored"] == "missing_score"
    # the same decision, recomputed: MiniLM vectors in score order, then the one-at-a-time loop
    scored = sorted((r for r in rows if "scores" in r), key=lambda r: -r["scores"]["quality"])
    vectors = embed_mod.row_vectors(scored, "conversation")
    expected = [scored[i]["id"] for i in naive_repr(vectors, range(len(scored)), None, 0.9)]
    assert sorted(kept, key=kept.get) == expected
    assert {f"t{i}" for i in range(8)} <= set(kept)  # every topic's higher-scored original survives
    assert "too_similar" in rejected.values()  # and some copy was caught
    assert out.stats["selected"] == len(kept) and out.stats["too_similar"] == list(rejected.values()).count("too_similar")


def test_stage_budget_rejects_the_rest_as_not_selected_and_fraction_floors():
    _, kept, rejected = decide(Diversity(method="repr_filter", order_by="quality", budget=3), pool())
    assert sorted(kept, key=kept.get) == ["t0", "t1", "t2"]  # top scores, all far apart
    assert set(rejected.values()) == {"not_selected", "missing_score"}  # the walk stopped at the budget
    _, kept, _ = decide(Diversity(method="kcenter", fraction=0.29), pool())
    assert len(kept) == 4  # floor(0.29 * 17 rows in)
    _, kept, rejected = decide(Diversity(method="repr_filter", fraction=0.05), pool())  # floor(0.85) = 0
    assert not kept and set(rejected.values()) == {"not_selected"}


@pytest.mark.parametrize("method", ["kcenter", "kmeans", "facility_location"])
def test_stage_other_methods_select_budget_rows_deterministically(method):
    rows = pool()
    _, kept, rejected = decide(Diversity(method=method, budget=5, order_by="quality"), rows)
    _, again, _ = decide(Diversity(method=method, budget=5, order_by="quality"), list(reversed(rows)))
    assert kept == again and sorted(kept.values()) == [1, 2, 3, 4, 5]
    assert set(rejected.values()) == {"not_selected", "missing_score"}
    if method == "kcenter":
        assert kept["t0"] == 1  # k-center starts from the highest-scored row


def test_stage_rejects_rows_without_text_and_handles_empty_input():
    out, kept, rejected = decide(Diversity(method="kcenter", budget=2), [{"id": "p", "prompt": "hi"}])
    assert rejected == {"p": "no_text"} and not kept
    assert process_group(Diversity(method="kcenter", budget=2), []).rows_in == 0


def test_stage_config_errors():
    with pytest.raises(ValueError, match="exactly one"):
        Diversity(method="kcenter", budget=3, fraction=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        Diversity(method="kcenter")
    with pytest.raises(ValueError, match="threshold applies to method repr_filter"):
        Diversity(method="kcenter", budget=3, threshold=0.8)


def test_stage_cache_second_run_embeds_nothing(tmp_path, monkeypatch):
    calls = []
    real = embed_mod.embed
    monkeypatch.setattr(embed_mod, "embed", lambda model, texts, batch_size=64: calls.append(len(texts))
                        or real(model, texts, batch_size))
    cache = str(tmp_path / "vectors.sqlite")
    first, kept1, _ = decide(Diversity(method="repr_filter", order_by="quality", budget=100, cache=cache), pool())
    assert sum(calls) == 16 and first.stats["embedded"] == 16 and first.stats["cached"] == 0
    calls.clear()
    again, kept2, _ = decide(Diversity(method="repr_filter", order_by="quality", budget=100, cache=cache), pool())
    assert calls == [] and again.stats["embedded"] == 0 and again.stats["cached"] == 16
    assert kept2 == kept1
    # another method and budget; without order_by the unscored row is a candidate: the one miss
    other, kept3, _ = decide(Diversity(method="kcenter", budget=4, cache=cache), pool())
    assert calls == [1] and other.stats["embedded"] == 1 and len(kept3) == 4
    calls.clear()
    nocache, kept4, _ = decide(Diversity(method="repr_filter", order_by="quality", budget=100), pool())
    assert kept4 == kept1 and sum(calls) == 16  # cached vectors select exactly what fresh ones do


def test_stage_on_beam_fnapirunner_equals_plain_loop_and_reconciles(tmp_path):
    from dataflywheel.io import read
    from dataflywheel.pipelines.config import parse_config
    from dataflywheel.pipelines.job import run_job

    rows = pool()
    for name, part in (("a", rows[::2]), ("b", rows[1::2])):  # two files: Beam may interleave them
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    stage = {"stage": "diversity", "method": "repr_filter", "order_by": "quality", "budget": 6,
             "cache": str(tmp_path / "vectors.sqlite")}
    results = {}
    for engine in ("plain", "local"):
        cfg = {"name": "div", "runner": {"engine": engine}, "stages": [stage],
               "input": {"paths": str(tmp_path / "*.jsonl"), "kind": "conversation", "batch_rows": 4},
               "output": {"path": str(tmp_path / engine), "format": "jsonl"}}
        parsed = parse_config(cfg, "<test>")
        report = run_job(parsed.jobs[0], parsed.runner)
        (div,) = [s for s in report.stages if s.stage == "diversity"]
        assert div.rows_in == 17 and div.kept + sum(div.rejected.values()) == 17
        assert div.rejected["missing_score"] == 1
        results[engine] = sorted((r["id"], r["scores"]["diversity_rank"]) for r in read(str(tmp_path / engine)))
    assert results["plain"] == results["local"] and len(results["plain"]) == 6
