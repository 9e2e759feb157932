"""The one way a YAML config becomes a typed config, for every kind (run, pipelines, synth,
training, flywheel), with one error format.

``load_yaml(path, Model)`` reads the file, expands ``${VAR}`` from the environment (for secrets:
never write them into the YAML), applies command-line overrides and validates. Every problem
pydantic finds is reported, one line each, naming the file, the key and what is allowed or was
given: ``configs/web.yaml: steps.langid.threshold: Input should be less than 1 (got 1.5)``.

Also here: the input and output sections every pipeline shares. Relative paths are taken from
the current directory. This module knows no stage, pipeline or trainer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError
from .io.sink import ROWS_PER_SHARD

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class InputConfig(Strict):
    paths: list[str]  # files, folders or globs
    format: Literal["auto", "jsonl", "parquet", "hf", "warc", "html"] = "auto"
    kind: Literal["document", "conversation", "preference", "prompt"] = "document"
    batch_rows: int = Field(1000, gt=0)  # rows per element between Beam stages (amortizes per-element cost)
    options: dict[str, Any] = {}  # passed to the reader, e.g. max_line_bytes

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class OutputConfig(Strict):
    path: str
    format: Literal["jsonl", "jsonl.gz", "jsonl.zst", "parquet"] = "jsonl"
    rows_per_shard: int = Field(ROWS_PER_SHARD, gt=0)
    write_rejected: bool = True  # rejected rows go to <path>/_rejected, dead letters to <path>/_dead_letter


# ---- errors ----------------------------------------------------------------------------------------

def where(loc: tuple) -> str:
    """A pydantic location as the user wrote it: ``stages[2].threshold``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the (nested) model at ``loc``, for 'allowed:' hints; None when unknown."""
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        ann = getattr(info, "annotation", None)
        args = getattr(ann, "__args__", ()) or (ann,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return list(model.model_fields)


def error_lines(err: ValidationError, source: str, model: type[BaseModel] | None = None,
                drop_prefix: tuple = (), prefix: tuple = ()) -> list[str]:
    """One line per problem: ``source: key: message``. A typo shows up as an unknown key (listed
    first, with the allowed keys) and often as a missing one. ``drop_prefix`` hides a location the
    user never wrote (a single-job file validated as ``jobs[0]``); ``prefix`` places a section
    validated on its own where it sits in the file."""
    lines = []
    for e in sorted(err.errors(), key=lambda x: x["type"] != "extra_forbidden"):
        loc = tuple(e["loc"])
        if drop_prefix and loc[:len(drop_prefix)] == drop_prefix:
            loc = loc[len(drop_prefix):]
        loc = prefix + loc
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and "allowed" not in (e.get("ctx") or {}):  # else it says them
            allowed = _fields_at(model, tuple(e["loc"])[:-1]) if model else None
            msg = "unknown key" + (f"; allowed: {', '.join(sorted(allowed))}" if allowed else "")
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {where(loc)}: {msg}")
    return lines


def validate(model: type[M], data: Any, source: str, drop_prefix: tuple = ()) -> M:
    """``model`` from ``data``, or a UserError with every problem, one line each."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError("\n".join(error_lines(err, source, model, drop_prefix))) from None


# ---- YAML --------------------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(obj: Any, source: str) -> Any:
    """``${VAR}`` in every string replaced by that environment variable (a UserError when unset)."""
    if isinstance(obj, str):
        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise UserError(f"{source}: environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]
        return _ENV.sub(sub, obj)
    if isinstance(obj, dict):
        return {k: expand_env(v, source) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, source) for v in obj]
    return obj


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's data; one-line errors for a missing file or bad YAML (with its line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read config: {err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}{line}: invalid YAML: {problem}") from None


def mapping(data: Any, source: str) -> dict[str, Any]:
    """A config's top level, which must be a mapping; ``${VAR}``s expanded."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return expand_env(data, source)


def load_yaml(path: str | os.PathLike, model: type[M], overrides: dict[str, Any] | None = None,
              prepare: Callable[[dict[str, Any], str], dict[str, Any]] | None = None) -> M:
    """Read, expand ``${VAR}``, apply ``overrides`` (None values ignored), ``prepare`` (a config
    kind's own reshaping) and validate: the one loader of every config file."""
    source = str(path)
    data = mapping(read_yaml(path), source)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if prepare is not None:
        data = prepare(data, source)
    return validate(model, data, source)
