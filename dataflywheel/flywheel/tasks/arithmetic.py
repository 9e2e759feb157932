"""Arithmetic prompts ("12+7=") with exact answers: a verifiable task small enough for a tiny model
on a CPU, so GRPO configs and tests can show a reward that moves without any download.

``make_prompts`` is deterministic in its arguments; ``reward`` is a ``RewardFn`` (``synth/
verifiers.py``) that reads the *first* number of a completion: the model answers right after "=",
and whatever it writes next is not part of the answer.
"""

from __future__ import annotations

import random

from dataflywheel.synth.verifiers import extract_numbers, parse_number

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    width = rng.randint(*digits)
    return rng.randint(0 if width == 1 else 10 ** (width - 1), 10**width - 1)


def make_prompts(n: int, digits: tuple[int, int] = (1, 2), seed: int = 0,
                 ops: tuple[str, ...] = ("+",)) -> list[dict]:
    """``n`` prompt rows ``{"id", "messages": [user: "12+7="], "answer": "19"}``. Each operand has a
    digit count drawn from ``digits`` (min, max); "-" puts the larger operand first, so answers are
    never negative."""
    lo, hi = digits
    if not 1 <= lo <= hi:
        raise ValueError(f"digits must be (min, max) with 1 <= min <= max, got {digits}")
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ValueError(f"ops must be some of {sorted(OPS)}, got {ops}")
    rng = random.Random(f"arithmetic:{seed}")  # a string seed: stable across Python versions
    rows = []
    for i in range(n):
        op = rng.choice(ops)
        a, b = _operand(rng, digits), _operand(rng, digits)
        if op == "-" and a < b:
            a, b = b, a
        rows.append({"id": f"arith-{seed}-{i}", "messages": [{"role": "user", "content": f"{a}{op}{b}="}],
                     "answer": str(OPS[op](a, b))})
    return rows


def reward(prompts: list[dict], completions: list[str]) -> list[float]:
    """1.0 when the completion's first number equals the row's answer, else 0.0."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompt rows for {len(completions)} completions")
    out = []
    for row, text in zip(prompts, completions):
        found = extract_numbers(text)
        out.append(float(bool(found) and found[0] == parse_number(row["answer"])))
    return out
