"""The commit protocol of an output folder: complete hidden shards, then one finalize, then
``_SUCCESS.json`` last. Every writer of an output folder (both engines' sinks, the flywheel,
exploded pairs) commits through ``finalize_shards``; readers of a folder trust ``_SUCCESS.json``.

Writers put each shard under a hidden temp name (``.tmp-...``, never read as data) and report it
with its row count and id checksum. ``finalize_shards`` removes the old marker (the folder is
incomplete from then on), renames the committed shards to ``part-00000-of-0000N.<ext>``, removes
stale parts and the hidden leftovers of retried or killed bundles, and writes ``_SUCCESS.json``
naming every shard with its rows, plus the folder's rows and id checksum.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..records import MASK64
from .sink import ShardWriter, atomic_path

TMP_PREFIX = ".tmp-"
SUCCESS = "_SUCCESS.json"

Shard = tuple[str, int, int]  # (hidden path, rows, id checksum)


def write_success(out_dir: str | os.PathLike, info: dict) -> str:
    """Write ``<out_dir>/_SUCCESS.json`` atomically (call it last: its presence means 'complete')."""
    path = os.path.join(out_dir, SUCCESS)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
        fh.write("\n")
    return path


def read_success(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A finished folder's ``_SUCCESS.json``, or None when the folder is not (or no longer) complete."""
    path = Path(out_dir) / SUCCESS
    return json.loads(path.read_text()) if path.exists() else None


def shards_of(writer: ShardWriter) -> list[Shard]:
    """The finished shards of a writer, as ``finalize_shards`` takes them."""
    return [(path, rows, writer.ids[path]) for path, rows in writer.close()]


def finalize_shards(out_dir: str | os.PathLike, fmt: str, committed: Iterable[Shard],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rename committed hidden shards to their final names, drop stale ones, write _SUCCESS last;
    returns what it wrote there (``extra`` is added to it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUCCESS).unlink(missing_ok=True)  # the folder is incomplete from here until the new marker
    shards = sorted((str(path), int(n), int(ids)) for path, n, ids in committed)
    ext = "." + fmt
    for old in out.glob(f"part-*{ext}"):
        old.unlink()
    final, rows, ids = [], 0, 0
    for i, (tmp, n, shard_ids) in enumerate(shards):
        name = f"part-{i:05d}-of-{len(shards):05d}{ext}"
        os.replace(tmp, out / name)
        final.append({"file": name, "rows": n})
        rows, ids = rows + n, ids + shard_ids
    for leftover in out.glob(f"{TMP_PREFIX}*"):  # shards of bundles that failed and were retried
        leftover.unlink()
    info = {"rows": rows, "ids": f"{ids & MASK64:016x}", "shards": final, "format": fmt, **(extra or {})}
    write_success(out, info)
    return info


def uncommit(out_dir: str | os.PathLike) -> None:
    """Withdraw a folder's ``_SUCCESS.json`` (a run that failed its checks): no reader takes it as complete."""
    (Path(out_dir) / SUCCESS).unlink(missing_ok=True)


def write_rows(folder: str | os.PathLike, rows: Iterable[dict], fmt: str = "jsonl",
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows -> a committed output folder (part files + ``_SUCCESS.json``), as a pipeline writes one."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(str(folder), fmt, prefix=f"{TMP_PREFIX}write")
    with writer:
        for row in rows:
            writer.write(row)
    return finalize_shards(folder, fmt, shards_of(writer), extra)
