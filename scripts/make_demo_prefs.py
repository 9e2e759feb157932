"""Write dataflywheel/data/demo/prefs.jsonl: project-written preference pairs for the RM / DPO demos.

Arithmetic questions whose chosen answer shows the working and is correct, and whose rejected
answer is a bare, hedged, wrong number, plus a few worded problems in the same pattern. The
style difference is the signal a tiny model learns in a minute on CPU (configs/train_rm.yaml);
correctness is the signal a real model would use. Seeded: ``python scripts/make_demo_prefs.py``
rewrites the file byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dataflywheel" / "data" / "demo" / "prefs.jsonl"
QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?")
CHOSEN = ("{a} {op} {b} = {c}.", "{a} {op} {b} = {c}, so the answer is {c}.")
REJECTED = ("The answer is probably {w}.", "I think it is {w}.", "{w}, maybe.")
WORDED = (  # (question, working, unit)
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", "{a} + {b} = {c}", "apples"),
    ("A shelf holds {a} books and {b} are added. How many books are on the shelf?", "{a} + {b} = {c}", "books"),
    ("{name} had {a} coins and spent {b}. How many coins are left?", "{a} - {b} = {c}", "coins"),
    ("There are {a} rows of {b} chairs. How many chairs are there?", "{a} * {b} = {c}", "chairs"),
)
NAMES = ("Sam", "Ana", "Leo", "Mia", "Tom", "Ivy")


def rows(n_arith: int = 84, n_worded: int = 16, seed: int = 0) -> list[dict]:
    """Preference rows (explicit prompt / chosen / rejected messages), deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n_arith + n_worded):
        if i < n_arith:
            op = rng.choice("+-*")
            a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(10, 99), rng.randint(2, 60))
            c = {"+": a + b, "-": a - b, "*": a * b}[op]
            question = rng.choice(QUESTIONS).format(a=a, op=op, b=b)
            chosen = rng.choice(CHOSEN).format(a=a, op=op, b=b, c=c)
        else:
            template, working, unit = rng.choice(WORDED)
            op = working.split()[1]
            a, b = (rng.randint(2, 9), rng.randint(2, 9)) if op == "*" else (rng.randint(12, 40), rng.randint(2, 11))
            c = {"+": a + b, "-": a - b, "*": a * b}[op]
            question = template.format(name=rng.choice(NAMES), a=a, b=b)
            chosen = f"{working.format(a=a, b=b, c=c)}, so the answer is {c} {unit}."
        wrong = c + rng.choice([-1, 1]) * rng.randint(1, 9)
        out.append({
            "id": f"pref-{i + 1:03d}",
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rng.choice(REJECTED).format(w=wrong)}],
        })
    return out


def main() -> None:
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows()))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
