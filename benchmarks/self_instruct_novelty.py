"""Self-Instruct novelty filter: ROUGE-L pairs/s with and without the MinHash/LSH prefilter, on 20k instructions.

Data (../shared/data): the Alpaca subset's instructions and the first sentence of each output, the
175 Self-Instruct seeds, the 252 user-oriented instructions and lingua's English sentences
(~5.8k texts), topped up to 20,000 with word-edited copies (drop / substitute / insert at a rate
drawn from 2-50%), so that pairs land on both sides of the 0.7 threshold.

Measured, in one run: queries drawn from the 20k, each scored against the whole pool
- brute force (``NoveltyIndex(prefilter=False)``: our bit-parallel LCS on every pair),
- with the prefilter (tokenize + MinHash + LSH lookup + exact ROUGE-L of the candidates only;
  pairs/s counts pairs *decided*, i.e. queries x pool / time),
- the peer: ``rouge_score.RougeScorer(["rougeL"]).score`` per pair (what bootstrap_instructions.py
  calls), on fewer queries; its scores must equal ours exactly;
- the prefilter's recall: of all pairs with ROUGE-L > 0.7 found by brute force, the share that were
  candidates;
- the bootstrap loop itself (accept if max <= 0.7, then add) over a stream of the texts, with and
  without the prefilter: the accepted sets must be identical.

BENCH lines: self_instruct_rouge_pairs (ours brute force vs rouge-score, target >= 10x),
self_instruct_prefilter_pairs (prefilter vs brute force, target >= 5x), self_instruct_prefilter_recall
(target >= 0.99), self_instruct_rouge_equal and self_instruct_stream_same_decisions (identity).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

from dataflywheel.filters.dedup import lsh
from dataflywheel.synth.novelty import BANDS, NUM_PERM, ROWS, THRESHOLD, NoveltyIndex

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
N_TEXTS = 20_000


def load_texts(n: int = N_TEXTS, seed: int = 0) -> tuple[list[str], list[int]]:
    """The originals, then word-edited copies up to n; returns (texts, index of each text's original)."""
    alpaca = [json.loads(line) for line in open(DATA / "alpaca_subset/alpaca_cherry5pct_shared.jsonl")]
    texts = [a["instruction"] for a in alpaca]
    texts += [json.loads(line)["instruction"] for line in open(DATA / "self_instruct_seed/seed_tasks.jsonl")]
    texts += [json.loads(line)["instruction"]
              for line in open(DATA / "self_instruct_seed/user_oriented_instructions.jsonl")]
    texts += [s for s in (DATA / "lingua_testdata/sentences/en.txt").read_text().splitlines() if s.strip()]
    firsts = (re.split(r"(?<=[.!?])\s+", a["output"].strip())[0] for a in alpaca)
    texts += [s for s in firsts if 4 < len(s.split()) < 60]
    originals = len(texts)
    sources = list(range(originals))
    rng = random.Random(seed)
    vocab = [w for t in texts for w in t.split()]
    while len(texts) < n:
        rate = rng.uniform(0.02, 0.5)
        words: list[str] = []
        src = rng.randrange(originals)
        sources.append(src)
        for w in texts[src].split():
            r = rng.random()
            if r < rate / 3:
                continue
            words += [rng.choice(vocab)] if r < 2 * rate / 3 else [w, rng.choice(vocab)] if r < rate else [w]
        texts.append(" ".join(words))
    return texts[:n], sources[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer queries (well under a minute)")
    ap.add_argument("--num-perm", type=int, default=NUM_PERM)
    ap.add_argument("--bands", type=int, default=BANDS)
    ap.add_argument("--rows", type=int, default=ROWS)
    args = ap.parse_args()
    lsh_args = {"num_perm": args.num_perm, "bands": args.bands, "rows": args.rows}
    if not DATA.is_dir():
        print(f"SKIP self_instruct_novelty: {DATA} not found")
        return 0
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        print("SKIP self_instruct_novelty: rouge-score is not installed (the dev extra)")
        return 0
    queries_n, peer_n, stream_n = (100, 2, 1500) if args.quick else (1000, 10, 5000)
    texts, sources = load_texts()
    originals = sum(i == s for i, s in enumerate(sources))
    print(f"{len(texts)} texts ({originals} originals + word-edited copies); threshold {THRESHOLD}")
    print(lsh.s_curve_table(args.bands, args.rows, (0.3, 0.4, 0.5, 0.538, 0.6, 0.7, 0.8)))

    start = time.perf_counter()
    fast = NoveltyIndex(**lsh_args)
    for t in texts:
        fast.add(t)
    build_fast = time.perf_counter() - start
    start = time.perf_counter()
    slow = NoveltyIndex(prefilter=False)
    for t in texts:
        slow.add(t)
    build_slow = time.perf_counter() - start
    print(f"index build (tokenize + signature + LSH keys): {len(texts) / build_fast:,.0f} texts/s "
          f"with the prefilter, {len(texts) / build_slow:,.0f} texts/s without")

    rng = random.Random(1)
    queries = rng.sample(range(len(texts)), queries_n)
    everything = list(range(len(texts)))
    start = time.perf_counter()
    brute = [slow.scores(texts[q], everything) for q in queries]
    brute_s = time.perf_counter() - start
    start = time.perf_counter()
    found = []
    for q in queries:
        fast._prepared = None  # time the query's own tokenize + signature too
        cand = fast.candidates(texts[q])
        found.append(dict(zip(cand, fast.scores(texts[q], cand))))
    fast_s = time.perf_counter() - start
    pairs = queries_n * len(texts)
    brute_rate, fast_rate = pairs / brute_s, pairs / fast_s
    above = hit = same_score = 0
    for q, scores, cand in zip(queries, brute, found):
        for j, s in enumerate(scores):
            if j != q and s > THRESHOLD:
                above += 1
                hit += j in cand
                same_score += cand.get(j) == s
    recall = hit / above if above else 1.0
    scored = sum(map(len, found)) / pairs

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    start = time.perf_counter()
    peer = [[scorer.score(texts[q], t)["rougeL"].fmeasure for t in texts] for q in queries[:peer_n]]
    peer_s = time.perf_counter() - start
    peer_rate = peer_n * len(texts) / peer_s
    equal = sum(a == b for p, o in zip(peer, brute) for a, b in zip(p, o))
    peer_pairs = peer_n * len(texts)

    # the bootstrap order: originals with their copies mixed in, as a generator repeating itself
    heads = set(range(stream_n // 4))
    stream = [t for t, s in zip(texts, sources) if s in heads][:stream_n]
    random.Random(2).shuffle(stream)
    decisions, times = [], []
    for prefilter in (True, False):
        index, accepted = NoveltyIndex(prefilter=prefilter, **lsh_args), []
        start = time.perf_counter()
        for t in stream:
            if index.query(t, stats=False).max <= THRESHOLD:
                accepted.append(t)
                index.add(t)
        times.append(time.perf_counter() - start)
        decisions.append(accepted)
    same_stream = decisions[0] == decisions[1]

    print(f"\n{queries_n} queries x {len(texts)} pool = {pairs:,} pairs; {above} pairs with ROUGE-L > {THRESHOLD}")
    print(f"{'method':<46} {'pairs/s':>12}")
    print(f"{'rouge-score RougeScorer.score (peer)':<46} {peer_rate:>12,.0f}   ({peer_n} queries)")
    print(f"{'ours, brute force (bit-parallel LCS)':<46} {brute_rate:>12,.0f}")
    print(f"{'ours, MinHash/LSH prefilter + exact ROUGE-L':<46} {fast_rate:>12,.0f}   "
          f"({scored:.2%} of pairs scored exactly)")
    print(f"prefilter recall of pairs > {THRESHOLD}: {hit}/{above} = {recall:.4f} (scores identical: {same_score})")
    print(f"scores equal to rouge-score: {equal}/{peer_pairs}")
    print(f"bootstrap stream of {len(stream)} texts: {len(decisions[0])} accepted with the prefilter "
          f"({times[0]:.2f} s), {len(decisions[1])} without ({times[1]:.2f} s); identical: {same_stream}")

    lines = [
        ("self_instruct_rouge_pairs", brute_rate, peer_rate, 10.0),
        ("self_instruct_prefilter_pairs", fast_rate, brute_rate, 5.0),
    ]
    for name, ours, ref, target in lines:
        ratio = ours / ref
        print(f"BENCH {name} ours={ours:.0f} peer={ref:.0f} ratio={ratio:.1f} target>={target:g} "
              f"{'PASS' if ratio >= target else 'FAIL'}")
    print(f"BENCH self_instruct_prefilter_recall ours={recall:.4f} peer=- ratio=- target>=0.99 "
          f"{'PASS' if recall >= 0.99 and above > 0 else 'FAIL'}")
    print(f"BENCH self_instruct_rouge_equal ours={equal} peer={peer_pairs} ratio={equal / peer_pairs:.4f} "
          f"target>=1 {'PASS' if equal == peer_pairs else 'FAIL'}")
    print(f"BENCH self_instruct_stream_same_decisions ours={len(decisions[0])} peer={len(decisions[1])} "
          f"ratio={times[1] / times[0]:.1f} target=identical {'PASS' if same_stream else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
