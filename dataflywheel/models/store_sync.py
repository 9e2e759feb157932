"""A sqlite cache whose path is a bucket URL: worked on locally, shared through the bucket.

sqlite must sit on a local disk (its write-ahead log needs shared memory between the processes of
one host), so a cache at ``gs://b/cache/scores.sqlite`` is a local file under the cache root
(``DATAFLYWHEEL_CACHE``), keyed by the URL, plus a folder of snapshots in the bucket, one per
machine: ``gs://b/cache/scores.sqlite/<machine>.sqlite``.

- The first connection of a process merges every machine's snapshot into the local file
  (``INSERT OR IGNORE``: keys hash everything that decides a value, so snapshots never disagree).
- ``close`` (a stage's teardown) uploads a consistent snapshot of the local file (sqlite's backup
  API, whole or not at all) under this machine's name.

So a re-run on a fresh machine (a new Dataflow worker, a CI runner) starts with what every earlier
machine computed, and many workers never overwrite each other's entries.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import tempfile

from ..io import fs

_MERGED: set[str] = set()  # local files this process has merged the bucket's snapshots into


def mirror_path(url: str) -> str:
    """The local sqlite file standing for the cache at ``url``."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(fs.cache_root(), "stores", key, fs.basename(url))


def _machine() -> str:
    return hashlib.sha256(f"{socket.gethostname()}:{fs.cache_root()}".encode()).hexdigest()[:16]


def pull(url: str, conn: sqlite3.Connection, local: str) -> None:
    """Merge every snapshot under ``url`` into the open local database, once per process."""
    if local in _MERGED:
        return
    _MERGED.add(local)
    for name, is_dir in fs.listdir(url):
        if is_dir or not name.endswith(".sqlite"):
            continue
        with tempfile.TemporaryDirectory(prefix="cache-") as tmp:
            snapshot = os.path.join(tmp, name)
            fs.copy_file(fs.join(url, name), snapshot)
            conn.execute("ATTACH DATABASE ? AS snap", (snapshot,))
            try:
                tables = conn.execute("SELECT name, sql FROM snap.sqlite_master WHERE type = 'table'").fetchall()
                conn.execute("BEGIN IMMEDIATE")
                for table, sql in tables:
                    conn.execute(sql.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
                    conn.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM snap.{table}")
                conn.execute("COMMIT")
            finally:
                conn.execute("DETACH DATABASE snap")


def push(url: str, conn: sqlite3.Connection) -> None:
    """Upload a consistent snapshot of the local database as this machine's under ``url``."""
    with fs.atomic_path(fs.join(url, f"{_machine()}.sqlite")) as tmp:
        target = sqlite3.connect(tmp)
        try:
            conn.backup(target)
        finally:
            target.close()
