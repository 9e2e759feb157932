"""MinHash signatures, docs/s: ours (numpy, vectorized over shingles) vs datasketch 2.0 on the same shingles.

Data as in docs/sources.md#minhash-near-dedup (signature speed): 2,000 docs of 500 words over a 30k
vocabulary, word 5-gram shingles; docs 1000-1999 are near-duplicates of docs 0-999.  Shingling is
timed once and left out of every signature figure.  Variants: ours (xxh32, per-document [n, 128]
product), ours with ``minimum.reduceat`` over concatenated documents, ours with datasketch's sha1
hash; datasketch ``update`` per shingle, ``update_batch`` (default sha1 and xxh32), and
``MinHash.bulk``. Signatures are compared array for array with datasketch's for the same hash
function. Dedup quality on the shared neardup benchmark (pair F1 vs the exact ground truth,
datasketch MinHashLSH beside it) is benchmarks/dedup_quality.py.

Ends with ``BENCH minhash_signatures ours=<docs/s> peer=<update_batch docs/s> ratio=... target>=5``;
the peer is datasketch ``update_batch`` as shipped (sha1); the same-hash ratio is printed above it.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
from datasketch import MinHash
from datasketch.hashfunc import sha1_hash32
from xxhash import xxh32_intdigest

from dataflywheel.filters.dedup import lsh
from dataflywheel.filters.dedup import minhash as mh

TARGET = 5.0  # the claim (docs/benchmarks.md#minhash-and-near-dedup-quality): >= 5x datasketch update_batch


def make_docs(n: int, words: int = 500, vocab: int = 30_000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    voc = [f"w{i}" for i in range(vocab)]
    half = [[rng.choice(voc) for _ in range(words)] for _ in range(n // 2)]
    # 2% of words substituted: word 5-gram Jaccard ~0.82, as the J ~ 0.824 of docs/sources.md#minhash-near-dedup
    dups = [[w if rng.random() > 0.02 else rng.choice(voc) for w in d] for d in half]
    return [" ".join(d) for d in half + dups]


def timed(fn, n_docs: int, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return n_docs / best, out


def ds_update(shs, hashfunc=sha1_hash32):
    out = []
    for doc in shs:
        m = MinHash(hashfunc=hashfunc)
        for s in doc:
            m.update(s)
        out.append(m.hashvalues)
    return np.array(out)


def ds_update_batch(shs, hashfunc=sha1_hash32):
    out = []
    for doc in shs:
        m = MinHash(hashfunc=hashfunc)
        m.update_batch(doc)
        out.append(m.hashvalues)
    return np.array(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer docs for the slow peers, one repeat")
    ap.add_argument("--docs", type=int, default=2000)
    args = ap.parse_args()
    repeats = 1 if args.quick else 3
    slow = 200 if args.quick else 500  # docs for datasketch's per-shingle update (~250 docs/s)
    docs = make_docs(args.docs)
    start = time.perf_counter()
    shs = [mh.shingles(d) for d in docs]
    shingle_rate = len(docs) / (time.perf_counter() - start)
    n = len(docs)
    print(f"{n} docs x 500 words, {sum(map(len, shs)) / n:.0f} shingles/doc, 128 perms; "
          f"shingling {shingle_rate:,.0f} docs/s (not in the figures below)")

    results = {}
    results["ours (xxh32, [n,128] per doc)"], ours = timed(
        lambda: mh.signatures([mh.shingle_hashes(s) for s in shs]), n, repeats)
    results["ours, minimum.reduceat over 64 docs"], ours_r = timed(
        lambda: mh.signatures_reduceat([mh.shingle_hashes(s) for s in shs]), n, repeats)
    results["ours with sha1_hash32"], ours_sha = timed(
        lambda: mh.signatures([mh.shingle_hashes(s, sha1_hash32) for s in shs]), n, repeats)
    results["datasketch update per shingle (sha1)"], ds_naive = timed(lambda: ds_update(shs[:slow]), slow, 1)
    results["datasketch update_batch (sha1)"], ds_batch = timed(lambda: ds_update_batch(shs), n, repeats)
    results["datasketch update_batch (xxh32)"], ds_batch_xx = timed(
        lambda: ds_update_batch(shs, xxh32_intdigest), n, repeats)
    results["datasketch MinHash.bulk (sha1)"], ds_bulk = timed(
        lambda: np.array([m.hashvalues for m in MinHash.bulk(shs)]), n, repeats)

    same = {
        "ours == update_batch(xxh32)": np.array_equal(ours, ds_batch_xx),
        "ours reduceat == ours": np.array_equal(ours_r, ours),
        "ours sha1 == update_batch(sha1) == bulk": np.array_equal(ours_sha, ds_batch) and np.array_equal(ds_bulk, ds_batch),
        "update per shingle == update_batch": np.array_equal(ds_naive, ds_batch[:slow]),
    }
    half = n // 2

    def mean_est(sigs):
        return float(np.mean((sigs[:half] == sigs[half:]).mean(axis=1)))

    sets = [mh.unique_hashes(mh.shingle_hashes(s)) for s in shs]
    true_j = float(np.mean([lsh.exact_jaccard(sets[i], sets[i + half]) for i in range(half)]))
    peer = results["datasketch update_batch (sha1)"]
    print(f"\n{'variant':<42} {'docs/s':>9} {'vs update_batch(sha1)':>22}")
    for name, rate in results.items():
        print(f"{name:<42} {rate:>9,.0f} {rate / peer:>21.2f}x")
    print(f"\nsignatures identical: {same}")
    print(f"mean J of the {half} near-duplicate pairs: exact {true_j:.4f}, ours {mean_est(ours):.4f}, "
          f"datasketch xxh32 {mean_est(ds_batch_xx):.4f}, datasketch sha1 {mean_est(ds_batch):.4f}")
    same_hash = results["ours (xxh32, [n,128] per doc)"] / results["datasketch update_batch (xxh32)"]
    print(f"same-hash ratio, ours vs update_batch(xxh32): {same_hash:.2f}x")
    print("\n" + lsh.s_curve_table(*lsh.optimal_params(0.8)))
    ours_rate = results["ours (xxh32, [n,128] per doc)"]
    ratio = ours_rate / peer
    ok = ratio >= TARGET and all(same.values())
    print(f"BENCH minhash_signatures ours={ours_rate:.0f} peer={peer:.0f} ratio={ratio:.2f} "
          f"target>={TARGET:g} {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
