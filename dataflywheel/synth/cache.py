"""Generation cache: samples stored under ``base.cache_key`` in a sqlite store, many writers at once.

A retried Beam bundle or a re-run asks for the same (model, prompt, settings, seed, index) again and
gets the stored sample instead of a generation. The storage and its safety under concurrent writers
are ``models/store.py``'s; this module only says what a sample looks like on disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..models.store import BUSY_TIMEOUT_S, SqliteStore
from .backends.base import Sample

_STORED = tuple(f.name for f in fields(Sample) if f.name != "cached")  # "cached" is set on the way out


def _dump(sample: Sample) -> str:
    data = asdict(sample)
    return json.dumps({k: data[k] for k in _STORED}, ensure_ascii=False, separators=(",", ":"))


def _load(blob: str) -> Sample:
    data = json.loads(blob)
    return Sample(**{k: data[k] for k in _STORED if k in data})  # fields added later keep defaults


class GenerationCache:
    """``get_many`` / ``put_many`` (``base.SampleCache``) over a sqlite file at ``path``."""

    def __init__(self, path: str | Path, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.store = SqliteStore(path, "samples", busy_timeout_s)
        self.path = self.store.path

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.store = state["store"]
        self.path = self.store.path

    def __repr__(self) -> str:
        return f"GenerationCache({str(self.path)!r})"

    def get_many(self, keys: list[str]) -> dict[str, Sample]:
        """The stored samples of those ``keys`` that are in the cache."""
        return {key: _load(blob) for key, blob in self.store.get_many(keys).items()}

    def put_many(self, items: list[tuple[str, Sample]]) -> None:
        """Store samples in one transaction; a key already stored keeps its sample. Failed samples
        (``finish_reason == "error"``) are never stored: they are retried, not replayed."""
        self.store.put_many([(key, _dump(s)) for key, s in items if key and s.finish_reason != "error"])

    def stats(self) -> dict[str, int]:
        """``rows`` stored and ``bytes`` on disk (the database file plus its write-ahead log)."""
        return self.store.stats()

    def close(self) -> None:
        """Close this thread's connection (others close when their thread or process ends)."""
        self.store.close()
