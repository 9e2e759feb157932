"""The text a stage looks at, for each record kind."""

from __future__ import annotations

import math
import re
import unicodedata

_SPACE = re.compile(r"\s+")


def row_text(row: dict) -> str:
    """Document text; for chats, the message contents joined (prompt and responses alike)."""
    if "text" in row:
        return row["text"] or ""
    if "messages" in row:
        return "\n".join(m.get("content", "") for m in row["messages"])
    if "chosen" in row:
        msgs = list(row.get("prompt") or []) + list(row["chosen"]) + list(row.get("rejected") or [])
        return "\n".join(m.get("content", "") for m in msgs)
    if isinstance(row.get("prompt"), list):  # a prompt-only row
        return "\n".join(m.get("content", "") for m in row["prompt"])
    return ""


def normalize_for_hash(text: str) -> str:
    """NFKC, lowercase, whitespace collapsed: copies that differ only in case or spacing collide."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def score_value(row: dict, field: str) -> float | None:
    """``scores.<field>`` as a finite float, else None (missing, bool, text, NaN, inf)."""
    value = (row.get("scores") or {}).get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def with_scores(row: dict, scores: dict, text: str | None = None) -> dict:
    """A copy of ``row`` with ``scores`` merged into its scores (and ``text`` replaced, for rows that have one)."""
    out = {**row, "scores": {**(row.get("scores") or {}), **scores}}
    if text is not None and "text" in row:
        out["text"] = text
    return out
