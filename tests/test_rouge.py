"""ROUGE-L equals rouge-score bit for bit; the bit-parallel LCS equals the DP; the novelty index's
prefilter finds the pairs above the threshold that a brute-force scan finds."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from dataflywheel.synth import rouge
from dataflywheel.synth.novelty import THRESHOLD, NoveltyIndex, bag_shingles, length_bound

# Project-written texts that exercise the tokenizer: case, punctuation, digits, non-ASCII letters
# (dropped by rouge-score's [a-z0-9] tokens), Unicode whose lower() is ASCII (the Kelvin sign),
# repeated words, empty and token-less strings.
EDGE_TEXTS = [
    "", "   ", "!!! ???", "Über naïve café", "Ünïcödé ONLY", "\u212a is a Kelvin sign", "İstanbul in 2024",
    "the the the the cat", "cat the the", "A-B-C d_e f.g", "x1y2 z3", "Tabs\tand\nnewlines  here",
    "Write a function that sorts a list.", "write A FUNCTION that sorts the list!", "sorts a list",
    "Give me three tips for writing clear emails.", "Give three tips for clear emails, please.",
]


def dp_lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_bit_parallel_lcs_equals_dp_on_random_sequences():
    rng = random.Random(7)
    for _ in range(400):
        vocab = [f"w{i}" for i in range(rng.randint(1, 12))]  # small vocabularies: many repeats
        a = [rng.choice(vocab) for _ in range(rng.randint(0, 150))]  # > 64 tokens: multi-word ints
        b = [rng.choice(vocab) for _ in range(rng.randint(0, 150))]
        assert rouge.lcs_length(a, b) == dp_lcs(a, b)
        if a:
            assert rouge.LcsQuery(a).lcs(b) == dp_lcs(a, b)


def test_tokenize_equals_rouge_score():
    tokenize = pytest.importorskip("rouge_score.tokenize")
    for text in EDGE_TEXTS:
        assert rouge.tokenize(text) == tokenize.tokenize(text, None), text


def _check_equal(texts: list[str]) -> int:
    scorer = pytest.importorskip("rouge_score.rouge_scorer").RougeScorer(["rougeL"], use_stemmer=False)
    pairs = 0
    for a in texts:
        for b in texts:
            expected = scorer.score(a, b)["rougeL"].fmeasure
            assert rouge.rouge_l(a, b) == expected, (a, b)  # ==, not approx: same float operations
            pairs += 1
    return pairs


def test_rouge_l_equals_rouge_score_on_edge_texts():
    assert _check_equal(EDGE_TEXTS) == len(EDGE_TEXTS) ** 2


def test_rouge_l_equals_rouge_score_on_all_seed_pairs(shared_data):
    seeds = [json.loads(line)["instruction"] for line in open(shared_data / "self_instruct_seed/seed_tasks.jsonl")]
    assert len(seeds) == 175
    # every seed task against every other (30,625 pairs), scores spread over [0, 1]
    assert _check_equal(seeds) == 175 * 175
    scores = [rouge.rouge_l(a, b) for a in seeds[:40] for b in seeds if a != b]
    assert 0 < max(scores) < 1 and min(scores) == 0


def test_multiset_jaccard_bound_behind_the_prefilter():
    """F > 0.7 implies multiset Jaccard > 0.538: the bound the LSH parameters rest on."""
    rng = random.Random(3)
    for _ in range(2000):
        vocab = [f"w{i}" for i in range(rng.randint(2, 10))]
        a = [rng.choice(vocab) for _ in range(rng.randint(1, 20))]
        b = [rng.choice(vocab) for _ in range(rng.randint(1, 20))]
        lcs = dp_lcs(a, b)
        sa, sb = set(bag_shingles(a)), set(bag_shingles(b))
        jaccard = len(sa & sb) / len(sa | sb)
        ca, cb = Counter(a), Counter(b)
        assert jaccard == sum((ca & cb).values()) / sum((ca | cb).values())
        assert jaccard >= lcs / (len(a) + len(b) - lcs) - 1e-12
        assert rouge.fmeasure(lcs, len(a), len(b)) <= length_bound(len(a), len(b)) + 1e-12


def _variants(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """Word-edited copies (drop, substitute, insert) at rates that land on both sides of 0.7."""
    rng = random.Random(seed)
    vocab = [w for t in texts for w in t.split()]
    out = []
    for _ in range(n):
        rate = rng.uniform(0.02, 0.5)
        words = []
        for w in rng.choice(texts).split():
            r = rng.random()
            if r < rate / 3:
                continue
            words += [rng.choice(vocab)] if r < 2 * rate / 3 else [w, rng.choice(vocab)] if r < rate else [w]
        out.append(" ".join(words))
    return out


def test_prefilter_finds_what_brute_force_finds(shared_data):
    seeds = [json.loads(line)["instruction"] for line in open(shared_data / "self_instruct_seed/seed_tasks.jsonl")]
    alpaca = [json.loads(line)["instruction"] for line in open(shared_data / "alpaca_subset/alpaca_cherry5pct_shared.jsonl")]
    pool = seeds + alpaca + ["Name four colors.", "Name four colours.", "List two fruits."]  # short texts too
    fast, slow = NoveltyIndex(), NoveltyIndex(prefilter=False)
    for text in pool:
        fast.add(text)
        slow.add(text)
    queries = _variants(pool, 150) + ["Name four colors please.", "Name colors."]
    above = found = scored = 0
    for q in queries:
        truth = slow.query(q)
        got = fast.query(q, stats=False)
        scored += got.scored
        if truth.max > THRESHOLD:
            above += 1
            found += got.max == truth.max
    assert scored < 0.1 * len(queries) * len(pool)  # the point of the prefilter: few exact scores
    assert above >= 40  # the variants do produce near copies
    assert found / above >= 0.99  # measured 1.0 here and on 20k in the benchmark


def test_exact_stats_equal_the_reference_computation():
    """prefilter=False: max, 10 nearest and mean as bootstrap_instructions.py computes them."""
    pool = EDGE_TEXTS[6:]
    index = NoveltyIndex(prefilter=False)
    for text in pool:
        index.add(text)
    query = "Write a short function that sorts a list of numbers."
    scores = [rouge.rouge_l(query, t) for t in pool]
    got = index.query(query)
    assert got.max == max(scores)
    assert got.mean == pytest.approx(sum(scores) / len(scores), abs=1e-15)
    assert [s for _, s in got.nearest] == sorted(scores, reverse=True)[:10]
    assert index.most_similar(got)[pool[scores.index(max(scores))]] == max(scores)


def test_short_texts_are_compared_exactly():
    index = NoveltyIndex()
    index.add("Name four colors.")  # 3 tokens: no LSH keys
    assert index.query("Name four colors now.", stats=False).max > THRESHOLD  # 4 vs 3 tokens
    index.add("Give three tips for better sleep")  # 6 tokens, in the LSH
    assert index.query("Give three tips for sleep", stats=False).max > THRESHOLD  # 5 tokens
    index.add("Tips for sleep")
    assert index.query("Give tips for sleep", stats=False).max > THRESHOLD  # 4 vs 3 tokens, short path
    assert index.query("Completely unrelated words appear here", stats=False).max < THRESHOLD
    assert index.query("¿¡!", stats=False).max == 0.0  # no tokens: 0 against everything


def test_float_edge_of_the_threshold_is_kept():
    """7 of 13 tokens: F is 0.7 in exact arithmetic but 0.7000000000000001 in rouge-score's floats,
    so the reference rejects it; the length bound must not rule the pair out first."""
    long = "calculate quickly the exact total and then explain what it really means today"
    short = "calculate the total and what it means"
    assert rouge.rouge_l(short, long) > THRESHOLD and length_bound(7, 13) > THRESHOLD
    for prefilter in (True, False):
        index = NoveltyIndex(prefilter=prefilter)
        index.add(long)
        assert index.query(short, stats=False).max > THRESHOLD

