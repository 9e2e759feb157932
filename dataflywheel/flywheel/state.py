"""Stage markers: what makes a flywheel run resumable (docs/flywheel.md).

A stage writes into its own folder, then, atomically, ``<stage>.done.json``: the hash of its inputs
(config section + the output hashes of the stages it reads), the hash of its outputs, its counts,
metrics and wall time. On a re-run a stage is skipped when its marker's input hash matches;
otherwise it runs again. Because every stage's input hash includes its upstream's *output* hash,
a stage that re-runs with a different result invalidates everything after it with no extra
bookkeeping, and one that re-runs to the same bytes (a re-run after a crash) invalidates nothing.

A stage killed half-way left no marker. ``resumable`` stages (training: it resumes from its own
checkpoints) keep their folder when ``<stage>.started.json`` shows the same input hash; every other
stage starts from an empty folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import progress
from ..io.sink import atomic_path

SKIP_NAMES = ("_SUCCESS.json",)  # holds wall times and paths: not content
SKIP_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".lock")  # caches and locks: not content


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), 16 hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tree_hash(path: str | Path, skip_dirs: tuple[str, ...] = ()) -> str:
    """Content hash of a file or folder: relative paths and bytes, in sorted order. Hidden files,
    ``_SUCCESS.json`` (timings), caches and ``skip_dirs`` (e.g. training checkpoints) are left out."""
    root = Path(path)
    h = hashlib.sha256()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and _counted(p.relative_to(root), skip_dirs))
    else:
        return "missing"
    for p in files:
        h.update(str(p.relative_to(root) if p != root else p.name).encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _counted(rel: Path, skip_dirs: tuple[str, ...]) -> bool:
    parts = rel.parts
    if any(p.startswith(".") for p in parts) or any(p in skip_dirs for p in parts[:-1]):
        return False
    return rel.name not in SKIP_NAMES and not rel.name.endswith(SKIP_SUFFIXES)


def read_marker(folder: Path, stage: str) -> dict | None:
    path = folder / f"{stage}.done.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # a marker is written atomically; a torn one means someone edited it
        return None


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(str(path)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)


def run_stage(round_dir: Path, stage: str, inputs: dict, fn: Callable[[Path], dict], *,
              resumable: bool = False, skip_dirs: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict:
    """Run ``fn(out_dir) -> {"counts", "metrics", "hash"}`` unless a marker with the same input hash exists.

    Returns the marker: ``stage``, ``inputs`` (hash), ``output`` (the stage's own content ``hash`` when
    it gives one, e.g. order-independent over rows; else the content hash of ``round_dir/stage``),
    ``counts``, ``metrics``, ``seconds``, ``skipped`` (True when the marker was reused)."""
    key = canonical_hash(inputs)
    done = read_marker(round_dir, stage)
    if done is not None and done.get("inputs") == key:
        return {**done, "skipped": True}
    out = round_dir / stage
    started = round_dir / f"{stage}.started.json"
    keep = resumable and started.is_file() and json.loads(started.read_text()).get("inputs") == key
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    (round_dir / f"{stage}.done.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(started, {"stage": stage, "inputs": key})
    log(f"{round_dir.name}/{stage}: running{' (resuming)' if keep else ''}")
    t0 = time.perf_counter()
    with progress.scope(f"{round_dir.name}/{stage}"):  # the stage's progress lines say which stage
        result = fn(out) or {}
    marker = {"stage": stage, "inputs": key, "input_detail": inputs, "output": result.get("hash") or tree_hash(out, skip_dirs),
              "counts": result.get("counts", {}), "metrics": result.get("metrics", {}),
              "seconds": round(time.perf_counter() - t0, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(round_dir / f"{stage}.done.json", marker)
    started.unlink(missing_ok=True)
    return {**marker, "skipped": False}


def write_json(path: str | Path, data: dict) -> None:
    """Atomically write ``data`` as JSON (manifests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, data)


def read_json(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def lock_run(folder: Path) -> Any:
    """An exclusive, non-blocking lock on the run folder (fcntl): a second writer fails at once with
    the holder's pid instead of interleaving rounds. Released when the returned file is closed or
    the process dies (kill -9 included: the kernel drops the lock)."""
    import fcntl

    from ..errors import UserError

    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / "run.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UserError(f"{folder} is locked by {holder}: one writer per run folder") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return fh
