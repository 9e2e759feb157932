"""The cross-round pool of the best sample per prompt id (Llama 2 §3.2.3; docs/sources.md#rejection-sampling).

Llama 2's rejection sampling regressed while each round trained only on that round's samples; the
fix was to keep the top samples of all earlier rounds. ``BestPool.update(rows, round)`` keeps, per
prompt id, the highest-reward sample seen in any round; ``export()`` gives the pool as
Conversation rows saying which round produced each.

Storage: one sqlite file with a table keyed by prompt id. Why not ``models/store.SqliteStore``: its
``INSERT OR IGNORE`` keeps the first value, and the pool must replace a sample when a later round
beats it. Why not a Parquet file: every round would rewrite the whole pool to change a few rows;
sqlite updates rows in place inside one transaction, so a crash mid-update leaves the previous
round's pool intact. The pool is updated by the driver between rounds (not by Beam workers), so
one writer is the normal case; ``BEGIN IMMEDIATE`` makes concurrent writers wait, not interleave.

Rules, so the result is deterministic and re-applying a round changes nothing: a sample replaces
the stored one only when its reward is higher, or equal and from an earlier round (ties keep the
older); within one update, equal rewards for one prompt keep the lowest completion index.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from pathlib import Path

from .generate import prompt_messages
from .pairs import best_candidate, provenance

_SCHEMA = """CREATE TABLE IF NOT EXISTS pool (
    prompt_id TEXT PRIMARY KEY, reward REAL NOT NULL, round INTEGER NOT NULL,
    sample_index INTEGER NOT NULL, row TEXT NOT NULL) WITHOUT ROWID"""


def as_entry(row: dict, field: str = "reward") -> tuple[str, float, int, dict] | None:
    """(prompt id, reward, sample index, Conversation row) from a ``best_of_n`` output row or a
    scored prompt row with ``completions`` (its best sample); None when it has no finite reward."""
    if "completions" in row:
        best = best_candidate(row, field)
        if best is None or not math.isfinite(best.reward):
            return None
        meta = {**provenance(row, "best_of_n", None, field), "chosen_index": best.index}
        conv = {"id": str(row["id"]), "messages": [*prompt_messages(row), {"role": "assistant", "content": best.text}],
                "scores": {"reward": best.reward, "tokens": best.tokens}, "meta": meta}
        return conv["id"], best.reward, best.index, conv
    reward = (row.get("scores") or {}).get(field)
    if reward is None or not math.isfinite(float(reward)) or "messages" not in row:
        return None
    meta = row.get("meta") or {}
    pid = str(meta.get("prompt_id", row.get("id")))
    return pid, float(reward), int(meta.get("chosen_index", 0)), row


class BestPool:
    """Best sample per prompt id over all rounds, in one sqlite file."""

    def __init__(self, path: str | Path, field: str = "reward"):
        self.path, self.field = Path(path), field
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn.execute(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> BestPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM pool").fetchone()[0])

    def update(self, rows: list[dict], round: int) -> dict[str, int]:  # noqa: A002 - the flywheel's word
        """Merge one round's rows; counts: ``rows``, ``inserted`` (new prompt ids), ``replaced``
        (a better sample than the stored one), ``kept`` (the stored one stays), ``no_reward``."""
        counts: Counter = Counter(rows=len(rows))
        best: dict[str, tuple[float, int, int, dict]] = {}
        for row in rows:
            entry = as_entry(row, self.field)
            if entry is None:
                counts["no_reward"] += 1
                continue
            pid, reward, index, conv = entry
            # Rank within the update: higher reward, then lower sample index.
            if pid not in best or (-reward, index) < (-best[pid][0], best[pid][1]):
                best[pid] = (reward, round, index, conv)
            counts["candidates"] += 1
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            stored = {}
            ids = sorted(best)
            for at in range(0, len(ids), 500):  # below sqlite's oldest bound-variable limit (999)
                part = ids[at:at + 500]
                q = f"SELECT prompt_id, reward, round FROM pool WHERE prompt_id IN ({','.join('?' * len(part))})"
                stored.update({pid: (r, rnd) for pid, r, rnd in conn.execute(q, part)})
            writes = []
            for pid in ids:
                reward, rnd, index, conv = best[pid]
                if pid in stored:
                    old_reward, old_round = stored[pid]
                    if not (reward > old_reward or (reward == old_reward and rnd < old_round)):
                        counts["kept"] += 1
                        continue
                    counts["replaced"] += 1
                else:
                    counts["inserted"] += 1
                meta = {**(conv.get("meta") or {}), "round": rnd, "pool": {"round": rnd, "prompt_id": pid}}
                writes.append((pid, reward, rnd, index, json.dumps({**conv, "meta": meta}, sort_keys=True)))
            conn.executemany("INSERT OR REPLACE INTO pool VALUES (?, ?, ?, ?, ?)", writes)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        counts.pop("candidates", None)
        return {k: counts.get(k, 0) for k in ("rows", "inserted", "replaced", "kept", "no_reward")}

    def export(self) -> list[dict]:
        """The pool as Conversation rows, by prompt id; ``meta.round`` is the round that produced each."""
        return [json.loads(text) for (text,) in self._conn.execute("SELECT row FROM pool ORDER BY prompt_id")]

    def rounds(self) -> dict[int, int]:
        """How many pooled samples each round contributed."""
        return {int(r): int(n) for r, n in self._conn.execute("SELECT round, count(*) FROM pool GROUP BY round")}
