"""YAML configs validated by pydantic, with one-line errors naming file, key and what is allowed.

A config file is one job (``input`` / ``stages`` / ``output``) or several under ``jobs:``, plus
``runner`` settings. Relative paths are taken from the current directory. ``${VAR}`` in a string
is replaced by that environment variable (for secrets: never write them into the YAML).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import UserError
from .io.sink import ROWS_PER_SHARD
from .runner import RunnerConfig
from .stages import Stage, StageConfig


class Strict(BaseModel):
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


class JobConfig(Strict):
    name: str = "job"
    input: InputConfig
    stages: list[dict[str, Any]] = []
    output: OutputConfig
    _stage_configs: list[StageConfig] = PrivateAttr(default_factory=list)  # filled by parse_config

    def build_stages(self) -> list[Stage]:
        from .registry import stage_class

        stages = [stage_class(spec["stage"])(cfg) for spec, cfg in zip(self.stages, self._stage_configs)]
        seen: dict[str, int] = {}
        for stage in stages:  # instance names must be unique: they key the report
            seen[stage.name] = seen.get(stage.name, 0) + 1
            if seen[stage.name] > 1:
                stage.name = f"{stage.name}#{seen[stage.name]}"
        return stages


class RunConfig(Strict):
    name: str = "run"
    runner: RunnerConfig = RunnerConfig()
    jobs: list[JobConfig]
    report: str | None = None  # where to save the JSON run report; default <first output>/_report.json


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def format_validation_error(err: ValidationError, source: str, prefix: tuple = (), model: type[BaseModel] | None = None) -> str:
    # A typo shows up as an unknown key *and* a missing one; the unknown key is the useful half.
    e = sorted(err.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = prefix + tuple(e["loc"])
    msg = e["msg"]
    if e["type"] == "extra_forbidden" and model is not None:
        allowed = sorted(_fields_at(model, tuple(e["loc"])[:-1]))
        msg = f"unknown key; allowed: {', '.join(allowed)}"
    elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], (dict, list)):
        msg += f" (got {e['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {_where(loc)}: {msg}{more}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at ``loc``, for 'allowed:' hints."""
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        ann = getattr(info, "annotation", None)
        args = getattr(ann, "__args__", ()) or (ann,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(obj: Any, source: str) -> Any:
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


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = expand_env(data, source)
    if "jobs" not in data and "input" in data:  # single-job form
        job_keys = set(JobConfig.model_fields)
        job = {k: v for k, v in data.items() if k in job_keys}
        data = {**{k: v for k, v in data.items() if k not in job_keys}, "jobs": [job]}
        if "name" in job:
            data["name"] = job["name"]
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, model=RunConfig)) from None
    from .registry import stage_class

    for j, job in enumerate(cfg.jobs):
        configs = []
        for i, spec in enumerate(job.stages):
            where = ("jobs", j, "stages", i) if len(cfg.jobs) > 1 else ("stages", i)
            if "stage" not in spec:
                raise UserError(f"{source}: {_where(where)}: missing key 'stage' (the stage's registered name)")
            try:
                cls = stage_class(str(spec["stage"]))
            except UserError as err:
                raise UserError(f"{source}: {_where(where + ('stage',))}: {err}") from None
            params = {k: v for k, v in spec.items() if k != "stage"}
            try:
                configs.append(cls.Config.model_validate(params))
            except ValidationError as err:
                raise UserError(format_validation_error(err, source, where, model=cls.Config)) from None
        job._stage_configs = configs
    return cfg


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
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}{where}: invalid YAML: {problem}") from None


def load_config(path: str | os.PathLike) -> RunConfig:
    return parse_config(read_yaml(path), str(path))
