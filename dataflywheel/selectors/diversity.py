"""Embedding-diversity selection (docs/selection.md#embedding-diversity; docs/sources.md#deita): four objectives, pure numpy.

Every function takes ``vectors``: an ``(n, d)`` array of L2-normalized rows (cosine = dot product),
returns row indices in the order they were selected, and keeps memory at O(n * d): similarities
are computed a column or a chunk at a time, never as an n x n matrix. Ties go to the lowest index,
so callers pass rows sorted by priority (best first) and every result is deterministic. Each is
tested against the textbook one-at-a-time loop (tests/test_diversity.py).

Cost at 100k x 384 (2 shared CPU cores): repr filter and k-means seconds, k-center tens of
seconds for 10k picks; facility location is exact greedy, ~n^2 d ln(budget): 40 s at 20k -> 2k,
so keep it to the pools Superfiltering.D uses it on (its quality filter keeps 20% first).

The ``diversity`` stage that runs them on rows lives in ``selectors/diversity_stage.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np

REPR_THRESHOLD = 0.9  # Deita's tau: cosine to every selected row must be <= 0.9 (docs/sources.md#deita)
KCENTER_BLOCK = 256  # ours: rows per lagging block in k-center (fastest of 64..8192 at 100k x 384)
REPR_CHUNK = 1024  # ours: candidates per matmul; any size gives the same selection
MINIBATCH_ABOVE = 20_000  # ours: rows past which k-means switches to MiniBatchKMeans (sklearn's advice for large n)
FL_CHUNK = 256  # ours: rows per matmul in facility location (memory FL_CHUNK x n floats); any size, same picks
FL_BATCH = 16  # ours: candidates re-summed per matmul when their running gains are too close to call
FL_INIT_CHUNK = 256  # ours: columns per pass when the submodlib kernel's initial gains are summed
# ours: running gains within FL_TOLERANCE * sqrt(terms summed) of the best are re-summed afresh;
# 2^-21 is 8 float32 ulps, 5x the largest drift measured (MiniLM embeddings of Alpaca, random vectors)
FL_TOLERANCE = 2.0 ** -21

Kernel = Literal["cosine", "submodlib_euclidean"]


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be (n, d), got shape {v.shape}")
    return v


def _copies(v: np.ndarray) -> np.ndarray:
    """For each row, the lowest index of a bitwise-identical row (itself when it is the first).

    Copies tie exactly in exact arithmetic, but a blocked matmul may give two copies a different
    last bit, which would let rounding, not priority, pick between them. So the objectives below
    choose among first copies only, and take the other copies after every distinct row (each is
    then at distance 0, gain 0, from its first copy).
    """
    hashes = np.fromiter((hash(row.tobytes()) for row in v), dtype=np.int64, count=len(v))
    _, first, group = np.unique(hashes, return_index=True, return_inverse=True)
    rep = first[group.ravel()]
    bits = v.view(np.uint32)
    for s in range(0, len(v), 8192):  # a hash collision between different rows: compare the bytes
        if not np.array_equal(bits[s:s + 8192], bits[rep[s:s + 8192]]):
            seen: dict[bytes, int] = {}
            return np.array([seen.setdefault(row.tobytes(), i) for i, row in enumerate(v)], dtype=np.int64)
    return rep


def _then_copies(picks: list[int], budget: int, n: int) -> list[int]:
    """``picks`` followed by the rows not in it, lowest index first, up to ``budget``."""
    if len(picks) < budget:
        taken = set(picks)
        picks = picks + [i for i in range(n) if i not in taken][:budget - len(picks)]
    return picks


def k_center_greedy(vectors: np.ndarray, budget: int, initial: Sequence[int] = (),
                    block: int = KCENTER_BLOCK) -> list[int]:
    """Farthest-first traversal (k-center greedy; Sener & Savarese 2018, docs/sources.md#embedding-diversity).

    Starts from ``initial`` (an already-selected set, DiverseEvol's seed) or else from row 0 (the
    highest-priority row when rows are sorted), then repeatedly adds the row farthest (L2) from
    everything selected so far, ties to the lowest index. ``budget`` is the size of the returned
    list, ``initial`` included. On unit vectors ||x - y||^2 = 2 - 2 x.y, so the farthest row is
    the one whose maximum cosine to the selected rows is lowest.

    The textbook loop updates every row after every pick (one matrix-vector product, n * d reads
    per pick). Here rows sit in blocks that may lag behind: a row's maximum cosine only grows as
    rows are added, so a lagging block's minimum is a lower bound, and a block is caught up (one
    matmul over the picks it missed) only when that bound could beat the best row found so far.
    Most blocks are far from the front most of the time: 4-5x faster at 100k rows, same picks.
    Memory O(n + budget * d).
    """
    v = _as_matrix(vectors)
    n = len(v)
    budget = min(budget, n)
    if budget <= 0:
        return []
    given = list(dict.fromkeys(int(i) for i in initial))[:budget]
    rep = _copies(v)
    firsts = np.flatnonzero(rep == np.arange(n))
    if len(firsts) == n:
        return _k_center(v, budget, given, block)
    # choose among first copies (a copy of a selected row is at distance 0: it comes last)
    position = np.full(n, -1)
    position[firsts] = np.arange(len(firsts))
    seeds = list(dict.fromkeys(int(position[rep[i]]) for i in given))
    picks = _k_center(v[firsts], min(len(firsts), len(seeds) + budget - len(given)), seeds, block)
    return _then_copies(given + [int(firsts[g]) for g in picks[len(seeds):]], budget, n)


def _k_center(v: np.ndarray, budget: int, given: list[int], block: int) -> list[int]:
    n = len(v)
    starts = range(0, n, block)
    max_sim = np.full(n, -np.inf, dtype=np.float32)  # cosine to the nearest selected row, as of `applied`
    lower = np.full(len(starts), -np.inf, dtype=np.float32)  # each block's minimum: exact once caught up
    applied = np.zeros(len(starts), dtype=np.int64)  # picks folded into each block so far
    picked = np.empty((budget, v.shape[1]), dtype=np.float32)
    selected: list[int] = []

    def add(p: int) -> None:
        picked[len(selected)] = v[p]
        selected.append(p)
        max_sim[p] = np.inf  # never picked again

    for p in given or [0]:
        add(p)
    while len(selected) < budget:
        m, best, best_i = len(selected), np.inf, n
        for b in np.argsort(lower, kind="stable"):
            lo = starts[b]
            if lower[b] > best or (lower[b] == best and lo > best_i):
                break  # this block and every later one cannot hold a better row
            hi = min(n, lo + block)
            if applied[b] < m:
                sims = v[lo:hi] @ picked[applied[b]:m].T
                np.maximum(max_sim[lo:hi], sims.max(axis=1), out=max_sim[lo:hi])
                applied[b] = m
            i = lo + int(np.argmin(max_sim[lo:hi]))  # argmin: the first minimum, the lowest index
            lower[b] = max_sim[i]
            if max_sim[i] < best or (max_sim[i] == best and i < best_i):
                best, best_i = max_sim[i], i
        add(best_i)
    return selected


def repr_filter(vectors: np.ndarray, order: Sequence[int], budget: int | None = None,
                threshold: float = REPR_THRESHOLD, chunk: int = REPR_CHUNK) -> list[int]:
    """Deita's Repr Filter (``deita/selection/filter/base.py``, docs/sources.md#deita), exactly.

    Walk the candidates in ``order`` (best score first); accept one iff its cosine similarity to
    every row accepted before it is <= ``threshold`` (the first is always accepted); stop once
    ``budget`` rows are accepted (None: walk everything). This is Deita's loop at its default
    ``batch_size=1``; with a larger batch Deita also rejects a candidate for resembling an earlier
    candidate of its batch that was itself rejected, which we do not copy.

    Fast and still exact: candidates go in chunks; one matmul gives each candidate's similarity
    to everything accepted before the chunk (kept in one array, doubled as it fills), and the
    chunk's own dependencies are then resolved in order with its chunk x chunk similarities.
    Time O(n * |S| * d) like Deita's, memory O(|S| * (d + chunk)). Float rounding aside (a value
    within ~1e-7 of the threshold), it returns what the one-at-a-time loop returns.

    distilabel's ``DeitaFiltering`` is a different algorithm: it keeps rows whose cosine *distance*
    to their nearest neighbour in the whole pool is >= its threshold, so both members of a
    near-duplicate pair are dropped (docs/sources.md#deita). We replicate Deita.
    """
    v = _as_matrix(vectors)
    order = np.asarray(order, dtype=np.int64)
    cap = len(order) if budget is None else min(budget, len(order))
    picks = repr_filter_chunks((v[order[i:i + chunk]] for i in range(0, len(order), chunk)), cap, threshold)
    return [int(order[p]) for p in picks]


def repr_filter_chunks(chunks: Iterable[np.ndarray], cap: int, threshold: float = REPR_THRESHOLD) -> list[int]:
    """``repr_filter`` over the candidates' vectors arriving in chunks, in walk order: the positions
    (in that order) of the rows accepted. Chunks are pulled only until ``cap`` rows are accepted,
    so a caller that embeds chunk by chunk embeds only what the walk reaches."""
    if cap <= 0:
        return []
    accepted: np.ndarray | None = None  # doubled as it fills
    selected: list[int] = []
    offset = 0
    for block in chunks:
        block = _as_matrix(block)
        cand = np.arange(offset, offset + len(block))
        offset += len(block)
        if accepted is None:
            accepted = np.empty((min(cap, REPR_CHUNK), block.shape[1]), dtype=np.float32)
        m = len(selected)
        if m:
            free = (block @ accepted[:m].T).max(axis=1) <= threshold
            cand, block = cand[free], block[free]
        close = (block @ block.T) > threshold  # within-chunk dependencies, resolved in order below
        blocked = np.zeros(len(cand), dtype=bool)
        for i in range(len(cand)):
            if blocked[i]:
                continue
            if len(selected) == len(accepted):
                accepted = np.concatenate([accepted, np.empty_like(accepted[:min(len(accepted), cap - len(accepted))])])
            accepted[len(selected)] = block[i]
            selected.append(int(cand[i]))
            if len(selected) == cap:
                return selected
            blocked |= close[i]  # marks earlier entries too, but they are decided already
    return selected


def _kernel(kind: Kernel, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """Cosine -> non-negative similarity, in place on a float32 array."""
    if kind == "cosine":
        def cosine(c: np.ndarray) -> np.ndarray:
            c += 1.0
            c *= 0.5
            return c
        return cosine
    if kind == "submodlib_euclidean":
        def euclidean(c: np.ndarray) -> np.ndarray:
            # submodlib dense "euclidean": exp(-||x - y|| / dim); on unit vectors ||x - y||^2 = 2 - 2 cos
            np.multiply(c, -2.0, out=c)
            c += 2.0
            np.maximum(c, 0.0, out=c)
            np.sqrt(c, out=c)
            c *= -1.0 / dim
            return np.exp(c, out=c)
        return euclidean
    raise ValueError(f"kernel must be cosine or submodlib_euclidean, got {kind!r}")


def _initial_gains(v: np.ndarray, kind: Kernel, sim: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """F({j}) = sum_i sim(i, j) for every j, in float64."""
    n = len(v)
    if kind == "cosine":
        # sum_i (1 + e_i.e_j) / 2 = (n + (sum_i e_i).e_j) / 2: one pass, no column sums
        total = v.sum(axis=0, dtype=np.float64)
        dots = np.concatenate([v[s:s + 8192].astype(np.float64) @ total for s in range(0, n, 8192)])
        return (n + dots) / 2.0
    gains = np.empty(n, dtype=np.float64)
    for s in range(0, n, FL_INIT_CHUNK):  # no closed form: O(n^2 d) time, O(n * chunk) memory
        gains[s:s + FL_INIT_CHUNK] = sim(v @ v[s:s + FL_INIT_CHUNK].T).sum(axis=0, dtype=np.float64)
    return gains


def _fresh_gains(v: np.ndarray, js: np.ndarray, cover_sim: np.ndarray,
                 sim: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Gains of candidates ``js`` summed afresh, sum_i max(0, sim(i, j) - cover_i), in float64."""
    out = np.empty(len(js), dtype=np.float64)
    for s in range(0, len(js), FL_BATCH):
        cols = sim(v @ v[js[s:s + FL_BATCH]].T).astype(np.float64)
        cols -= cover_sim[:, None]
        out[s:s + FL_BATCH] = np.maximum(cols, 0.0).sum(axis=0)
    return out


def facility_location(vectors: np.ndarray, budget: int, kernel: Kernel = "cosine") -> list[int]:
    """Greedy maximization of facility location F(S) = sum_i max_{j in S} sim(i, j) (docs/sources.md#embedding-diversity).

    ``kernel="cosine"`` (default): sim = (1 + cos) / 2, in [0, 1]. Non-negative, so F is monotone
    submodular and greedy is within (1 - 1/e) of the optimum (plain cosine can be negative, which
    breaks monotonicity), and the initial gains have a closed form, (n + (sum_i e_i).e_j) / 2.
    ``kernel="submodlib_euclidean"`` is what Superfiltering.D runs (submodlib
    ``FacilityLocationFunction(mode="dense", metric="euclidean")``, docs/sources.md#superfiltering): sim =
    exp(-||x - y|| / d). On 384-d unit vectors that spans only [0.9948, 1] and is nearly linear
    in the distance, where ours is linear in the squared distance, so the two pick differently.
    Use it to replicate the paper, knowing that its late gains differ by less than float32 can
    resolve (at pick 750 of 2,489 Alpaca rows the top gains are ~0.0028 apart by ~1e-6), so
    from there its picks depend on rounding in any float32 implementation, submodlib's included.
    submodlib also holds the dense n x n kernel: 40 GB at 100k rows.

    Plain greedy, made cheap by keeping every gain up to date instead of re-evaluating lazily:
    when j joins S, only rows i whose cover improves (sim(i, j) > cover_i) change any gain, and
    gain_k drops by the sum over those rows of clip(sim(i, k), old cover, new cover) - old cover.
    Those rows number about n * ln(budget) over a run (a row's cover improves less and less
    often): ~n^2 d ln(budget) multiply-adds, all in matmuls, and O(n * FL_CHUNK) memory. Minoux's
    lazy greedy (submodlib's LazyGreedy) re-evaluates most candidates at every pick on sentence
    embeddings, whose gains sit close together: 19-32 s against 5-6 s here for 10k rows -> 500.
    The running gains carry float32 rounding (measured <= 1.6 ulps x sqrt(terms summed)), so
    every candidate within ``FL_TOLERANCE`` of the best is re-summed afresh before one is picked:
    the picks are plain greedy's (every gain recomputed every step, ties to the lowest index) up
    to float rounding. Bitwise copies of a row are picked only after every distinct row.
    """
    v = _as_matrix(vectors)
    n = len(v)
    budget = min(budget, n)
    if budget <= 0:
        return []
    sim = _kernel(kernel, v.shape[1])
    gains = _initial_gains(v, kernel, sim)
    is_copy = _copies(v) != np.arange(n)
    gains[is_copy] = -np.inf  # a later copy of a row is picked only after every distinct row
    budget, full = min(budget, n - int(is_copy.sum())), budget
    cover = np.full(n, -np.inf, dtype=np.float32)  # max cosine to S; -inf for the empty set
    cover_sim = np.zeros(n, dtype=np.float32)  # sim at that cosine: max_{j in S} sim(i, j), 0 when empty
    selected: list[int] = []
    terms = n  # row contributions summed into the running gains so far (the rounding grows ~ sqrt)
    while len(selected) < budget:
        best = gains.max()
        tol = FL_TOLERANCE * np.sqrt(terms)
        near = np.flatnonzero(gains >= best - tol)
        if len(near) > 1 and best > tol:
            j = int(near[np.argmax(_fresh_gains(v, near, cover_sim, sim))])
        else:  # one clear best; or every gain is zero up to rounding (all rows covered): the lowest index
            j = int(near[0])
        selected.append(j)
        col = v @ v[j]
        rows = np.flatnonzero(col > cover)
        terms += len(rows)
        for s in range(0, len(rows), FL_CHUNK):
            r = rows[s:s + FL_CHUNK]
            block = v[r] @ v.T  # (rows, n): cosine of each changed row to every candidate
            np.clip(block, cover[r][:, None], col[r][:, None], out=block)
            if kernel == "cosine":  # linear: sum the clipped cosines, convert once
                drop = (len(r) + block.sum(axis=0, dtype=np.float64)) / 2.0
            else:
                drop = sim(block).sum(axis=0, dtype=np.float64)
            gains -= drop - cover_sim[r].sum(dtype=np.float64)
        cover[rows] = col[rows]
        cover_sim[rows] = sim(col[rows].copy())
        gains[j] = -np.inf
    return _then_copies(selected, full, n)


def _uniform_quotas(sizes: list[int], budget: int) -> list[int]:
    """As even as possible, as dealing one row per cluster per round (largest cluster first, ties
    to the lower label) until the budget is spent: every cluster gets min(size, L) for the largest
    level L that fits, and the rest goes one each to the largest clusters that can take more."""
    lo, hi = 0, max(sizes)
    while lo < hi:  # largest L with sum(min(size, L)) <= budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(s, mid) for s in sizes) <= budget else (lo, mid - 1)
    quota = [min(s, lo) for s in sizes]
    bigger = sorted((c for c, s in enumerate(sizes) if s > lo), key=lambda c: (-sizes[c], c))
    for c in bigger[:budget - sum(quota)]:
        quota[c] += 1
    return quota


def _proportional_quotas(sizes: list[int], budget: int) -> list[int]:
    """budget * size / n per cluster, rounded by largest remainder (Hamilton); never above size."""
    n = sum(sizes)
    quota = [budget * s // n for s in sizes]
    rest = sorted(range(len(sizes)), key=lambda c: (-(budget * sizes[c] % n), -sizes[c], c))
    for c in rest[:budget - sum(quota)]:
        quota[c] += 1
    return quota


def kmeans_sample(vectors: np.ndarray, budget: int, n_clusters: int, seed: int = 0,
                  mode: Literal["uniform", "proportional"] = "uniform",
                  order: Sequence[int] | None = None) -> list[int]:
    """k-means cluster sampling (docs/sources.md#embedding-diversity; Cherry_LLM clusters with K=100, random_state=0).

    Clusters with scikit-learn (``KMeans``; ``MiniBatchKMeans`` past ``MINIBATCH_ABOVE`` rows),
    ``random_state=seed``. Per cluster: ``uniform`` splits the budget evenly (what a small cluster
    cannot fill goes to the others), ``proportional`` in proportion to cluster size. Within a
    cluster rows are taken best first: by position in ``order`` when given (a priority, e.g. a
    score; rows absent from it come after), else nearest the centroid first. The result
    interleaves the clusters: every cluster's first pick, then every cluster's second, ...
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    v = _as_matrix(vectors)
    n = len(v)
    budget = min(budget, n)
    if budget <= 0:
        return []
    k = max(1, min(n_clusters, n))
    if n > MINIBATCH_ABOVE:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed)  # sklearn defaults: batch 1024, one k-means++ init
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=1)  # k-means++ seeding, one run (sklearn's "auto")
    if mode not in ("uniform", "proportional"):
        raise ValueError(f"mode must be uniform or proportional, got {mode!r}")
    labels = model.fit_predict(v)
    centers = model.cluster_centers_.astype(np.float32)
    dist = np.empty(n, dtype=np.float32)
    for s in range(0, n, 8192):  # squared distance to the own centroid, chunked: no n x d copy
        diff = v[s:s + 8192] - centers[labels[s:s + 8192]]
        dist[s:s + 8192] = np.einsum("ij,ij->i", diff, diff)
    rank = np.full(n, n, dtype=np.int64)
    if order is not None:
        rank[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
    members = [[] for _ in range(k)]
    for i in np.lexsort((np.arange(n), dist, rank)):  # priority, then distance, then index
        members[labels[i]].append(int(i))
    sizes = [len(m) for m in members]
    quotas = _uniform_quotas(sizes, budget) if mode == "uniform" else _proportional_quotas(sizes, budget)
    return [members[c][r] for r in range(max(quotas)) for c in range(k) if r < quotas[c]]
