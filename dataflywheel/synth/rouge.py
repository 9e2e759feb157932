"""ROUGE-L F (``rougeL``, no stemmer), equal to the ``rouge-score`` package, with a fast LCS.

Self-Instruct rejects a new instruction whose ROUGE-L F against any pool instruction is > 0.7
(docs/sources.md#self-instruct, step 5), so ROUGE-L runs once per (candidate, pool entry) pair: tens of
thousands of pairs per candidate. ``rouge_score`` tokenizes both texts on every call and fills an
m x n dynamic-programming table in Python; here texts are tokenized once, and the LCS length is
computed by the bit-parallel algorithm (Allison & Dix 1986; Hyyrö 2004): one bit per token of the
first text in a Python int, four big-int operations per token of the second, tokens that do not
occur in the first text skipped (they leave the bit vector unchanged).

Tokenization is ``rouge_score.tokenize.tokenize`` without a stemmer: ``lower()``, every run of
characters other than ``[a-z0-9]`` is a separator (so non-ASCII letters vanish), empty tokens
dropped. F is computed with the same float operations as ``rouge_score.scoring.fmeasure``, so
scores are bit-identical, not merely close (tests/test_rouge.py checks this on all seed pairs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")  # rouge_score: NON_ALPHANUM_RE = [^a-z0-9]+ -> space, then split


def tokenize(text: str) -> list[str]:
    """``rouge_score``'s default tokenizer (``use_stemmer=False``)."""
    return _TOKEN.findall(text.lower())


class LcsQuery:
    """One text prepared for many LCS computations against others: a bit mask per distinct token
    (bit i set where token i of the text is that token)."""

    __slots__ = ("tokens", "masks", "full")

    def __init__(self, tokens: Sequence[str]):
        self.tokens = tuple(tokens)
        masks: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            masks[tok] = masks.get(tok, 0) | (1 << i)
        self.masks = masks
        self.full = (1 << len(self.tokens)) - 1

    def lcs(self, other: Sequence[str]) -> int:
        """Length of the longest common subsequence of this text's tokens and ``other``.

        V starts all ones; for each token with match mask M: U = V & M, V = (V + U) | (V - U).
        The LCS length is the number of zero bits among the low m bits. Carries past bit m only
        grow the high part, which the final mask drops.
        """
        masks, v = self.masks, self.full
        for tok in other:
            m = masks.get(tok)
            if m:
                u = v & m
                v = (v + u) | (v - u)
        return len(self.tokens) - (v & self.full).bit_count()

    def f(self, other: Sequence[str]) -> float:
        """ROUGE-L F with this text as the target and ``other`` as the prediction."""
        return fmeasure(self.lcs(other) if other else 0, len(self.tokens), len(other))


def fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """``rouge_score.rouge_scorer._score_lcs`` then ``scoring.fmeasure``, operation for operation."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """LCS length of two token sequences (the shorter one becomes the bit vector)."""
    if len(a) < len(b):
        a, b = b, a
    return LcsQuery(b).lcs(a) if b else 0


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F of two texts: ``RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure``.
    (F is symmetric: swapping the texts swaps precision and recall, and 2*p*r/(p+r) is the same float.)"""
    t, p = tokenize(target), tokenize(prediction)
    return fmeasure(lcs_length(t, p), len(t), len(p))
