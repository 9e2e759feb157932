"""Arithmetic prompts ("12+7=") with exact answers: a verifiable task small enough for a tiny model
on a CPU, so GRPO configs and tests can show a reward that moves without any download.

``make_prompts`` is deterministic in its arguments; ``reward`` is a ``RewardFn`` (``synth/
verifiers.py``) that reads the *first* number of a completion: the model answers right after "=",
and whatever it writes next is not part of the answer.
"""

from __future__ import annotations

import random
import re

from dataflywheel.synth.verifiers import extract_numbers, parse_number

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    width = rng.randint(*digits)
    return rng.randint(0 if width == 1 else 10 ** (width - 1), 10**width - 1)


def render(value: int, width: int, reverse: bool) -> str:
    """``value`` as written in a prompt or answer: zero-padded to ``width`` (0: no padding), digits
    least-significant first when ``reverse``."""
    text = str(value).zfill(width) if width else str(value)
    return text[::-1] if reverse else text


def make_prompts(n: int, digits: tuple[int, int] = (1, 2), seed: int = 0,
                 ops: tuple[str, ...] = ("+",), width: int = 0, reverse: bool = False,
                 prefix: str = "arith", template: str = "{a}{op}{b}=") -> list[dict]:
    """``n`` prompt rows ``{"id", "messages": [user: "12+7="], "answer": "19"}``. Each operand has a
    digit count drawn from ``digits`` (min, max); "-" puts the larger operand first, so answers are
    never negative.

    ``width`` > 0 zero-pads operands to ``width`` digits and answers to ``width + 1`` (every digit at
    a fixed position); ``reverse`` writes every number least-significant digit first, so each answer
    digit depends only on digits already seen plus a carry: Lee et al. 2023 ("Teaching arithmetic to
    small transformers") show small models learn addition far faster in this format. Ids are
    ``{prefix}-{seed}-{i}``: seed sets, round prompts and held-out sets use different prefixes.
    ``template`` words the question from the rendered operands ``{a}``, ``{b}`` and ``{op}`` (a chat
    model answers "What is 47 + 38? Reply with the number only." more often than "47+38=")."""
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
        if width and max(a, b) >= 10**width:
            raise ValueError(f"digits {digits} do not fit width {width}")
        q = template.format(a=render(a, width, reverse), op=op, b=render(b, width, reverse))
        ans = render(OPS[op](a, b), width + 1 if width else 0, reverse)
        rows.append({"id": f"{prefix}-{seed}-{i}", "messages": [{"role": "user", "content": q}], "answer": ans})
    return rows


def reward(prompts: list[dict], completions: list[str]) -> list[float]:
    """1.0 when the completion's first number equals the row's answer, else 0.0 (a digit-only
    answer must match as a digit string: a zero-padded "0550" is not "550")."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompt rows for {len(completions)} completions")
    out = []
    for row, text in zip(prompts, completions):
        answer = str(row["answer"])
        if answer.isdigit():  # the exact digit string: a padded "0550" is not "550", "03300" is not "3300"
            first = re.search(r"\d+", text)
            out.append(float(first is not None and first.group() == answer))
        else:
            found = extract_numbers(text)
            out.append(float(bool(found) and found[0] == parse_number(answer)))
    return out
