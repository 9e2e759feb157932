"""The dataset card (README.md) of a Hub export: YAML metadata, then what each config holds and where it came from.

The front matter follows the Hub's dataset-card metadata (huggingface.co/docs/hub/datasets-cards):
``configs`` with ``data_files`` per split (huggingface.co/docs/hub/datasets-manual-configuration;
the first config is ``default: true``), ``license``, ``pretty_name``, ``tags``, ``task_categories``
and ``size_categories``. The markdown says, per config, the row kind, row count, files, schema and
provenance: the source folder's ``_SUCCESS.json`` count, its ``_rejected`` / ``_dead_letter``
counts and the per-stage counts of its ``_report.json``, when present. A caller's ``provenance``
dict (e.g. a flywheel run's manifest summary) is rendered readably and as a JSON block. Secrets
never reach the card: secret-looking keys are masked (``stats.redact``) and the Hub token of the
environment is replaced wherever it appears.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..stats import redact
from . import fs

# What each row kind is, the Hub task category it serves, and tags (the record kinds of records.py; TRL's dataset formats).
KINDS: dict[str, tuple[str, list[str], list[str]]] = {
    "preference": ("Preference pairs in TRL's conversational format (`prompt`, `chosen`, `rejected` message lists), "
                   "for DPO or reward-model training.", ["text-generation"], ["dpo", "preference"]),
    "conversation": ("Conversations (`messages`: role / content turns, TRL's conversational format), for supervised "
                     "fine-tuning.", ["text-generation"], ["sft", "conversational"]),
    "prompt": ("Prompts (`prompt`: the messages up to the user turn) to sample responses for.",
               ["text-generation"], ["prompts"]),
    "document": ("Documents (`text`), e.g. curated web text for pre-training.", ["text-generation"], ["text"]),
    "rows": ("Rows of another shape: see the schema.", [], []),
}
# The Hub's size_categories buckets (huggingface.co/docs/hub/datasets-cards, "size_categories").
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_MAX_CELL = 120  # longer table cells are cut: the JSON block below has the full value


@dataclass
class ConfigInfo:
    """One exported config: what the card says about it."""

    name: str
    source: str  # the source folder as shown on the card
    data_dir: str
    rows: int
    files: list[str]
    columns: dict[str, str]  # name -> Arrow type
    kind: str
    origin: dict[str, Any] = field(default_factory=dict)  # from the folder's markers (folder_provenance)


def row_kind(columns) -> str:
    """The record kind (records.KINDS, or "rows") that a set of column names holds."""
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "preference"
    if "messages" in cols:
        return "conversation"
    if "prompt" in cols:
        return "prompt"
    return "document" if "text" in cols else "rows"


def _read_json(path: str) -> dict | None:
    try:
        data = json.loads(fs.read_text(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_provenance(folder: str) -> dict[str, Any]:
    """Counts of a pipeline output folder: kept rows, rejected, dead letters, and per-stage counts when recorded."""
    success = _read_json(fs.join(folder, "_SUCCESS.json")) or {}
    out: dict[str, Any] = {"kept": success.get("rows")}
    for sub, key in (("_rejected", "rejected"), ("_dead_letter", "dead_letter")):
        marker = _read_json(fs.join(folder, sub, "_SUCCESS.json"))
        if marker is not None:
            out[key] = marker.get("rows")
    if "exploded" in success:
        out["exploded"] = success["exploded"]
    report = _read_json(fs.join(folder, "_report.json"))
    if report and isinstance(report.get("stages"), list):
        out["job"] = report.get("name")
        out["stages"] = [
            {"stage": s.get("stage"), "in": s.get("rows_in"), "kept": s.get("kept"),
             "rejected": s.get("rejected") or {}, "dead_letter": s.get("dead_letter")}
            for s in report["stages"] if isinstance(s, dict)
        ]
    return out


def scrub(obj: Any) -> Any:
    """``stats.redact`` plus: the environment's Hub token is masked wherever it appears as text."""
    tokens = [os.environ[v] for v in _TOKEN_ENV if len(os.environ.get(v, "")) >= 8]

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {walk(k): walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, str):
            for token in tokens:
                value = value.replace(token, "***")
        return value

    return walk(redact(obj))


def size_category(rows: int) -> str:
    return next((name for limit, name in _SIZES if rows < limit), "n>1B")


def front_matter(title: str, license: str, configs: list[ConfigInfo]) -> dict[str, Any]:
    kinds = [c.kind for c in configs]
    tasks = sorted({t for k in kinds for t in KINDS[k][1]})
    tags = ["dataflywheel"] + sorted({t for k in kinds for t in KINDS[k][2]})
    meta: dict[str, Any] = {"license": license, "pretty_name": title, "tags": tags}
    if tasks:
        meta["task_categories"] = tasks
    meta["size_categories"] = [size_category(sum(c.rows for c in configs))]
    meta["configs"] = [
        {"config_name": c.name, "data_files": [{"split": "train", "path": f"{c.data_dir}/train-*"}],
         **({"default": True} if i == 0 else {})}
        for i, c in enumerate(configs)
    ]
    return meta


def render_card(
    title: str, license: str, configs: list[ConfigInfo], provenance: Mapping | None = None, empty: list[str] = ()
) -> str:
    """The whole README.md: front matter, overview, one section per config, provenance."""
    meta = yaml.safe_dump(scrub(front_matter(title, license, configs)), sort_keys=False, allow_unicode=True)
    lines = [f"---\n{meta}---", "", f"# {title}", "",
             "Exported by dataflywheel (pipeline outputs as Parquet in the Hub layout).", "",
             "| config | kind | rows | files |", "|---|---|---|---|"]
    lines += [f"| {_cell(c.name)} | {c.kind} | {c.rows} | {len(c.files)} |" for c in configs]
    if empty:
        lines += ["", "Not exported (no rows): " + ", ".join(f"`{n}`" for n in empty) + "."]
    first = configs[0].name
    lines += ["", "```python", "from datasets import load_dataset",
              f'ds = load_dataset("<this folder or its Hub id>", "{first}", split="train")', "```"]
    for c in configs:
        lines += _config_section(c)
    if provenance:
        lines += _provenance_section(scrub(dict(provenance)))
    return "\n".join(lines) + "\n"


def _config_section(c: ConfigInfo) -> list[str]:
    out = ["", f"## Config `{c.name}`", "", KINDS[c.kind][0], "",
           f"- rows: {c.rows} in {len(c.files)} file(s) under `{c.data_dir}/`", f"- source: `{c.source}`"]
    origin = scrub(c.origin)
    counts = [f"{k.replace('_', ' ')} {origin[k]}" for k in ("kept", "rejected", "dead_letter")
              if origin.get(k) is not None]
    if counts:
        out.append("- source counts: " + ", ".join(counts))
    if origin.get("exploded"):
        out.append(f"- multi-pair rows exploded: {_cell(origin['exploded'])}")
    out += ["", "| column | type |", "|---|---|"] + [f"| {_cell(n)} | `{_cell(t, None)}` |" for n, t in c.columns.items()]
    if origin.get("stages"):
        out += ["", f"Stages of job `{_cell(origin.get('job'))}`:", "",
                "| stage | in | kept | rejected | dead letter |", "|---|---|---|---|---|"]
        for s in origin["stages"]:
            reasons = ", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "0"
            out.append(f"| {_cell(s['stage'])} | {s['in']} | {s['kept']} | {_cell(reasons)} | {s['dead_letter']} |")
    return out


def _provenance_section(prov: dict) -> list[str]:
    out = ["", "## Provenance", ""]
    for key, value in prov.items():
        if isinstance(value, dict):
            out.append(f"- **{_cell(key)}**:")
            out += [f"  - {_cell(k)}: {_cell(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            cols = list(dict.fromkeys(k for v in value for k in v))
            out += ([""] if out[-1] else []) + [f"**{_cell(key)}**", "", "| " + " | ".join(_cell(c) for c in cols) + " |",
                    "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(_cell(v.get(c, "")) for c in cols) + " |" for v in value]
            out.append("")
        else:
            out.append(f"- **{_cell(key)}**: {_cell(value)}")
    body = json.dumps(prov, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", body)), default=0))
    return out + ["", "Full record:", "", f"{fence}json", body, fence]


def _cell(value: Any, limit: int | None = _MAX_CELL) -> str:
    """One markdown table cell / list item: JSON for structures, pipes escaped, one line, cut when long."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"
