"""Prompt pools for rounds without a built-in task: per-round slices, held-out prompts and seed rows
from files (docs/flywheel.md#prompt-pools-without-answers).

Pool files hold prompt rows, or preference rows (``prompts.kind: preference``: TRL's shapes and
HH-RLHF transcripts) whose prompt is taken. A pool prompt that is also a held-out prompt (the same
turns) is left out of the pool, so no round trains on what it is evaluated on. Rows that fail to
parse are counted, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

from ..io import read
from ..io.base import DeadLetter
from .config import FlywheelConfig


def _key(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps([[m["role"], m["content"]] for m in messages]).encode()).hexdigest()


def read_prompts(paths: list[str], kind: str, max_chars: int | None, counts: Counter) -> list[dict]:
    """``{"id", "messages"}`` prompt rows (first occurrence of each prompt), in file order."""
    rows, seen = [], set()
    for r in read(paths, kind=kind):
        if isinstance(r, DeadLetter):
            counts["dead_letter"] += 1
            continue
        messages = list(r["prompt"])
        if max_chars is not None and sum(len(m["content"]) for m in messages) > max_chars:
            counts["too_long"] += 1
            continue
        key = _key(messages)
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        rows.append({"id": str(r["id"]), "messages": messages})
    counts["read"] = len(rows) + sum(counts[k] for k in ("dead_letter", "too_long", "duplicate"))
    return rows


def heldout_prompts(cfg: FlywheelConfig) -> list[dict]:
    """The held-out prompts: ``eval_paths``, the first ``eval_rows`` in a seeded order."""
    p = cfg.prompts
    rows = read_prompts(p.eval_paths, p.kind, p.max_prompt_chars, Counter())
    if p.eval_rows is not None:
        random.Random(f"flywheel-eval:{cfg.seed}").shuffle(rows)
        rows = sorted(rows[:p.eval_rows], key=lambda r: r["id"])
    return rows


def round_prompts(cfg: FlywheelConfig, k: int, heldout: list[dict]) -> tuple[list[dict], dict]:
    """Round ``k``'s slice of the pool (a seeded order, disjoint slices), without the ``heldout``
    prompts; and the counts that account for every pool row."""
    p = cfg.prompts
    counts: Counter = Counter()
    pool = read_prompts(p.paths, p.kind, p.max_prompt_chars, counts)
    held = {_key(r["messages"]) for r in heldout}
    kept = [r for r in pool if _key(r["messages"]) not in held]
    counts["heldout_overlap"] = len(pool) - len(kept)
    random.Random(f"flywheel-prompts:{cfg.seed}").shuffle(kept)
    n = p.per_round
    counts["usable"] = len(kept)
    return kept[(k - 1) * n: k * n], dict(counts)


def seed_conversations(cfg: FlywheelConfig) -> list[dict]:
    """Round 0's SFT rows: conversations, or the prompt and chosen answer of preference rows."""
    p = cfg.prompts
    rows = []
    for r in read(p.seed_paths, kind="preference" if p.kind == "preference" else "conversation"):
        if isinstance(r, DeadLetter):
            continue  # the seed set is what parses; its count is in the seed stage's manifest
        messages = [*r["prompt"], *r["chosen"]] if p.kind == "preference" else r["messages"]
        rows.append({"id": str(r["id"]), "messages": messages, "meta": {"source": "seed"}})
    return rows
