"""Hugging Face dataset folders: read ``save_to_disk`` and Hub layouts; write the Hub layout.

Read (``iter_hf(path, split="train")``):

- ``Dataset.save_to_disk``: ``state.json`` + ``*.arrow`` shards (Arrow IPC stream format);
  ``DatasetDict.save_to_disk``: ``dataset_dict.json`` + one such folder per split.
- Hub layout: parquet / JSONL / arrow files chosen by the ``configs:`` of the README's YAML front
  matter when present, else by the Hub's default split patterns: ``data/<split>-*``,
  ``data/<split>/**``, ``<split>-*``, ``<split>/**`` (a folder with no split-named files is all
  ``train``).

Rows are located as ``{"file": <path inside the folder>, "row": i}`` (``"line"`` for JSONL).

Write (``write_hf_folder``): ``data/<split>-0000K-of-0000N.parquet`` plus a README.md dataset card
whose ``configs:`` front matter lets ``datasets.load_dataset(folder)`` read it offline. All
shards share one schema (the permissive union of the shards' inferred schemas), as the Hub needs.
``write_shards`` is that shard machinery alone, under any data folder: ``io/hub_export.py`` writes
one per Hub config with it.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ..errors import UserError
from .base import FILE, UNKNOWN_COUNT, DeadLetter
from .compress import MAX_LINE_BYTES
from .jsonl import iter_jsonl
from .parquet import ARROW_ERRORS, BATCH_ROWS, batch_rows_as_dicts, iter_parquet, row_converter
from .sink import ROWS_PER_SHARD, ShardWriter, atomic_path

DEFAULT_SPLIT = "train"  # the split datasets.load_dataset returns for an unsplit folder
# Split names the Hub recognises in file and folder names (datasets' default data_files patterns).
KNOWN_SPLITS = ("train", "training", "test", "testing", "eval", "evaluation", "validation", "valid", "dev", "val")
HUB_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".json-lines")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)
_SPLIT_NAME = re.compile(r"\w+(\.\w+)*")  # the split names datasets accepts
_SHARD_NAME = re.compile(r"^[\w.]+-\d{5}-of-\d{5}\.")


def is_hf_folder(path: str) -> bool:
    """True for a save_to_disk folder, a DatasetDict folder, or a Hub-layout folder."""
    if not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")):
        return True
    if _card_configs(path) is not None:
        return True
    data = os.path.join(path, "data")
    return os.path.isdir(data) and any(_SHARD_NAME.match(n) for n in os.listdir(data))


def iter_hf(
    path: str,
    split: str = DEFAULT_SPLIT,
    config: str | None = None,
    columns: Sequence[str] | None = None,
    batch_rows: int = BATCH_ROWS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[tuple[dict, dict] | DeadLetter]:
    """Rows of one split of the HF dataset folder ``path`` (see the module docstring)."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = _read_json(os.path.join(path, "dataset_dict.json")).get("splits", [])
        if split not in splits:
            raise UserError(f"{path}: no split {split!r}; splits: {', '.join(splits)}")
        yield from _iter_saved(path, split, columns, batch_rows)
    elif os.path.isfile(os.path.join(path, "state.json")):
        yield from _iter_saved(path, None, columns, batch_rows)
    else:
        for rel in hub_split_files(path, split, config):
            full = os.path.join(path, rel)
            if rel.endswith(".parquet"):
                items = iter_parquet(full, columns=columns, batch_rows=batch_rows)
            elif rel.endswith(".arrow"):
                items = _iter_arrow_stream(full, columns, batch_rows)
            else:
                items = _project(iter_jsonl(full, max_line_bytes=max_line_bytes), columns)
            for item in items:
                yield item if isinstance(item, DeadLetter) else ({"file": rel, **item[0]}, item[1])


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable Hugging Face dataset file: {err}") from None


def _iter_saved(path: str, split: str | None, columns, batch_rows: int) -> Iterator:
    folder = os.path.join(path, split) if split else path
    state = _read_json(os.path.join(folder, "state.json"))
    for entry in state.get("_data_files", []):
        rel = os.path.join(split, entry["filename"]) if split else entry["filename"]
        for item in _iter_arrow_stream(os.path.join(path, rel), columns, batch_rows):
            yield item if isinstance(item, DeadLetter) else ({"file": rel, **item[0]}, item[1])


def _iter_arrow_stream(path: str, columns, batch_rows: int) -> Iterator:
    """Rows of one Arrow IPC stream file (what ``save_to_disk`` writes), ``{"row": i}`` 0-based.

    An Arrow stream has no row count up front: a missing column is counted by reading the stream
    through, and a stream that breaks reports the rows after the break as "row count unknown".
    """
    row = 0
    try:
        with pa.OSFile(path, "rb") as source:
            reader = pa.ipc.open_stream(source)
            missing = [c for c in columns or () if c not in reader.schema.names]
            if missing:
                detail = f"no column {missing[0]!r} (columns: {', '.join(reader.schema.names)})"
                yield _missing_column(path, reader, detail)
                return
            convert = row_converter(reader.schema)
            for batch in reader:
                batch = batch.select(columns) if columns else batch
                for start in range(0, batch.num_rows, batch_rows):
                    for values in batch_rows_as_dicts(batch.slice(start, batch_rows), convert):
                        yield {"row": row}, values
                        row += 1
    except ARROW_ERRORS as err:
        where = f"rows 0-{row - 1} were read; the rest" if row else "no row was read; the file"
        yield DeadLetter(
            path, "file_unreadable", f"not a readable Arrow stream: {err}; {where} cannot be read: {UNKNOWN_COUNT}",
            records=0, scope=FILE,
        )


def _missing_column(path: str, reader, detail: str) -> DeadLetter:
    """The file-level report for a missing column, standing for every row of the stream."""
    try:
        rows = sum(batch.num_rows for batch in reader)
    except ARROW_ERRORS as err:
        return DeadLetter(path, "missing_field", f"{detail}; the stream then breaks ({err}): {UNKNOWN_COUNT}",
                          records=0, scope=FILE)
    return DeadLetter(path, "missing_field", f"{detail}; all {rows} rows of the file", records=rows, scope=FILE)


def _project(items: Iterator, columns) -> Iterator:
    if not columns:
        yield from items
        return
    for item in items:
        yield item if isinstance(item, DeadLetter) else (item[0], {k: item[1][k] for k in columns if k in item[1]})


def card_metadata(path: str) -> dict | None:
    """The YAML front matter of the folder's README.md dataset card, or None."""
    try:
        with open(os.path.join(path, "README.md"), encoding="utf-8") as fh:
            match = _FRONT_MATTER.match(fh.read(1 << 20))  # a card's YAML sits at its very top
    except (OSError, UnicodeDecodeError):
        return None
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


def _card_configs(path: str) -> list | None:
    """The ``configs:`` list of the folder's README.md front matter, or None."""
    configs = (card_metadata(path) or {}).get("configs")
    return configs if isinstance(configs, list) and configs else None


def hub_split_files(path: str, split: str = DEFAULT_SPLIT, config: str | None = None) -> list[str]:
    """Data files (relative to ``path``, sorted) of one split of a Hub-layout folder."""
    configs = _card_configs(path)
    if configs is not None:
        patterns = _config_patterns(path, configs, split, config)
        found = sorted({rel for pattern in patterns for rel in _glob_rel(path, pattern)})
    else:
        found = _default_split_files(_all_data_files(path), split)
    if not found:
        raise UserError(f"{path}: no data files for split {split!r}")
    return found


def _config_patterns(path: str, configs: list, split: str, name: str | None) -> list[str]:
    by_name = {c.get("config_name", "default"): c for c in configs if isinstance(c, dict)}
    if name is None:
        chosen = next((c for c in by_name.values() if c.get("default")), by_name.get("default") or configs[0])
    elif name in by_name:
        chosen = by_name[name]
    else:
        raise UserError(f"{path}: no config {name!r}; configs: {', '.join(by_name)}")
    files = chosen.get("data_files", [])
    files = [files] if isinstance(files, str) else files
    if all(isinstance(f, str) for f in files):  # no per-split entries: it is all the default split
        return files if split == DEFAULT_SPLIT else []
    patterns = []
    for entry in files:
        if isinstance(entry, dict) and entry.get("split") == split:
            value = entry.get("path", [])
            patterns.extend([value] if isinstance(value, str) else value)
    return patterns


def _glob_rel(path: str, pattern: str) -> list[str]:
    hits = glob.glob(os.path.join(glob.escape(path), pattern), recursive=True)
    return [os.path.relpath(h, path) for h in hits if os.path.isfile(h) and not _hidden(os.path.relpath(h, path))]


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split(os.sep))


def _all_data_files(path: str) -> list[str]:
    rels = _glob_rel(path, "**/*")
    return sorted(r for r in rels if r.lower().endswith(HUB_DATA_SUFFIXES))


def _default_split_files(rels: list[str], split: str) -> list[str]:
    def split_of(rel: str) -> str | None:
        parts = rel.split(os.sep)
        if parts[0] == "data" and len(parts) > 1:
            parts = parts[1:]
        if len(parts) > 1 and parts[0] in KNOWN_SPLITS + (split,):
            return parts[0]
        name = parts[-1]
        for known in KNOWN_SPLITS + (split,):
            if fnmatch.fnmatch(name, f"{known}[-._]*"):
                return known
        return None

    named = {rel: split_of(rel) for rel in rels}
    if any(named.values()):
        return [rel for rel, s in named.items() if s == split]
    return rels if split == DEFAULT_SPLIT else []


def write_hf_folder(
    out_dir: str,
    splits: Mapping[str, Iterable[dict]],
    rows_per_shard: int = ROWS_PER_SHARD,
    title: str | None = None,
    description: str = "",
) -> dict[str, list[str]]:
    """Write ``splits`` ({name: rows}) as a Hub-layout folder; returns the shard paths per split.

    Shards go through ``write_shards`` (old shards of the same splits are replaced); the README
    card is written last. A split with no rows is left out.
    """
    final, counts = write_shards(out_dir, splits, rows_per_shard)
    with atomic_path(os.path.join(out_dir, "README.md")) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(dataset_card(title or os.path.basename(os.path.abspath(out_dir)), counts, description))
    return final


def write_shards(
    out_dir: str, splits: Mapping[str, Iterable[dict]], rows_per_shard: int = ROWS_PER_SHARD, data_dir: str = "data"
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Stream ``splits`` into ``<out_dir>/<data_dir>/<split>-0000K-of-0000N.parquet``.

    Returns (shard paths per split, rows per split). Shards are staged in a hidden folder (one
    shard's rows in memory at a time) and moved into place once all are written, sharing one
    schema; a split with no rows gets no files.
    """
    bad = [name for name in splits if not _SPLIT_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"invalid split name {bad[0]!r}: use letters, digits, '_' and inner '.'")
    staging = os.path.join(out_dir, f".staging-{uuid.uuid4().hex}")
    try:
        staged, counts = {}, {}
        for name, rows in splits.items():
            with ShardWriter(staging, "parquet", prefix=name, rows_per_shard=rows_per_shard) as writer:
                for row in rows:
                    writer.write(row)
            staged[name], counts[name] = [path for path, _ in writer.close()], writer.rows
        staged = {name: paths for name, paths in staged.items() if paths}
        _unify_schemas([p for paths in staged.values() for p in paths])
        final = {name: _publish(os.path.join(out_dir, data_dir), name, paths) for name, paths in staged.items()}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, counts


def _unify_schemas(paths: list[str]) -> None:
    """Rewrite shards whose inferred schema differs from the union of all (one shard in memory at a time)."""
    if not paths:  # every split was empty: nothing to unify
        return
    schemas = [pq.read_schema(p) for p in paths]
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"rows have incompatible column types across shards: {err}") from None
    for path, schema in zip(paths, schemas, strict=True):
        if not schema.equals(unified):
            table = pq.read_table(path)
            columns = {
                f.name: table[f.name] if f.name in schema.names else pa.nulls(len(table), f.type) for f in unified
            }
            with atomic_path(path) as tmp:
                pq.write_table(pa.table(columns).cast(unified), tmp, compression="zstd", write_page_checksum=True)


def _publish(data: str, split: str, paths: list[str]) -> list[str]:
    os.makedirs(data, exist_ok=True)
    for old in glob.glob(os.path.join(glob.escape(data), f"{glob.escape(split)}-*-of-*.parquet")):
        os.remove(old)
    total = len(paths)
    final = []
    for k, src in enumerate(paths):
        dst = os.path.join(data, f"{split}-{k:05d}-of-{total:05d}.parquet")
        os.replace(src, dst)
        final.append(dst)
    return final


def dataset_card(title: str, counts: Mapping[str, int], description: str = "") -> str:
    """A minimal dataset card: ``configs:`` front matter (so load_dataset finds the splits) + row counts."""
    data_files = [{"split": name, "path": f"data/{name}-*"} for name, n in counts.items() if n]
    front = yaml.safe_dump({"configs": [{"config_name": "default", "data_files": data_files}]}, sort_keys=False)
    rows = "".join(f"| {name} | {n} |\n" for name, n in counts.items() if n)
    intro = f"{description}\n\n" if description else ""
    return (
        f"---\n{front}---\n\n# {title}\n\n{intro}| split | rows |\n|---|---|\n{rows}\n"
        'Load it with `datasets.load_dataset("<this folder or its Hub id>")`.\n'
    )
