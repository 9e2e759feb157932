"""MinHash signatures, vectorized with numpy, bit-identical to datasketch 2.0's ``affine32`` scheme.

Text -> normalized tokens -> shingles (word 5-grams by default, character n-grams as an option)
-> one 32-bit hash per shingle -> ``num_perm`` affine permutations over all shingles at once ->
min over shingles.  ``signatures`` equals ``datasketch.MinHash(num_perm, seed, hashfunc=xxh32,
scheme="affine32")`` fed the same shingles, array for array (tests/test_minhash.py checks it).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import numpy as np
from xxhash import xxh32_intdigest

NGRAM = 5  # word 5-grams: datatrove MinhashConfig, data-juicer window_size, text-dedup (docs/sources.md#minhash-near-dedup)
NUM_PERM = 128  # datasketch MinHash / MinHashLSH default (docs/sources.md#minhash-near-dedup)
SEED = 1  # datasketch MinHash default seed
_SLICE = 4096  # shingles per product block: 2 MB at 128 perms, cache-sized
EMPTY = np.uint32(0xFFFFFFFF)  # datasketch affine32 "no value yet" sentinel: an empty set's signature

# MurmurHash3 fmix32, datasketch 2.0 pre-mixes every input hash with it before the affine maps.
_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


@lru_cache(maxsize=1)
def _char_classes() -> tuple[re.Pattern, re.Pattern]:
    """(Cf characters, separators): built once from unicodedata so they follow Python's Unicode tables.

    Python's ``\\w`` is exactly letters (L*) + numbers (N*) + ``_`` (checked over all code points in
    the tests), so a separator is ``[^\\w<marks>]`` or ``_``.  Marks and Cf only occur in planes
    0, 1 and 14, which keeps the scan short.
    """
    marks, cf = [], []
    for cp in (*range(0x20000), *range(0xE0000, 0xE1000)):
        cat = unicodedata.category(chr(cp))
        if cat[0] == "M":
            marks.append(cp)
        elif cat == "Cf":
            cf.append(cp)
    return re.compile(_class(cf)), re.compile(rf"[^\w{_class(marks)[1:-1]}]+|_+")


def _class(cps: list[int]) -> str:
    """A regex character class of code points, as ranges."""
    parts, start = [], None
    for i, cp in enumerate(cps):
        if start is None:
            start = cp
        if i + 1 == len(cps) or cps[i + 1] != cp + 1:
            parts.append(re.escape(chr(start)) + ("-" + re.escape(chr(cp)) if cp != start else ""))
            start = None
    return "[" + "".join(parts) + "]"


def tokens(text: str) -> list[str]:
    """Normalized word tokens.

    NFKC, ``str.lower()``, Cf characters (soft hyphen, ZWSP, BOM...) deleted, every run of
    characters that are not letters, numbers or marks is a separator (``don't`` -> ``don t``).
    This is the shared neardup benchmark's definition (data/neardup/README.md), itself datatrove's
    ``simplify_text`` (lowercase, punctuation out, whitespace collapsed) minus its digit and
    diacritic folding, with punctuation splitting words instead of joining them.
    """
    cf, sep = _char_classes()
    return sep.sub(" ", cf.sub("", unicodedata.normalize("NFKC", text).lower())).split()


def shingles(text: str, ngram: int = NGRAM, char_ngram: int | None = None) -> list[bytes]:
    """UTF-8 shingles: word n-grams of the normalized tokens (joined by one space), or character
    n-grams of the normalized text (tokens joined by one space) when ``char_ngram`` is set.

    A text shorter than one n-gram gives one shingle (all of it), as in the neardup ground truth;
    a text without tokens gives none.  Duplicates are kept: a MinHash is a set sketch anyway.
    Bytes, because hash functions (xxhash, datasketch's sha1) take bytes: encoding once per text
    instead of once per shingle.
    """
    flat = " ".join(tokens(text))
    if char_ngram:
        if len(flat) <= char_ngram:
            return [flat.encode()] if flat else []
        return [flat[i:i + char_ngram].encode() for i in range(len(flat) - char_ngram + 1)]
    toks = flat.encode().split(b" ") if flat else []
    if len(toks) <= ngram:
        return [flat.encode()] if toks else []
    return [b" ".join(toks[i:i + ngram]) for i in range(len(toks) - ngram + 1)]


def shingle_hashes(shs: Iterable[bytes], hashfunc: Callable[[bytes], int] = xxh32_intdigest) -> np.ndarray:
    """One uint32 per shingle, xxHash32 (seed 0) by default: the fast 32-bit hash that datasketch is
    given in the equivalence test.  A C-level map, no Python loop body."""
    return np.fromiter(map(hashfunc, shs), dtype=np.uint32)


def unique_hashes(hashes: np.ndarray) -> np.ndarray:
    """The sorted shingle-hash set, the form exact verification intersects."""
    return np.unique(hashes)


@lru_cache(maxsize=16)
def permutations(num_perm: int = NUM_PERM, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of datasketch 2.0 affine32: ``RandomState(seed)`` draws a as 2*randint(0, 2^31)+1
    (odd, so h -> a*h+b mod 2^32 is a bijection) and then b as randint(0, 2^32), both uint32."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    a.flags.writeable = b.flags.writeable = False
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer on a uint32 array (wrapping arithmetic is the point)."""
    s1, m1, s2, m2, s3 = _FMIX
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


def signature(hashes: np.ndarray, num_perm: int = NUM_PERM, seed: int = SEED) -> np.ndarray:
    """The MinHash of one document's shingle hashes: min over shingles of a*fmix(h)+b mod 2^32."""
    return signatures([hashes], num_perm, seed)[0]


def signatures(hash_lists: Sequence[np.ndarray], num_perm: int = NUM_PERM, seed: int = SEED) -> np.ndarray:
    """Signatures of many documents as one [n_docs, num_perm] uint32 array.

    Per document, one [n_shingles, num_perm] product in a reused buffer, then a min over rows: the
    fastest layout measured (docs/sources.md#minhash-near-dedup; benchmarks/minhash.py compares it with
    ``minimum.reduceat`` over concatenated documents).  A fresh 250 KB temporary per document ran
    4x slower here (page faults), hence the buffer; long documents go through it in slices.
    """
    a, b = permutations(num_perm, seed)
    out = np.full((len(hash_lists), num_perm), EMPTY, dtype=np.uint32)
    longest = max(map(len, hash_lists), default=0)
    buf = np.empty((min(longest, _SLICE), num_perm), dtype=np.uint32)
    for i, hashes in enumerate(hash_lists):
        mixed = fmix32(np.asarray(hashes, dtype=np.uint32))[:, None]
        for lo in range(0, len(mixed), _SLICE):
            part = mixed[lo:lo + _SLICE]
            prod = buf[:len(part)]
            np.multiply(part, a, out=prod)
            prod += b
            if lo:
                np.minimum(out[i], np.minimum.reduce(prod, axis=0), out=out[i])
            else:
                np.minimum.reduce(prod, axis=0, out=out[i])
    return out


def signatures_reduceat(hash_lists: Sequence[np.ndarray], num_perm: int = NUM_PERM, seed: int = SEED,
                        chunk: int = 64) -> np.ndarray:
    """Same result as ``signatures``, computed on concatenated chunks with ``np.minimum.reduceat``
    (kept for the benchmark's comparison of the two batching layouts)."""
    a, b = permutations(num_perm, seed)
    out = np.full((len(hash_lists), num_perm), EMPTY, dtype=np.uint32)
    for lo in range(0, len(hash_lists), chunk):
        part = hash_lists[lo:lo + chunk]
        sizes = np.fromiter(map(len, part), dtype=np.int64, count=len(part))
        rows = np.flatnonzero(sizes) + lo
        if not len(rows):
            continue
        flat = fmix32(np.concatenate([np.asarray(h, dtype=np.uint32) for h in part]))[:, None]
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))[sizes > 0]
        out[rows] = np.minimum.reduceat(flat * a + b, starts, axis=0)
    return out


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Share of equal slots: datasketch ``MinHash.jaccard``."""
    return float(np.count_nonzero(sig_a == sig_b)) / len(sig_a)


def document_signatures(texts: Iterable[str], num_perm: int = NUM_PERM, seed: int = SEED, ngram: int = NGRAM,
                        char_ngram: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Texts -> ([n, num_perm] signatures, per-document sorted shingle-hash sets for verification)."""
    sets = [unique_hashes(shingle_hashes(shingles(t, ngram, char_ngram))) for t in texts]
    return signatures(sets, num_perm, seed), sets

