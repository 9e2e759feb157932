"""Reading and writing datasets: JSONL(.gz/.zst), Parquet, Hugging Face folders, WARC and HTML.

``read(patterns, kind=...)`` expands globs / folders, picks the reader by extension (or folder
layout), and yields row dicts, validated as ``kind`` when given, or ``DeadLetter``s for what could
not be read: nothing is dropped silently. Writers (``open_shard``, ``ShardWriter``) are atomic,
and an output folder is committed by ``commit.finalize_shards`` (``_SUCCESS.json`` last, naming
its shards: readers of such a folder read those and nothing else). Names starting with "." or "_"
(temp files, markers) are never read. Every path may be local or an object-store URL (``fs.py``).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator, Sequence
from itertools import chain

from .. import records
from ..errors import RecordError, UserError
from . import fs
from .base import DeadLetter, snippet
from .commit import committed_files, read_success, write_rows, write_success
from .sink import ShardWriter, open_shard

__all__ = [
    "FORMATS",
    "DeadLetter",
    "ShardWriter",
    "detect_format",
    "expand_paths",
    "fs",
    "is_pattern",
    "open_shard",
    "read",
    "read_file",
    "read_success",
    "write_rows",
    "write_success",
]

FORMATS = ("jsonl", "parquet", "hf", "warc", "html")
_COMPRESSED = ("", ".gz", ".zst")
_SUFFIXES = {
    "jsonl": tuple(ext + c for ext in (".jsonl", ".json-lines", ".ndjson") for c in _COMPRESSED),
    "parquet": (".parquet",),
    "warc": (".warc", ".warc.gz", ".warc.lz4", ".arc", ".arc.gz"),
    "html": (".html", ".htm", ".html.gz", ".htm.gz"),
}
_DATA_SUFFIXES = tuple(chain.from_iterable(_SUFFIXES.values()))
_READERS = {  # module, function: imported on first use (pyarrow, warc and html cost import time)
    "jsonl": ("jsonl", "iter_jsonl"),
    "parquet": ("parquet", "iter_parquet"),
    "hf": ("hf", "iter_hf"),
    "warc": ("warc", "iter_warc"),
    "html": ("html", "iter_html"),
}


def _is_hf_folder(path: str) -> bool:
    if fs.is_remote(path):
        return False  # HF dataset folders are read from local disk; in a bucket, pass a glob of their files
    from .hf import is_hf_folder

    return is_hf_folder(path)


def detect_format(path: str) -> str:
    """The reader for ``path``: from its extension, or "hf" for a Hugging Face dataset folder."""
    name = fs.basename(path).lower()
    for fmt, suffixes in _SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    if fs.isdir(path):
        if _is_hf_folder(path):
            return "hf"
        raise UserError(
            f"{path}: a folder that is not a Hugging Face dataset folder (no state.json, dataset_dict.json, "
            "README configs or data/ shards); pass it to expand_paths / read, or a glob of its files"
        )
    hint = "; a .json file holding one JSON array is not supported: write one object per line (.jsonl)"
    raise UserError(
        f"{path}: unknown input format; expected one of {', '.join(FORMATS)} "
        f"(extensions: {', '.join(_DATA_SUFFIXES)}, or an HF dataset folder){hint if name.endswith('.json') else ''}"
    )


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _walk(folder: str) -> list[str]:
    """Data files below ``folder``, sorted. A pipeline output folder stands for the shards its
    ``_SUCCESS.json`` names; an HF dataset folder inside counts as one source."""
    entries = fs.listdir(folder)  # one listing: the marker, our shards and the data files
    committed = committed_files(folder, entries)
    if committed is not None:
        return committed
    found = []
    for name, is_dir in entries:
        path = fs.join(folder, name)
        if _hidden(name):
            continue
        if is_dir:
            found.extend([path] if _is_hf_folder(path) else _walk(path))
        elif name.lower().endswith(_DATA_SUFFIXES):
            found.append(path)
    return sorted(found)


def _magic_root(pattern: str) -> str:
    """The part of a glob before its first wildcard component."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if fs.has_magic(part):
            return "/".join(parts[:i])
    return pattern


def _globbed(pattern: str) -> list[str]:
    """A glob's data files: hidden components skipped, folders walked, and files inside a pipeline
    output folder kept only when its ``_SUCCESS.json`` names them (strays of retried bundles are not data)."""
    root = _magic_root(pattern).rstrip("/")
    hits: list[str] = []
    committed: dict[str, set[str] | None] = {}
    for hit, is_dir in fs.glob_entries(pattern):
        rel = hit[len(root):].lstrip("/") if root and hit.startswith(root) else hit
        if any(_hidden(part) for part in rel.split("/")):
            continue
        if is_dir:
            hits.extend([hit] if _is_hf_folder(hit) else _walk(hit))
            continue
        parent = fs.dirname(hit)
        if parent not in committed:
            files = committed_files(parent)
            committed[parent] = None if files is None else {fs.basename(f) for f in files}
        if committed[parent] is None or fs.basename(hit) in committed[parent]:
            hits.append(hit)
    return hits


def is_pattern(path: str) -> bool:
    """Whether ``path`` names several files (a glob, or a folder) rather than one data file."""
    return fs.has_magic(path) or not fs.basename(path).lower().endswith(_DATA_SUFFIXES)


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Files and HF folders named by globs (``**`` allowed), folders and paths, local or remote
    (``gs://``, ``s3://``, ``hf://``...); UserError when one matches nothing.

    A folder stands for the data files below it (sorted; names starting with "." or "_" skipped)
    unless it is an HF dataset folder, which is one source, or a pipeline output, which stands for
    the shards its ``_SUCCESS.json`` names (an unfinished one is refused). Duplicates are kept once, in order.
    """
    out: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        pattern = os.fspath(pattern)
        if fs.has_magic(pattern):
            hits = _globbed(pattern)
        elif fs.isdir(pattern):
            committed = committed_files(pattern)
            if committed is not None:  # a pipeline output: its named shards, none for an empty one
                out.extend(committed)
                continue
            hits = [pattern] if _is_hf_folder(pattern) else _walk(pattern)
        elif fs.isfile(pattern):
            hits = [pattern]
        else:
            hits = []
        if not hits:
            raise UserError(f"no input files match {fs.redact(pattern)!r}")
        out.extend(hits)
    return list(dict.fromkeys(out))


def _reader(fmt: str):
    if fmt not in _READERS:
        raise UserError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)} or auto")
    module, function = _READERS[fmt]
    return getattr(importlib.import_module(f".{module}", __name__), function)


def read_file(path: str, fmt: str = "auto", kind: str | None = None, **opts) -> Iterator[dict | DeadLetter]:
    """Rows of one file (or HF folder) as dicts, validated as ``kind`` when given, or DeadLetters.

    A row that fails ``records.validate(kind, row)`` becomes a DeadLetter at the row's location
    (line / row / offset) with the RecordError's reason. Format and kind errors raise UserError now.
    """
    if kind is not None and kind not in records.KINDS:
        raise UserError(f"unknown record kind {kind!r}; expected one of {', '.join(records.KINDS)}")
    reader = _reader(detect_format(path) if fmt == "auto" else fmt)
    return _validated(reader(path, **opts), path, kind)


def _validated(items: Iterator, path: str, kind: str | None) -> Iterator[dict | DeadLetter]:
    for item in items:
        if isinstance(item, DeadLetter):
            yield item
            continue
        loc, row = item
        if kind is None:
            yield row
            continue
        try:
            yield records.validate(kind, row)
        except RecordError as err:
            source = fs.join(path, loc["file"]) if "file" in loc else path
            yield DeadLetter(
                source,
                err.reason,
                str(err),
                line=loc.get("line"),
                offset=loc.get("offset"),
                row=loc.get("row"),
                snippet=snippet(json.dumps(row, ensure_ascii=False, default=str)),
            )


def read(
    patterns: str | Sequence[str], fmt: str = "auto", kind: str | None = None, **opts
) -> Iterator[dict | DeadLetter]:
    """``read_file`` over every path of ``expand_paths(patterns)``; all paths are checked before reading."""
    readers = [read_file(path, fmt, kind, **opts) for path in expand_paths(patterns)]
    return chain.from_iterable(readers)
