"""A run's output folder, local or in a bucket (``output: gs://...`` / ``s3://...``).

The loop, the checkpoints and every algorithm write local files: a checkpoint is made whole by
renaming a temp folder, which object stores cannot do. So a bucket output is trained in a local
staging folder (under the cache, keyed by the URL) that this module mirrors to the bucket:

- on start (when resuming), the bucket's latest checkpoint and the run's root files are
  downloaded if the staging folder has no checkpoint as new: a fresh machine resumes a run that
  was killed elsewhere;
- each checkpoint, once saved, is uploaded with the run's root files (metrics.jsonl, eval.jsonl)
  and its state file LAST: a step folder counts as a checkpoint only once its state file exists,
  here as locally (``latest_checkpoint``), so a half-uploaded one is never resumed from.
  Checkpoints pruned locally are removed from the bucket;
- at the end, ``final/`` is uploaded with ``config.json`` last (a folder without it loads as no
  model), then summary.json; the run's ``final`` is then the bucket URL.

Uploads are one PUT per file (an object appears only once whole) and run in the loop's thread:
training waits while a checkpoint uploads.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from dataflywheel.io import fs

from . import distributed as dist
from .checkpoint import CHECKPOINTS, STATE_FILE, latest_checkpoint
from .config import output_dir

FINAL = "final"
FINAL_LAST = "config.json"  # from_pretrained needs it: a final/ without it is not a model yet
CACHE_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".lock")  # rebuilt where the run runs: not mirrored
_STEP = re.compile(r"^step-(\d+)$")


def step_folders(entries: list[tuple[str, bool]]) -> dict[str, int]:
    """name -> step of the ``step-N`` folders among ``(name, is_folder)`` entries."""
    return {name: int(m.group(1)) for name, is_dir in entries if is_dir and (m := _STEP.match(name))}


def remote_latest(url: str) -> tuple[int, str] | None:
    """(step, URL) of the newest step folder in ``url/checkpoints`` that holds its state file."""
    root = fs.join(url, CHECKPOINTS)
    for name, step in sorted(step_folders(fs.listdir(root)).items(), key=lambda kv: -kv[1]):
        if fs.isfile(fs.join(root, name, STATE_FILE)):
            return step, fs.join(root, name)
    return None


def _put(local: Path, url: str) -> None:
    """One file up in one PUT, straight from where it lies (no temp copy: checkpoints are large)."""
    filesystem, path = fs.filesystem(url)
    filesystem.put_file(str(local), path)


def _get(url: str, local: Path) -> None:
    """One object down into a temp file renamed onto ``local``: a killed download leaves no torn file."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.download")
    filesystem, path = fs.filesystem(url)
    filesystem.get_file(path, str(tmp))
    os.replace(tmp, local)


def _mirrored(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(CACHE_SUFFIXES)


class RunOutput:
    """The run folder ``local`` the loop writes, mirrored to ``url`` when the output is a bucket
    (``url`` None: a local output, and every method here does nothing)."""

    def __init__(self, output: str) -> None:
        # with several processes rank 0 alone pulls and pushes (the others' url is None)
        self.url = output.rstrip("/") if fs.is_remote(output) and dist.is_main() else None
        self.local = output_dir(output)

    @classmethod
    def start(cls, output: str, resume: bool) -> RunOutput:
        """The run's output, with the bucket's latest checkpoint brought here first when resuming."""
        out = cls(output)
        if resume:
            out.pull()
        dist.barrier()  # the other ranks resume from what rank 0 pulled
        return out

    def pull(self) -> int | None:
        """Download the bucket's latest checkpoint and root files unless the staging folder has one as
        new; returns the step downloaded (None: nothing was)."""
        if self.url is None or (remote := remote_latest(self.url)) is None:
            return None
        step, url = remote
        here = latest_checkpoint(self.local)
        if here is not None and int(here.name.split("-")[1]) >= step:
            return None
        print(f"resuming from {fs.redact(url)}", flush=True)
        for name, is_dir in fs.listdir(self.url):  # metrics first: they cover at least the checkpoint's steps
            if not is_dir and _mirrored(name):
                _get(fs.join(self.url, name), self.local / name)
        target = self.local / CHECKPOINTS / fs.basename(url)
        tmp = target.with_name(f".pull-{target.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        fs.download_tree(url, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # whole or not at all, as a checkpoint saved here
        return step

    def push_checkpoint(self, folder: Path) -> None:
        """Upload the checkpoint just saved in ``folder`` (state file last) and the root files; then
        remove the bucket's step folders that are no longer kept here."""
        if self.url is None:
            return
        url = fs.join(self.url, CHECKPOINTS, folder.name)
        fs.remove(fs.join(url, STATE_FILE))  # a step folder being rewritten stops counting first
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE):
            _put(path, fs.join(url, *path.relative_to(folder).parts))
        self.push_root_files()  # before the state file: a checkpoint's metrics are in the bucket with it
        _put(folder / STATE_FILE, fs.join(url, STATE_FILE))
        self._prune(self.url)

    def push_root_files(self) -> None:
        """metrics.jsonl, eval.jsonl, summary.json: the files at the run folder's top (caches excluded)."""
        if self.url is None:
            return
        for path in sorted(self.local.iterdir()):
            if path.is_file() and _mirrored(path.name):
                _put(path, fs.join(self.url, path.name))

    def _prune(self, url: str) -> None:
        kept = step_folders(fs.listdir(str(self.local / CHECKPOINTS)))
        root = fs.join(url, CHECKPOINTS)
        for name in step_folders(fs.listdir(root)):
            if name not in kept:
                fs.remove(fs.join(root, name, STATE_FILE))  # stops counting before it goes
                fs.remove_tree(fs.join(root, name))

    def publish_final(self, final: Path) -> str:
        """Upload ``final/`` (config.json last) and the root files; returns where the final model is."""
        if self.url is None:
            return str(final)
        url = fs.join(self.url, FINAL)
        fs.remove(fs.join(url, FINAL_LAST))  # an earlier final stops loading before its files change
        files = {"/".join(p.relative_to(final).parts): p for p in final.rglob("*") if p.is_file()}
        for folder, names in list(fs.walk_files(url)):  # files of an earlier final that this one lacks
            for name in names:
                rel = fs.join(folder, name)[len(url) + 1:]
                if rel not in files:
                    fs.remove(fs.join(folder, name))
        for rel in sorted(files, key=lambda r: (r == FINAL_LAST, r)):
            _put(files[rel], fs.join(url, rel))
        self.push_root_files()
        return url
