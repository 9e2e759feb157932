"""Scores and embeddings cached by (model, what, text): a re-run of selection recomputes nothing.

Selection is re-run often with new thresholds or budgets (tag, then mix: docs/sources.md#score-then-decide).
Scores already travel on the rows, but a run over fresh input, or a changed budget upstream of an
embedding step, would otherwise pay for the model again. Keys hash everything that decides the
value: the model id (name or path, plus revision when known), what was computed with which
settings (e.g. ``"ifd:plain:max_length=512"``), and the text(s). Values are JSON (scores) or
float32 vectors, in one sqlite file (``models/store.py``: safe with many writers, local disk only).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .store import SqliteStore


def cache_key(model: str, what: str, *texts: str) -> str:
    """sha256 of (model, what, texts) as canonical JSON: equal inputs, equal key; any change, new key."""
    blob = json.dumps([model, what, list(texts)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ScoreCache:
    """JSON values (``get_json``/``put_json``) and float32 vectors (``get_vectors``/``put_vectors``) by key."""

    def __init__(self, path: str | Path):
        self.path = str(path)  # a local file or a bucket URL (kept as text: Path would fold gs:// into gs:/)
        self.scores = SqliteStore(self.path, "scores")
        self.vectors = SqliteStore(self.path, "vectors")

    def __repr__(self) -> str:
        return f"ScoreCache({self.path!r})"

    def get_json(self, keys: Sequence[str]) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.scores.get_many(list(keys)).items()}

    def put_json(self, items: Sequence[tuple[str, Any]]) -> None:
        self.scores.put_many([(k, json.dumps(v, separators=(",", ":"))) for k, v in items])

    def get_vectors(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return {k: np.frombuffer(v, dtype=np.float32) for k, v in self.vectors.get_many(list(keys)).items()}

    def put_vectors(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        self.vectors.put_many([(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items])

    def stats(self) -> dict[str, int]:
        return {"scores": self.scores.stats()["rows"], "vectors": self.vectors.stats()["rows"],
                "bytes": self.scores.stats()["bytes"]}

    def close(self) -> None:
        self.scores.close()
        self.vectors.close()
