"""SFT selection throughput, ours beside the straightforward reference, in one run (docs/benchmarks.md#selection).

1. IFD scoring on ../shared/data/alpaca_subset with a tiny Llama built here (CPU): the ``ifd`` stage
   (one batched call per score(), forward batch 8) vs the reference loop Cherry_LLM and
   Superfiltering run: one sample at a time, one unpadded forward per (prompt + answer) and per
   answer alone, transformers' own loss over labels with the prompt masked (-100). The IFDs must
   agree to 1e-5 (``BENCH ifd_matches_reference``) and the stage must be no slower than the bare
   loop (``BENCH ifd_stage_vs_reference_loop``).
   The same on HH-RLHF's multi-turn conversations (helpful-online test, the chosen side): every
   assistant turn with its context, pooled over the row, against the same loop turn by turn.
2. Embeddings: ``row_vectors`` (MiniLM from its wheel, through the score cache) vs calling
   ``SentenceTransformer.encode`` on the same texts; then a cached re-run, which embeds nothing.
3. Selection over 100k synthetic rows (384-d unit vectors, clustered so similarity thresholds
   bite): Deita's representation filter, chunked (ours) vs the one-candidate-at-a-time loop of
   Deita's code, with identical selections required; k-center greedy and k-means sampling timed
   alone, and facility location as Superfiltering.D uses it, on a quality-filtered tenth down to
   1% of the pool (its cost grows as n^2 in the rows it sees). Peak RSS is printed.

Throughput ratios are best of 2 interleaved runs per side. ``--quick`` (make bench): 160 IFD rows,
256 texts, 20k rows for selection.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPEATS = 2  # throughput comparisons: best of this many interleaved runs per side


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def load_alpaca(n: int) -> list[dict]:
    from dataflywheel.records import validate

    rows = []
    for path in sorted((DATA / "alpaca_subset").glob("*.jsonl")):
        with open(path) as f:
            for line in f:
                rows.append(validate("conversation", json.loads(line)))
                if len(rows) == n:
                    return rows
    return rows


def reference_ifd(model, tok, rows: list[dict]) -> list[float | None]:
    """Cherry_LLM / Superfiltering's loop: one sample at a time, unpadded, labels masked before the answer."""
    import torch

    out = []
    for row in rows:
        extra = row.get("input") or ""
        prompt = row["instruction"] + "\n" + (extra + "\n" if extra.strip() else "")  # Superfiltering's plain form
        q = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(row["output"], add_special_tokens=False)["input_ids"]
        if len(q) + len(a) > 512 or len(a) < 2:
            out.append(None)
            continue
        with torch.inference_mode():
            ids = torch.tensor([q + a])
            cond = model(input_ids=ids, labels=torch.tensor([[-100] * len(q) + a])).loss.item()
            alone = model(input_ids=torch.tensor([a]), labels=torch.tensor([a])).loss.item()
        out.append(cond / alone)
    return out


def bench_ifd(n: int, tmp: Path) -> list[str]:
    import torch

    from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_causal_lm
    from dataflywheel.registry import stage_class

    torch.set_num_threads(2)
    rows = load_alpaca(n)
    model_dir = str(build_tiny_causal_lm(tmp / "lm", hidden=128, layers=4, max_positions=512))
    model, tok = load_causal_lm(model_dir)
    stage = stage_class("ifd")(model=model_dir, template="plain", max_ifd=None, drop_truncated=False,
                               forward_batch_size=8, device="cpu")
    stage.setup()
    stage.score(rows[:4])  # warm-up: first-call costs outside both timings
    reference_ifd(model, tok, rows[:4])
    ref_s = ours_s = float("inf")
    for _ in range(REPEATS):  # interleaved, best of each: a load spike hits one run, not the ratio
        start = time.perf_counter()
        ref = reference_ifd(model, tok, rows)
        ref_s = min(ref_s, time.perf_counter() - start)
        start = time.perf_counter()
        ours = [r["scores"].get("ifd") for r in stage.score(rows)]
        ours_s = min(ours_s, time.perf_counter() - start)
    pairs = [(o, r) for o, r in zip(ours, ref) if r is not None]
    diff = max(abs(o - r) for o, r in pairs)
    speedup = ref_s / ours_s
    print(f"IFD, {len(rows)} alpaca_subset rows, tiny Llama (hidden 128, 4 layers), CPU:")
    print(f"  reference (one sample at a time): {len(rows) / ref_s:7.1f} rows/s")
    print(f"  ifd stage (forward batch 8):      {len(rows) / ours_s:7.1f} rows/s   ({speedup:.2f}x)")
    print(f"  max |IFD ours - reference| over {len(pairs)} rows: {diff:.2e}")
    # On a CPU a tiny model's matmuls over ~200-token sequences already fill both cores, so batching
    # buys nothing dependable (0.83-1.32x across runs on 2 cores) and padding eats part of it. The
    # claim is about overhead: the stage (batching, rendering, bookkeeping) stays within 20% of the
    # bare loop, as the Beam wrapper's own target. Batching pays on a GPU.
    return [f"BENCH ifd_matches_reference max_abs_diff={diff:.2e} (target <= 1e-5) {'PASS' if diff <= 1e-5 else 'FAIL'}",
            f"BENCH ifd_stage_vs_reference_loop {speedup:.2f}x (target >= 0.8) {'PASS' if speedup >= 0.8 else 'FAIL'}"]


def load_hh(n: int) -> list[dict]:
    """Conversations from HH-RLHF's helpful-online test split: the chosen transcripts, multi-turn."""
    import gzip

    from dataflywheel.records import parse_hh_transcript, validate

    rows = []
    with gzip.open(DATA / "hh_rlhf" / "helpful-online_test.jsonl.gz", "rt") as f:
        for i, line in enumerate(f):
            try:
                row = validate("conversation", {"id": f"hh{i}", "messages": parse_hh_transcript(json.loads(line)["chosen"], "chosen")})
            except Exception:  # noqa: BLE001 - a transcript that is not a clean user/assistant alternation
                continue
            rows.append(row)
            if len(rows) == n:
                break
    return rows


def bench_ifd_multi_turn(n: int, tmp: Path) -> list[str]:
    """Every assistant turn scored with its context: the stage vs the reference loop, turn by turn."""
    import torch

    from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_causal_lm
    from dataflywheel.registry import stage_class
    from dataflywheel.selectors.ifd import render_turns

    rows = load_hh(n)
    model_dir = str(build_tiny_causal_lm(tmp / "lm-hh", hidden=128, layers=4, max_positions=1024))
    model, tok = load_causal_lm(model_dir)
    stage = stage_class("ifd")(model=model_dir, template="plain", max_ifd=None, drop_truncated=False,
                               max_length=1024, forward_batch_size=8, device="cpu")
    stage.setup()
    stage.score(rows[:2])
    turns = sum(len(render_turns(r, "plain")) for r in rows)
    start = time.perf_counter()
    ref = []
    for row in rows:  # pooled IFD: summed NLLs over every turn, as the stage's default
        cond = alone = nc = na = 0.0
        for prompt, answer in render_turns(row, "plain"):
            q = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                lc = model(input_ids=torch.tensor([q + a]), labels=torch.tensor([[-100] * len(q) + a])).loss.item()
                la = model(input_ids=torch.tensor([a]), labels=torch.tensor([a])).loss.item() if len(a) > 1 else 0.0
            cond, nc = cond + lc * len(a), nc + len(a)
            alone, na = alone + la * (len(a) - 1), na + len(a) - 1
        ref.append((cond / nc) / (alone / na) if nc and na else None)
    ref_s = time.perf_counter() - start
    start = time.perf_counter()
    scored = stage.score(rows)
    ours_s = time.perf_counter() - start
    fits = [i for i, r in enumerate(scored) if not r["scores"].get("ifd_truncated") and ref[i] is not None]
    diff = max(abs(scored[i]["scores"]["ifd"] - ref[i]) for i in fits)
    print(f"IFD, {len(rows)} HH-RLHF conversations ({turns} assistant turns), tiny Llama, max_length 1024:")
    print(f"  reference (turn by turn):  {turns / ref_s:7.1f} turns/s")
    print(f"  ifd stage (pooled):        {turns / ours_s:7.1f} turns/s   ({ref_s / ours_s:.2f}x)")
    print(f"  max |IFD ours - reference| over {len(fits)} untruncated rows: {diff:.2e}")
    ok = diff <= 1e-5
    return [f"BENCH ifd_multi_turn_matches_reference max_abs_diff={diff:.2e} (target <= 1e-5) {'PASS' if ok else 'FAIL'}"]


def bench_embed(n: int, tmp: Path) -> list[str]:
    from dataflywheel.models.embedder import load_embedder
    from dataflywheel.models.score_cache import ScoreCache
    from dataflywheel.selectors.embed import row_vectors
    from dataflywheel.selectors.turns import conversation_text

    rows = load_alpaca(n)
    model = load_embedder(None)
    texts = [conversation_text(r) for r in rows]
    model.encode(texts[:8], batch_size=64)  # warm-up
    direct_s = ours_s = float("inf")
    for r in range(REPEATS):  # interleaved, best of each; a fresh cache each time, so ours embeds every text
        start = time.perf_counter()
        direct = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        direct_s = min(direct_s, time.perf_counter() - start)
        cache = ScoreCache(tmp / f"emb{r}.sqlite")
        start = time.perf_counter()
        ours = row_vectors(rows, "conversation", None, cache=cache, batch_size=64)
        ours_s = min(ours_s, time.perf_counter() - start)
    start = time.perf_counter()
    again = row_vectors(rows, "conversation", None, cache=cache, batch_size=64)
    cached_s = time.perf_counter() - start
    diff = float(np.abs(ours - direct).max())
    ratio = direct_s / ours_s
    print(f"Embeddings, {n} alpaca_subset conversations, MiniLM (384-d), CPU:")
    print(f"  SentenceTransformer.encode: {n / direct_s:8.1f} texts/s")
    print(f"  row_vectors (+ cache write): {n / ours_s:8.1f} texts/s   ({ratio:.2f}x)")
    print(f"  row_vectors, cached re-run: {n / cached_s:8.1f} texts/s   (max |diff| {diff:.1e}, "
          f"identical re-run: {bool(np.array_equal(ours, again))})")
    ok = ratio >= 0.9 and diff < 1e-5 and np.array_equal(ours, again)
    return [f"BENCH embed_throughput ours/direct={ratio:.2f} (target >= 0.9, same vectors) {'PASS' if ok else 'FAIL'}"]


def synthetic_vectors(n: int, dim: int = 384, centers: int | None = None, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``centers`` random directions: like an instruction pool, full of near-paraphrases."""
    rng = np.random.default_rng(seed)
    centers = centers or n // 5  # ~5 rows around each topic: the budget (n / 10) can be met
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    v = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim) * 10
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def deita_reference_loop(vectors: np.ndarray, order: np.ndarray, budget: int, threshold: float) -> list[int]:
    """Deita's filter as its code runs it (batch size 1): each candidate against the whole selected set."""
    selected = np.empty((budget, vectors.shape[1]), dtype=np.float32)
    picks: list[int] = []
    for i in order:
        if picks and float((selected[: len(picks)] @ vectors[i]).max()) > threshold:
            continue
        selected[len(picks)] = vectors[i]
        picks.append(int(i))
        if len(picks) == budget:
            break
    return picks


def bench_selection(n: int) -> list[str]:
    from dataflywheel.selectors.diversity import facility_location, k_center_greedy, kmeans_sample, repr_filter

    vectors = synthetic_vectors(n)
    order = np.argsort(-np.random.default_rng(1).random(n), kind="stable")  # a score ranking
    budget = n // 10
    print(f"Selection over {n:,} synthetic rows (384-d), budget {budget:,}:")
    start = time.perf_counter()
    ref = deita_reference_loop(vectors, order, budget, 0.9)
    ref_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = repr_filter(vectors, order, budget=budget, threshold=0.9)
    ours_s = time.perf_counter() - start
    same = list(ours) == ref
    print(f"  repr filter, Deita's loop:      {ref_s:7.2f} s ({len(ref):,} selected)")
    print(f"  repr filter, ours chunked:      {ours_s:7.2f} s ({len(ours):,} selected, identical: {same})")
    timings = {}
    for name, fn in (("k-center greedy", lambda: k_center_greedy(vectors, budget)),
                     ("k-means sampling (100 clusters)", lambda: kmeans_sample(vectors, budget, n_clusters=100)),
                     # Superfiltering.D's shape: facility location on a quality-filtered slice (n^2 in the slice)
                     (f"facility location ({n // 10:,} -> {n // 100:,})",
                      lambda: facility_location(vectors[order[: n // 10]], n // 100))):
        start = time.perf_counter()
        picked = fn()
        timings[name] = time.perf_counter() - start
        print(f"  {name:<36}{timings[name]:7.2f} s ({len(picked):,} selected)")
    print(f"  peak RSS {peak_rss_gb():.2f} GB")
    speedup = ref_s / ours_s
    return [f"BENCH repr_filter_identical_to_deita {same} {'PASS' if same else 'FAIL'}",
            f"BENCH repr_filter_speedup {speedup:.1f}x vs Deita's loop (target >= 2) {'PASS' if speedup >= 2 else 'FAIL'}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="160 IFD rows, 256 texts, 20k selection rows")
    args = ap.parse_args()
    if not (DATA / "alpaca_subset").is_dir():
        print(f"SKIP selection: {DATA / 'alpaca_subset'} not found")
        return 0
    ifd_rows, texts, pool = (160, 256, 20_000) if args.quick else (400, 2000, 100_000)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        lines += bench_ifd(ifd_rows, Path(tmp))
        lines += bench_ifd_multi_turn(ifd_rows // 2, Path(tmp))
        lines += bench_embed(texts, Path(tmp))
    lines += bench_selection(pool)
    print("\n".join(lines))
    return 0 if all(line.endswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
