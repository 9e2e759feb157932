"""The commit protocol of an output folder, on a local disk or an object store (which has no rename).

1. A job starts by withdrawing the folder's ``_SUCCESS.json`` (``uncommit``): from then until its
   end the folder is incomplete, and readers refuse it.
2. Each writer (a Beam bundle, the plain loop) writes its shards under final, unique names
   ``part-<token>-<k>.<ext>``, each one whole or not at all (``fs.atomic_path``: rename locally,
   one PUT on an object store), and reports them with their row counts and id checksums.
3. ``finalize_shards`` writes ``_SUCCESS.json`` last, naming the committed shards with their rows,
   plus the folder's rows and id checksum; only then does it delete what it does not name (old
   shards, strays of retried or killed bundles, temp files), one object at a time: no batch call,
   no copy, no rename.

Readers of a folder trust ``_SUCCESS.json``: they read the shards it names and nothing else, and
refuse a folder holding ``part-*`` files but no marker (a job killed or still running, or one that
failed its checks). A kill at any point therefore leaves either the new complete output or no
complete output, never a mix.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable
from typing import Any

from ..errors import UserError
from ..records import MASK64
from . import fs
from .sink import ShardWriter

TMP_PREFIX = ".tmp-"
PART_PREFIX = "part-"
SUCCESS = "_SUCCESS.json"
# Our writers' shard names: only a folder holding these without a marker is an unfinished output of
# ours (other tools' part-* files, e.g. Spark's part-00000-<uuid>.parquet, are read as data).
OUR_SHARD = re.compile(r"^part-[0-9a-f]{16}-\d{5}\.")

Shard = tuple[str, int, int]  # (path, rows, id checksum)


def shard_prefix() -> str:
    """A writer's unique shard-name prefix: no two writers (or two attempts of one bundle) collide."""
    return f"{PART_PREFIX}{uuid.uuid4().hex[:16]}"


def write_success(out_dir: str | os.PathLike, info: dict) -> str:
    """Write ``<out_dir>/_SUCCESS.json`` atomically (call it last: its presence means 'complete')."""
    path = fs.join(out_dir, SUCCESS)
    fs.write_text(path, json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def read_success(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A finished folder's ``_SUCCESS.json``, or None when the folder is not (or no longer) complete."""
    try:
        return json.loads(fs.read_text(fs.join(out_dir, SUCCESS)))
    except FileNotFoundError:
        return None


def committed_files(folder: str, entries: list[tuple[str, bool]] | None = None) -> list[str] | None:
    """The data files of a pipeline output folder, as its ``_SUCCESS.json`` names them; None when
    the folder is not a pipeline output. UserError for an unfinished one (our shards, no marker).
    ``entries``: the folder's listing (``fs.listdir``) when the caller has it already."""
    entries = fs.listdir(folder) if entries is None else entries
    info = read_success(folder) if (SUCCESS, False) in entries else None
    if info is not None:
        shards = info.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards):
            raise UserError(f"{fs.redact(fs.join(folder, SUCCESS))}: shards: expected a list of {{file, rows}} objects")
        return [fs.join(folder, shard["file"]) for shard in shards]
    if any(OUR_SHARD.match(name) and not is_dir for name, is_dir in entries):
        raise UserError(f"{fs.redact(folder)}: an unfinished pipeline output (part files but no {SUCCESS}: the job "
                        "was killed, is still running, or failed its checks); re-run the job that writes it")
    return None


def shards_of(writer: ShardWriter) -> list[Shard]:
    """The finished shards of a writer, as ``finalize_shards`` takes them."""
    return [(path, rows, writer.ids[path]) for path, rows in writer.close()]


def finalize_shards(out_dir: str | os.PathLike, fmt: str, committed: Iterable[Shard],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Commit the shards written under their final names: ``_SUCCESS.json`` first, then delete the
    folder's other shards and temp files; returns what it wrote to the marker (``extra`` added)."""
    out_dir = os.fspath(out_dir)
    fs.makedirs(out_dir)
    shards = sorted((fs.basename(str(path)), int(n), int(ids)) for path, n, ids in committed)
    rows = sum(n for _, n, _ in shards)
    ids = sum(i for _, _, i in shards) & MASK64
    info = {"rows": rows, "ids": f"{ids:016x}", "shards": [{"file": name, "rows": n} for name, n, _ in shards],
            "format": fmt, **(extra or {})}
    write_success(out_dir, info)
    keep = {name for name, _, _ in shards}
    for name, is_dir in fs.listdir(out_dir):
        if not is_dir and name not in keep and (name.startswith((PART_PREFIX, TMP_PREFIX)) or ".tmp-" in name):
            fs.remove(fs.join(out_dir, name))  # old shards, strays of retried bundles, a killed writer's temp file
    return info


def uncommit(out_dir: str | os.PathLike) -> None:
    """Withdraw a folder's ``_SUCCESS.json`` (a job starts, or failed its checks): no reader takes it as complete."""
    fs.remove(fs.join(out_dir, SUCCESS))


def write_rows(folder: str | os.PathLike, rows: Iterable[dict], fmt: str = "jsonl",
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows -> a committed output folder (part files + ``_SUCCESS.json``), as a pipeline writes one."""
    folder = os.fspath(folder)
    uncommit(folder)
    fs.makedirs(folder)
    with ShardWriter(folder, fmt, prefix=shard_prefix()) as writer:
        for row in rows:
            writer.write(row)
    return finalize_shards(folder, fmt, shards_of(writer), extra)
