"""Export pipeline outputs as one Hugging Face Hub dataset (Parquet shards + dataset card), and push it.

``export_dataset({config: folder}, to)`` writes each finished pipeline output folder (``part-*``
shards + ``_SUCCESS.json``) as its own Hub *config*, split ``train``, in the layout
``datasets.Dataset.push_to_hub(repo, config_name)`` writes: ``<config>/train-0000K-of-0000N.parquet``
(``data/`` for a config named ``default``), listed in the card's ``configs:`` front matter, the
first config being the default (huggingface.co/docs/hub/datasets-manual-configuration). Rows are
streamed shard by shard (``io.hf.write_shards``: one Parquet shard in memory at a time, one schema
per config). The export is built in a hidden sibling folder and renamed into place, so ``to`` holds
a complete export or the previous one, never a mix. Sources may be in a bucket; a bucket ``to`` is
built locally and uploaded, its card (README.md) last, so a reader that finds the card finds the data.

``push_to_hub(folder, "org/name")`` creates the dataset repo (private by default) and uploads the
folder with huggingface_hub; the token comes from the argument, else huggingface_hub's own lookup
(``HF_TOKEN``, then the saved login) and is never printed or logged.

``sources_from_paths`` turns CLI paths into sources: a dataset folder, or a flywheel run folder
whose ``manifest.json`` holds ``"exports": {config: folder relative to the run}`` and an optional
``"card"`` dict (the provenance the card shows).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from . import fs
from .base import DeadLetter
from .commit import SUCCESS as SUCCESS_NAME
from .hf import card_metadata, write_shards
from .hub_card import ConfigInfo, folder_provenance, render_card, row_kind
from .sink import ROWS_PER_SHARD, atomic_path

# Config names become folder names and YAML values: the characters the Hub's own config names use.
_CONFIG_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
MANIFEST = "manifest.json"
SPLIT = "train"  # a source folder is one split; the Hub's default split name


def export_dataset(
    sources: Mapping[str, str],
    to: str,
    *,
    name: str | None = None,
    license: str = "other",  # the Hub's value for "see the card": the user knows the data's license, we do not
    provenance: Mapping[str, Any] | None = None,
    rows_per_shard: int = ROWS_PER_SHARD,
) -> dict[str, Any]:
    """Write ``sources`` ({config_name: pipeline output folder}) to ``to`` in Hub layout with a card.

    Returns ``{"path", "configs": {name: {rows, files, kind, columns}}, "empty": [names]}``. A source
    with no rows is left out of the configs (and named on the card); all empty is an error.
    """
    if not sources:
        raise UserError("nothing to export: give at least one dataset folder")
    target = to if fs.is_remote(to) else os.path.abspath(to)
    markers = {config: _check_source(config, folder) for config, folder in sources.items()}
    _check_target(target, sources.values())
    base = fs.basename(target)
    if fs.is_remote(target):
        stage = tempfile.mkdtemp(prefix=f".{base}.tmp-")
    else:
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        stage = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
    try:
        configs, empty = [], []
        for config, folder in sources.items():
            data_dir = "data" if config == "default" else config
            try:
                files, counts = write_shards(stage, {SPLIT: _rows(folder, markers[config])}, rows_per_shard, data_dir)
            except (ValueError, pa.ArrowException) as err:  # rows whose column types clash: no one Parquet schema
                raise UserError(f"{folder}: cannot write as Parquet: {err}") from None
            expected = markers[config].get("rows")
            if isinstance(expected, int) and counts[SPLIT] != expected:
                raise UserError(f"{folder}: read {counts[SPLIT]} rows, its {SUCCESS_NAME} says {expected}: "
                                "the folder changed after the pipeline finished")
            if not counts[SPLIT]:
                empty.append(config)
                continue
            schema = pq.read_schema(files[SPLIT][0])
            configs.append(ConfigInfo(
                name=config, source=_label(folder), data_dir=data_dir, rows=counts[SPLIT],
                files=[os.path.relpath(p, stage) for p in files[SPLIT]],
                columns={f.name: str(f.type) for f in schema}, kind=row_kind(schema.names),
                origin=folder_provenance(folder)))
        if not configs:
            raise UserError(f"nothing to export: every source is empty ({', '.join(empty)})")
        title = name or base
        with atomic_path(os.path.join(stage, "README.md")) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write(render_card(title, license, configs, provenance, empty))
        _upload(stage, target) if fs.is_remote(target) else _swap(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"path": target, "empty": empty, "configs": {
        c.name: {"rows": c.rows, "files": c.files, "kind": c.kind, "columns": c.columns} for c in configs}}


def _check_source(config: str, folder: str) -> dict:
    """The folder's ``_SUCCESS.json``; UserError when the name or the folder will not do."""
    if not _CONFIG_NAME.fullmatch(config) or config == "data":
        raise UserError(f"invalid config name {config!r}: use letters, digits, '_', '-', '.' "
                        "(starting with a letter or digit), and not 'data'")
    if not fs.isdir(folder):
        raise UserError(f"{folder}: no such dataset folder")
    marker = fs.join(folder, SUCCESS_NAME)
    if not fs.isfile(marker):
        raise UserError(f"{folder}: no {SUCCESS_NAME}: not a finished pipeline output")
    try:
        info = json.loads(fs.read_text(marker))
    except (OSError, ValueError) as err:
        raise UserError(f"{marker}: unreadable: {err}") from None
    if not isinstance(info, dict):
        raise UserError(f"{marker}: not a JSON object")
    return info


def _check_target(target: str, folders) -> None:
    """``to`` must be new, empty, or an earlier export; never a source folder or inside / around one."""
    for folder in folders:
        src = folder.rstrip("/") if fs.is_remote(folder) else os.path.abspath(folder)
        if fs.is_remote(src) != fs.is_remote(target):
            continue
        inside = (f"{src}/".startswith(f"{target}/") or f"{target}/".startswith(f"{src}/")) if fs.is_remote(src) \
            else os.path.commonpath([src, target]) in (src, target)
        if inside:
            raise UserError(f"--to {target} overlaps the source folder {folder}: export to a separate folder")
    if fs.is_remote(target):
        if fs.listdir(target) and not _is_export(fs.join(target, "README.md")):
            raise UserError(f"{target} exists and is not an earlier export: choose a new or empty folder")
        return
    if os.path.isdir(target) and os.listdir(target):
        tags = (card_metadata(target) or {}).get("tags") or []
        if "dataflywheel" not in tags:
            raise UserError(f"{target} exists and is not an earlier export: choose a new or empty folder")
    elif os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"{target} exists and is not a folder")


def _is_export(card: str) -> bool:
    """Whether a remote README.md is one of our dataset cards (its front matter tags dataflywheel)."""
    try:
        return "dataflywheel" in fs.read_text(card).split("\n---", 1)[0]
    except FileNotFoundError:
        return False


def _upload(stage: str, target: str) -> None:
    """Replace the export in a bucket: the old objects go, the data goes up, the card last."""
    fs.remove_tree(target)
    fs.upload_tree(stage, target, skip_files=("README.md",))
    fs.copy_file(os.path.join(stage, "README.md"), fs.join(target, "README.md"))


def _rows(folder: str, marker: dict) -> Iterator[dict]:
    """The folder's rows, from the shards its ``_SUCCESS.json`` lists (else every data file in it)."""
    from . import read, read_file

    shards = marker.get("shards")
    if isinstance(shards, list) and all(isinstance(s, dict) and "file" in s for s in shards):
        items = (item for s in shards for item in read_file(fs.join(folder, s["file"])))
    else:
        items = read(folder)
    for item in items:
        if isinstance(item, DeadLetter):
            raise UserError(f"{folder}: cannot export: {item.source}: {item.reason}: {item.detail}")
        yield item


def _label(folder: str) -> str:
    """How the card names a source: relative to the current folder when inside it, else its name (no home paths)."""
    if fs.is_remote(folder):
        return folder
    path = os.path.abspath(folder)
    rel = os.path.relpath(path, os.getcwd())
    return rel if not rel.startswith("..") else os.path.basename(path)


def _swap(stage: str, target: str) -> None:
    """Put the finished export at ``target``; an earlier export there is replaced in one rename."""
    if not os.path.exists(target):
        os.replace(stage, target)
        return
    if not os.listdir(target):
        os.rmdir(target)
        os.replace(stage, target)
        return
    old = f"{stage}.old"
    os.replace(target, old)
    try:
        os.replace(stage, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sources_from_paths(
    paths: Sequence[str], config_names: Sequence[str] | None = None
) -> tuple[dict[str, str], dict[str, Any] | None]:
    """CLI paths -> ({config: folder}, provenance). A path holding ``manifest.json`` is a run folder.

    ``config_names`` name the dataset folders in order, or, when only run folders are given, pick
    which of their exports to keep.
    """
    names = list(config_names or [])
    runs = [p for p in paths if fs.isfile(fs.join(p, MANIFEST))]
    folders = [p for p in paths if p not in runs]
    if runs and folders and names:
        raise UserError("--config-name with both run folders and dataset folders is ambiguous: export them apart")
    if folders and names and len(names) != len(folders):
        raise UserError(f"{len(names)} --config-name value(s) for {len(folders)} dataset folder(s)")
    sources: dict[str, str] = {}
    cards: dict[str, Any] = {}

    def add(config: str, folder: str) -> None:
        if config in sources:
            raise UserError(f"config {config!r} given twice ({sources[config]}, {folder}): name them with --config-name")
        sources[config] = folder

    for run in runs:
        exports, card = _read_manifest(run)
        for config, rel in exports.items():
            if not names or config in names:
                add(config, fs.join(run, rel))
        if card:
            cards[run] = card
    if runs and names:
        unknown = [n for n in names if n not in sources]
        if unknown:
            known = sorted({c for run in runs for c in _read_manifest(run)[0]})
            raise UserError(f"no export {unknown[0]!r} in the run manifest; exports: {', '.join(known)}")
    for i, folder in enumerate(folders):
        add(names[i] if names else _config_name(folder), folder)
    provenance = next(iter(cards.values())) if len(cards) == 1 else (cards or None)
    return sources, provenance


def _read_manifest(run: str) -> tuple[dict[str, str], dict | None]:
    path = fs.join(run, MANIFEST)
    try:
        manifest = json.loads(fs.read_text(path))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable: {err}") from None
    exports = manifest.get("exports") if isinstance(manifest, dict) else None
    if not isinstance(exports, dict) or not exports or not all(isinstance(v, str) for v in exports.values()):
        raise UserError(f"{path}: no \"exports\" ({{config: folder relative to the run}}): nothing to export")
    card = manifest.get("card")
    if card is not None and not isinstance(card, dict):
        raise UserError(f"{path}: \"card\" must be a JSON object")
    return exports, card


def _config_name(folder: str) -> str:
    """A config name from a folder name: other characters become '_'."""
    base = fs.basename(folder) if fs.is_remote(folder) else os.path.basename(os.path.normpath(os.path.abspath(folder)))
    name = re.sub(r"[^\w.-]", "_", base).lstrip("._-")
    return "default" if name in ("", "data") else name


def push_to_hub(
    folder: str,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
) -> str:
    """Create the dataset repo ``repo_id`` (private unless told) and upload ``folder``; returns the repo URL."""
    try:
        import httpx2  # huggingface_hub's HTTP client
        from huggingface_hub import HfApi, constants, get_token
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise UserError("pushing needs huggingface_hub: pip install 'dataflywheel[hub]'") from None
    if not os.path.isfile(os.path.join(folder, "README.md")):
        raise UserError(f"{folder}: no README.md: export it first (dataflywheel export ... --to {folder})")
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    if constants.is_offline_mode():
        raise UserError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="dataset", revision=revision,
                          ignore_patterns=[".*", "**/.*"], commit_message="Upload dataset exported by dataflywheel")
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as err:
        # The message names the URL and the server's answer, never the request headers.
        raise UserError(f"push to {repo_id} failed: {' '.join(str(err).split())}") from None
    return str(url)
