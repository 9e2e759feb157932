"""A key -> value store in one sqlite file, safe with many writer processes and threads.

The generation cache (``synth/cache.py``) and the score/embedding cache (``models/score_cache.py``)
both sit on it: a retried Beam bundle or a re-run asks for the same key again and reads the stored
value instead of recomputing it. Why sqlite and how it stays safe when several processes and
threads write at once (sqlite.org/wal.html, sqlite.org/lang_transaction.html):

- WAL journal: readers never block the writer, and the writer never blocks readers.
- Writers take the write lock up front (``BEGIN IMMEDIATE``) and wait for it up to a busy timeout.
  A deferred transaction that starts reading and then writes must *upgrade* its lock, and sqlite
  answers that with SQLITE_BUSY at once, busy timeout or not; taking the lock first avoids it.
- ``INSERT OR IGNORE``: the first value stored under a key stays. Callers key by everything that
  decides the value (model, text, settings, seed), so every writer of a key wrote the same value.
- One connection per process and thread, opened on first use: a connection must not cross a fork
  or be shared between threads. The object pickles as its path (Beam pickles stages).
- ``synchronous=NORMAL``: with WAL, a crashed process loses nothing committed and the file never
  corrupts; a power cut may drop the last few commits, which are then recomputed.

The file must sit on a local disk: WAL needs shared memory between the processes of one host, so
network filesystems (NFS, GCS FUSE) are unsafe (sqlite.org/wal.html). A cache path in a bucket is
therefore a local file shared through per-machine snapshots in the bucket (``store_sync.py``).
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..io import fs
from .store_sync import mirror_path, pull, push

BUSY_TIMEOUT_S = 60.0  # ours: a write holds the lock for milliseconds; waiting beats failing a bundle
_CHUNK = 500  # keys per SELECT, below sqlite's oldest bound-variable limit (999)
_TABLE = re.compile(r"[a-z_][a-z0-9_]*")


class SqliteStore:
    """``get_many(keys) -> {key: value}`` and ``put_many([(key, value)])`` over a table of a sqlite file.

    Values are ``str`` or ``bytes``, returned as stored.
    """

    def __init__(self, path: str | Path, table: str = "kv", busy_timeout_s: float = BUSY_TIMEOUT_S):
        if not _TABLE.fullmatch(table):
            raise ValueError(f"table name must match {_TABLE.pattern}, got {table!r}")
        # A cache in a bucket is a local file shared through the bucket's snapshots (store_sync.py).
        self.spec = str(path)
        self.remote = self.spec if fs.is_remote(self.spec) else None
        self.path = Path(mirror_path(self.remote) if self.remote else path)
        self.table, self.busy_timeout_s = table, busy_timeout_s
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.spec, "table": self.table, "busy_timeout_s": self.busy_timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["table"], state["busy_timeout_s"])

    def __repr__(self) -> str:
        return f"SqliteStore({self.spec!r}, table={self.table!r})"

    def _conn(self) -> sqlite3.Connection:
        local, pid = self._local, os.getpid()
        if getattr(local, "pid", None) != pid:  # first use in this thread, or a fork copied the parent's
            local.conn, local.pid = self._open(), pid
        return local.conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        schema = f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID"
        # Switching to WAL needs a moment of exclusive access; when many processes open a new file
        # at once, sqlite can refuse it without consulting the busy handler, so retry until the timeout.
        deadline, wait = time.monotonic() + self.busy_timeout_s, 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(schema)
                if self.remote:
                    pull(self.remote, conn, str(self.path))
                return conn
            except sqlite3.OperationalError as err:
                if ("locked" not in str(err) and "busy" not in str(err)) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(wait)
                wait = min(wait * 2, 0.5)

    def get_many(self, keys: list[str]) -> dict[str, str | bytes]:
        """The stored values of those ``keys`` that are in the store."""
        conn, found = self._conn(), {}
        unique = list(dict.fromkeys(keys))
        for at in range(0, len(unique), _CHUNK):
            part = unique[at:at + _CHUNK]
            marks = ",".join("?" * len(part))
            for key, value in conn.execute(f"SELECT key, value FROM {self.table} WHERE key IN ({marks})", part):
                found[key] = value
        return found

    def put_many(self, items: list[tuple[str, str | bytes]]) -> None:
        """Store values in one transaction; a key already stored keeps its value."""
        if not items:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(f"INSERT OR IGNORE INTO {self.table} (key, value) VALUES (?, ?)", items)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def stats(self) -> dict[str, int]:
        """``rows`` stored and ``bytes`` on disk (the database file plus its write-ahead log)."""
        rows = self._conn().execute(f"SELECT count(*) FROM {self.table}").fetchone()[0]
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {"rows": int(rows), "bytes": size}

    def close(self) -> None:
        """Close this thread's connection (others close when their thread or process ends)."""
        local = self._local
        if getattr(local, "pid", None) == os.getpid():
            if self.remote:
                push(self.remote, local.conn)
            local.conn.close()
        local.__dict__.clear()
