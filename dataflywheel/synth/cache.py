"""Generation cache: samples stored under ``base.cache_key`` in one sqlite file, many writers at once.

A retried Beam bundle or a re-run asks for the same (model, prompt, settings, seed, index) again and
gets the stored sample instead of a generation. Why sqlite and how it stays safe when several
processes and threads write at once (sqlite.org/wal.html, sqlite.org/lang_transaction.html):

- WAL journal: readers never block the writer, and the writer never blocks readers.
- Writers take the write lock up front (``BEGIN IMMEDIATE``) and wait for it up to a busy timeout.
  A deferred transaction that starts reading and then writes must *upgrade* its lock, and sqlite
  answers that with SQLITE_BUSY at once, busy timeout or not; taking the lock first avoids it.
- ``INSERT OR IGNORE``: the first sample stored under a key stays. Every writer of a key made the
  same sample (same seed), so which one wins does not matter.
- One connection per process and thread, opened on first use: a connection must not cross a fork
  or be shared between threads. The object pickles as its path (Beam pickles stages).
- ``synchronous=NORMAL``: with WAL, a crashed process loses nothing committed and the file never
  corrupts; a power cut may drop the last few commits, which are then regenerated.

The file must sit on a local disk: WAL needs shared memory between the processes of one host, so
network filesystems (NFS, GCS FUSE) are unsafe (sqlite.org/wal.html).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .backends.base import Sample

BUSY_TIMEOUT_S = 60.0  # ours: a write holds the lock for milliseconds; waiting beats failing a bundle
_CHUNK = 500  # keys per SELECT, below sqlite's oldest bound-variable limit (999)
_STORED = tuple(f.name for f in fields(Sample) if f.name != "cached")  # "cached" is set on the way out
_SCHEMA = "CREATE TABLE IF NOT EXISTS samples (key TEXT PRIMARY KEY, sample TEXT NOT NULL) WITHOUT ROWID"


def _dump(sample: Sample) -> str:
    data = asdict(sample)
    return json.dumps({k: data[k] for k in _STORED}, ensure_ascii=False, separators=(",", ":"))


def _load(blob: str) -> Sample:
    data = json.loads(blob)
    return Sample(**{k: data[k] for k in _STORED if k in data})  # fields added later keep defaults


class GenerationCache:
    """``get_many`` / ``put_many`` (``base.SampleCache``) over a sqlite file at ``path``."""

    def __init__(self, path: str | Path, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "busy_timeout_s": self.busy_timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["busy_timeout_s"])

    def __repr__(self) -> str:
        return f"GenerationCache({str(self.path)!r})"

    def _conn(self) -> sqlite3.Connection:
        local, pid = self._local, os.getpid()
        if getattr(local, "pid", None) != pid:  # first use in this thread, or a fork copied the parent's
            local.conn, local.pid = self._open(), pid
        return local.conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        # Switching to WAL needs a moment of exclusive access; when many processes open a new file
        # at once, sqlite can refuse it without consulting the busy handler, so retry until the timeout.
        deadline, wait = time.monotonic() + self.busy_timeout_s, 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(_SCHEMA)
                return conn
            except sqlite3.OperationalError as err:
                if ("locked" not in str(err) and "busy" not in str(err)) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(wait)
                wait = min(wait * 2, 0.5)

    def get_many(self, keys: list[str]) -> dict[str, Sample]:
        """The stored samples of those ``keys`` that are in the cache."""
        conn, found = self._conn(), {}
        unique = list(dict.fromkeys(keys))
        for at in range(0, len(unique), _CHUNK):
            part = unique[at:at + _CHUNK]
            marks = ",".join("?" * len(part))
            for key, blob in conn.execute(f"SELECT key, sample FROM samples WHERE key IN ({marks})", part):
                found[key] = _load(blob)
        return found

    def put_many(self, items: list[tuple[str, Sample]]) -> None:
        """Store samples in one transaction; a key already stored keeps its sample. Failed samples
        (``finish_reason == "error"``) are never stored: they are retried, not replayed."""
        rows = [(key, _dump(s)) for key, s in items if key and s.finish_reason != "error"]
        if not rows:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR IGNORE INTO samples (key, sample) VALUES (?, ?)", rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def stats(self) -> dict[str, int]:
        """``rows`` stored and ``bytes`` on disk (the database file plus its write-ahead log)."""
        rows = self._conn().execute("SELECT count(*) FROM samples").fetchone()[0]
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {"rows": int(rows), "bytes": size}

    def close(self) -> None:
        """Close this thread's connection (others close when their thread or process ends)."""
        local = self._local
        if getattr(local, "pid", None) == os.getpid():
            local.conn.close()
        local.__dict__.clear()
