"""Run configs (``dataflywheel run CONFIG``): one job (``input`` / ``stages`` / ``output``) or several
under ``jobs:``, plus ``runner`` settings. Every pipeline front-end (curate, select, synth, pairs,
the flywheel's Beam stages) builds the same ``RunConfig`` and runs it the same way.

A job's ``stages`` are ``StageSpec``s, each validated once against its stage's own config,
however the ``JobConfig`` was made (a YAML file, a front-end's builder, a test). A job may also
name a front-end's config file, which runs exactly as that command would run it (under this
file's runner), with ``input`` / ``output`` overriding its paths as ``--input`` / ``--output`` do:

    jobs:
      - curate: configs/web.yaml
        output: runs/demo/web
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field

from ..config import InputConfig, OutputConfig, Strict, mapping, read_yaml, validate
from ..errors import UserError
from ..registry import StageSpec
from ..runner import RunnerConfig
from ..stages import Stage


class JobConfig(Strict):
    name: str = "job"
    input: InputConfig
    stages: list[StageSpec] = []
    output: OutputConfig

    def build_stages(self) -> list[Stage]:
        stages = [spec.build() for spec in self.stages]
        seen: dict[str, int] = {}
        for stage in stages:  # instance names must be unique: they key the report
            seen[stage.name] = seen.get(stage.name, 0) + 1
            if seen[stage.name] > 1:
                stage.name = f"{stage.name}#{seen[stage.name]}"
        return stages


class RunConfig(Strict):
    name: str = "run"
    runner: RunnerConfig = RunnerConfig()
    jobs: list[JobConfig] = Field(min_length=1)
    report: str | None = None  # also save every job's report here (each job saves <output>/_report.json)


def _single_job(data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The single-job form (``input`` / ``stages`` / ``output`` at the top) as ``jobs: [job]``."""
    if "jobs" in data or "input" not in data:
        return data, False
    job_keys = set(JobConfig.model_fields)
    job = {k: v for k, v in data.items() if k in job_keys}
    run = {k: v for k, v in data.items() if k not in job_keys}
    if "name" in job:
        run["name"] = job["name"]
    return {**run, "jobs": [job]}, True


FRONT_ENDS = ("curate", "select", "pairs")


def load_front_end(kind: str, path: str | os.PathLike, inputs: list[str] | None = None,
                   output: str | None = None) -> RunConfig:
    """A front-end's config file (``curate``, ``select``, ``pairs``) as the run config it builds."""
    from .pairs import load_pairs_config
    from .sft import load_sft_config
    from .web import load_web_config

    load = {"curate": load_web_config, "select": load_sft_config, "pairs": load_pairs_config}[kind]
    return load(path, inputs, output)


def _front_end_jobs(entry: dict[str, Any], source: str) -> list[Any]:
    """The jobs of a job entry naming a front-end config (``curate: FILE``), else the entry itself."""
    named = [key for key in FRONT_ENDS if key in entry]
    if not named:
        return [entry]
    extra = set(entry) - {named[0], "input", "output"}
    if len(named) > 1 or extra:
        raise UserError(f"{source}: a job naming a {named[0]} config takes only input and output "
                        f"(paths overriding the file's), not {sorted(extra) or named[1:]}")
    inputs = entry.get("input")
    run = load_front_end(named[0], entry[named[0]], [inputs] if isinstance(inputs, str) else inputs, entry.get("output"))
    return list(run.jobs)


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    """A run config from a mapping (``${VAR}``s expanded); errors name keys as the user wrote them
    (a single-job file's ``stages[2]``, not ``jobs[0].stages[2]``)."""
    data, single = _single_job(mapping(data, source))
    if isinstance(data.get("jobs"), list):
        data["jobs"] = [job for entry in data["jobs"]
                        for job in (_front_end_jobs(entry, source) if isinstance(entry, dict) else [entry])]
    return validate(RunConfig, data, source, drop_prefix=("jobs", 0) if single else ())


def load_config(path: str | os.PathLike) -> RunConfig:
    return parse_config(read_yaml(path), str(path))


def one_job(name: str, runner: RunnerConfig, input: InputConfig, stages: list[StageSpec], output: OutputConfig,
            report: str | None = None) -> RunConfig:
    """The run config of a one-job front-end (curate, select, synth): built from typed parts."""
    job = JobConfig(name=name, input=input, stages=stages, output=output)
    return RunConfig(name=name, runner=runner, jobs=[job], report=report)
