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
import time
from collections.abc import Callable
from typing import Any

from .. import progress
from ..io import fs

SKIP_NAMES = ("_SUCCESS.json",)  # holds wall times and paths: not content
SKIP_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".lock")  # caches and locks: not content


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), 16 hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tree_hash(path: str | os.PathLike, skip_dirs: tuple[str, ...] = ()) -> str:
    """Content hash of a file or folder, local or in a bucket: relative paths and bytes, in sorted
    order. Hidden files, ``_SUCCESS.json`` (timings), caches and ``skip_dirs`` (e.g. training
    checkpoints) are left out."""
    root = os.fspath(path)
    h = hashlib.sha256()
    if fs.isfile(root):
        files = [(fs.basename(root), root)]
    elif fs.isdir(root):
        files = sorted((rel, fs.join(root, *rel.split("/"))) for rel in _files_below(root)
                       if _counted(rel.split("/"), skip_dirs))
    else:
        return "missing"
    for rel, file in files:
        h.update(rel.encode() + b"\0")
        with fs.open_file(file) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _files_below(root: str) -> list[str]:
    """Relative ("/"-joined) paths of every file below ``root``."""
    base = root.rstrip("/")
    out = []
    for folder, names in fs.walk_files(root):
        rel_folder = folder[len(base):].strip("/").replace(os.sep, "/")
        out += [f"{rel_folder}/{name}" if rel_folder else name for name in names]
    return out


def _counted(parts: list[str], skip_dirs: tuple[str, ...]) -> bool:
    if any(p.startswith(".") for p in parts) or any(p in skip_dirs for p in parts[:-1]):
        return False
    return parts[-1] not in SKIP_NAMES and not parts[-1].endswith(SKIP_SUFFIXES)


def read_marker(folder: str, stage: str) -> dict | None:
    return read_json(fs.join(folder, f"{stage}.done.json"))


def run_stage(round_dir: str, stage: str, inputs: dict, fn: Callable[[str], dict], *,
              resumable: bool = False, skip_dirs: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict:
    """Run ``fn(out_dir) -> {"counts", "metrics", "hash"}`` unless a marker with the same input hash exists.

    ``round_dir`` is a local folder or a bucket URL. ``skip_dirs`` name resume state (training
    checkpoints): left out of the output hash, and removed once the stage is done. Returns the
    marker: ``stage``, ``inputs`` (hash), ``output`` (the stage's own content ``hash`` when it gives one, e.g. order-independent
    over rows; else the content hash of ``round_dir/stage``), ``counts``, ``metrics``, ``seconds``,
    ``skipped`` (True when the marker was reused)."""
    key = canonical_hash(inputs)
    done = read_marker(round_dir, stage)
    if done is not None and done.get("inputs") == key:
        return {**done, "skipped": True}
    out = fs.join(round_dir, stage)
    started = fs.join(round_dir, f"{stage}.started.json")
    keep = resumable and (read_json(started) or {}).get("inputs") == key
    if not keep:
        fs.remove_tree(out)
    fs.remove(fs.join(round_dir, f"{stage}.done.json"))
    fs.makedirs(out)
    write_json(started, {"stage": stage, "inputs": key})
    name = f"{fs.basename(round_dir)}/{stage}"
    log(f"{name}: running{' (resuming)' if keep else ''}")
    t0 = time.perf_counter()
    with progress.scope(name):  # the stage's progress lines say which stage
        result = fn(out) or {}
    marker = {"stage": stage, "inputs": key, "input_detail": inputs, "output": result.get("hash") or tree_hash(out, skip_dirs),
              "counts": result.get("counts", {}), "metrics": result.get("metrics", {}),
              "seconds": round(time.perf_counter() - t0, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(fs.join(round_dir, f"{stage}.done.json"), marker)
    fs.remove(started)
    for folder in _resume_state(out, skip_dirs):  # a real model's checkpoint is ~3x its weights: GBs a round
        fs.remove_tree(folder)
    return {**marker, "skipped": False}


def _resume_state(out: str, skip_dirs: tuple[str, ...]) -> set[str]:
    """The ``skip_dirs`` folders anywhere below ``out`` (only a stage still running needs them)."""
    found = set()
    for rel in _files_below(out) if skip_dirs else []:
        parts = rel.split("/")
        at = next((i for i, p in enumerate(parts[:-1]) if p in skip_dirs), None)
        if at is not None:
            found.add(fs.join(out, *parts[:at + 1]))
    return found


def run_relative(path: str, run: str) -> str:
    """``path`` relative to the run folder (local or a bucket URL): a run folder can be moved or
    copied (the ablations copy round 0). A path outside a bucket run stays as it is."""
    if fs.is_remote(run) or fs.is_remote(path):
        base = run.rstrip("/") + "/"
        return path[len(base):] if path.startswith(base) else path
    return os.path.relpath(path, run)


def in_run(run: str, rel: str) -> str:
    """The inverse of ``run_relative``."""
    return rel if fs.is_remote(rel) or os.path.isabs(rel) else fs.join(run, rel)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Atomically write ``data`` as JSON (markers, manifests), locally or to a bucket."""
    fs.write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON file's content, or None when it is missing (or torn: markers are written atomically,
    so a torn one means someone edited it)."""
    try:
        return json.loads(fs.read_text(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def lock_run(folder: str) -> Any:
    """An exclusive, non-blocking lock on the run folder (fcntl): a second writer fails at once with
    the holder's pid instead of interleaving rounds. Released when the returned file is closed or
    the process dies (kill -9 included: the kernel drops the lock). A run folder in a bucket is
    locked on this machine only (object stores have no locks): run one driver per bucket run."""
    import fcntl

    from ..errors import UserError

    if fs.is_remote(folder):
        lock_dir = os.path.join(fs.cache_root(), "locks")
        os.makedirs(lock_dir, exist_ok=True)
        lock_path = os.path.join(lock_dir, hashlib.sha256(folder.encode()).hexdigest()[:16] + ".lock")
    else:
        os.makedirs(folder, exist_ok=True)
        lock_path = os.path.join(folder, "run.lock")
    fh = open(lock_path, "a+")
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
