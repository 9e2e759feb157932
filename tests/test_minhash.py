"""MinHash signatures (bit-identical to datasketch 2.0), LSH banding, verification."""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
import unicodedata

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from xxhash import xxh32_intdigest

from dataflywheel.filters.dedup import lsh
from dataflywheel.filters.dedup import minhash as mh

WORDS = [f"w{i}" for i in range(3000)]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _datasketch(shs, num_perm=128, seed=1, hashfunc=xxh32_intdigest) -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=hashfunc, scheme="affine32")
    m.update_batch(shs)
    return m.hashvalues


@pytest.mark.parametrize("num_perm,seed", [(128, 1), (64, 42), (256, 7)])
def test_signatures_bit_identical_to_datasketch(num_perm, seed):
    rng = random.Random(seed)
    texts = [_text(rng, n) for n in (1, 3, 5, 6, 40, 500)] + ["Hello, World! Don't stop."]
    shs = [mh.shingles(t) for t in texts]
    ours = mh.signatures([mh.shingle_hashes(s) for s in shs], num_perm, seed)
    assert ours.dtype == np.uint32 and ours.shape == (len(texts), num_perm)
    for row, s in zip(ours, shs):
        np.testing.assert_array_equal(row, _datasketch(s, num_perm, seed))


def test_default_sha1_hash_and_one_by_one_updates_agree():
    shs = mh.shingles(_text(random.Random(3), 80))
    m = MinHash()  # datasketch defaults: 128 perms, seed 1, sha1_hash32, affine32
    for s in shs:
        m.update(s)
    from datasketch.hashfunc import sha1_hash32

    np.testing.assert_array_equal(mh.signature(mh.shingle_hashes(shs, sha1_hash32)), m.hashvalues)


def test_empty_long_and_reduceat_paths():
    rng = random.Random(5)
    long_doc = mh.shingles(_text(rng, 9000))  # more shingles than one product slice
    lists = [mh.shingle_hashes(s) for s in ([], long_doc, mh.shingles(_text(rng, 30)), [])]
    sigs = mh.signatures(lists)
    np.testing.assert_array_equal(sigs[0], MinHash().hashvalues)  # empty = datasketch's empty sketch
    np.testing.assert_array_equal(sigs[1], _datasketch(long_doc))
    np.testing.assert_array_equal(mh.signatures_reduceat(lists, chunk=3), sigs)


def test_estimate_error_within_theory_bound():
    rng = random.Random(11)
    k = 256
    errors = []
    for _ in range(20):
        base = [rng.choice(WORDS) for _ in range(400)]
        other = [w if rng.random() > 0.03 else rng.choice(WORDS) for w in base]
        sa, sb = (mh.unique_hashes(mh.shingle_hashes(mh.shingles(" ".join(x)))) for x in (base, other))
        true = lsh.exact_jaccard(sa, sb)
        est = mh.estimate_jaccard(*mh.signatures([sa, sb], k))
        sd = (true * (1 - true) / k) ** 0.5  # sd of the MinHash estimate (docs/sources.md#minhash-near-dedup)
        assert abs(est - true) <= 4 * sd
        errors.append((est - true) / sd)
    assert abs(np.mean(errors)) < 1.0  # unbiased: the mean z over 20 pairs is ~N(0, 1/20)


def test_tokens_normalization():
    text = "Don't  STOP\u2014the \ufb01ne soft\u00adhyphen caf\u00e9_bar 1,000 na\u0131\u0308ve \uff11\uff12"
    assert mh.tokens(text) == ["don", "t", "stop", "the", "fine", "softhyphen", "café", "bar", "1", "000",
                               "naı̈ve", "12"]
    assert mh.shingles("a b c") == [b"a b c"]
    assert mh.shingles("a b c d e f") == [b"a b c d e", b"b c d e f"]
    assert mh.shingles(" ,. ") == []
    assert mh.shingles("Ab, cd!", char_ngram=3) == [b"ab ", b"b c", b" cd"]


def test_character_classes_match_a_full_unicode_scan():
    cf, sep = mh._char_classes()
    word = re.compile(r"\w")
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        cat = unicodedata.category(c)
        assert bool(cf.fullmatch(c)) == (cat == "Cf"), hex(cp)
        if cat != "Cf":
            assert bool(sep.fullmatch(c)) == (cat[0] not in "LNM"), hex(cp)
        if c != "_":
            assert bool(word.match(c)) == (cat[0] in "LN"), hex(cp)


@pytest.mark.parametrize("bands,rows,s,p", [(9, 13, 0.8, 0.399), (14, 8, 0.8, 0.924), (20, 13, 0.8, 0.677),
                                            (32, 8, 0.6, 0.418), (9, 13, 0.9, 0.929), (14, 8, 0.5, 0.053)])
def test_s_curve_matches_the_published_table(bands, rows, s, p):
    assert round(lsh.candidate_probability(s, bands, rows), 3) == p  # the published S-curve table (docs/sources.md#minhash-near-dedup)
    assert dict(lsh.s_curve(bands, rows))[s] == pytest.approx(p, abs=5e-4)
    assert f"{s:.2f}   {p:.3f}" in lsh.s_curve_table(bands, rows)


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.6, 128), (0.7, 256), (0.9, 64)])
def test_optimal_params_are_datasketchs(threshold, num_perm):
    ref = MinHashLSH(threshold=threshold, num_perm=num_perm)
    assert lsh.optimal_params(threshold, num_perm) == (ref.b, ref.r)
    assert lsh.optimal_params(0.8, 128) == (9, 13)


def test_band_keys_give_datasketch_lsh_candidates():
    rng = random.Random(2)
    base = [_text(rng, 60) for _ in range(30)]
    texts = base + [t.rsplit(" ", rng.randint(1, 6))[0] for t in base[:15]] + [""]
    shs = [mh.shingles(t) for t in texts]
    sigs = mh.signatures([mh.shingle_hashes(s) for s in shs])
    bands, rows = lsh.optimal_params(0.5, 128)
    keys = lsh.band_keys(sigs, bands, rows)
    assert keys[-1] == [] and all(len(k) == bands for k in keys[:-1])
    assert keys[0][1].startswith("1:") and len(keys[0][1]) == 2 + 8 * rows
    ours = {i: {j for j in range(len(keys) - 1) if j != i and set(keys[i]) & set(keys[j])} for i in range(len(keys) - 1)}
    index = MinHashLSH(num_perm=128, params=(bands, rows))
    hashes = []
    for i, s in enumerate(shs[:-1]):
        m = MinHash(hashfunc=xxh32_intdigest)
        m.update_batch(s)
        index.insert(i, m)
        hashes.append(m)
    assert ours == {i: set(index.query(m)) - {i} for i, m in enumerate(hashes)}
    assert sum(map(len, ours.values())) >= 30  # the truncated copies did collide


def test_verification_removes_false_positives():
    rng = random.Random(8)
    base = [rng.choice(WORDS) for _ in range(120)]
    near = base[:-4] + ["x1", "x2", "x3", "x4"]  # J ~ 0.9
    half = base[:70] + [rng.choice(WORDS) for _ in range(50)]  # J ~ 0.4
    rows = [{"id": "a", "text": " ".join(base)}, {"id": "b", "text": " ".join(near)},
            {"id": "c", "text": " ".join(half)}, {"id": "d", "text": _text(rng, 120)}]
    loose = lsh.near_duplicate_pairs(rows, 0.8, lsh_threshold=0.2, verify=False)
    assert {(a, b) for a, b, _ in loose} >= {("a", "b"), ("a", "c"), ("b", "c")}
    kept = lsh.near_duplicate_pairs(rows, 0.8, lsh_threshold=0.2)
    assert [(a, b) for a, b, _ in kept] == [("a", "b")]
    assert kept[0][2] == pytest.approx(112 / 120)  # exact: 112 shared 5-grams, 116 each, 120 in all
    # past the exact-size cut-off the MinHash estimate decides, close to the same value
    est = lsh.near_duplicate_pairs(rows, 0.8, lsh_threshold=0.2, max_exact=10)
    assert [(a, b) for a, b, _ in est] == [("a", "b")] and abs(est[0][2] - 112 / 120) < 0.1


def test_near_duplicate_pairs_on_neardup_benchmark(shared_data):
    folder = shared_data / "neardup"
    with gzip.open(folder / "corpus.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    with gzip.open(folder / "pairs.jsonl.gz", "rt") as f:
        truth = {(p["a"], p["b"]) for p in map(json.loads, f) if p["inter"] * 5 >= 4 * p["union"]}
    found = {(a, b) for a, b, _ in lsh.near_duplicate_pairs(rows, 0.8)}
    assert len(truth) == 3851  # data/neardup/README.md
    assert found <= truth  # verified exactly: no false positive
    assert len(found) >= 0.99 * len(truth)
