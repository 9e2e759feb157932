"""Named pipeline steps -> an ordinary stage list (shared by ``curate`` and ``select``).

A pipeline config (web.yaml, sft_select.yaml) names *steps* in a fixed order rather than a free
stage list: each step takes its stage's options, ``{}`` for the defaults, or ``false`` to skip it.
Options are validated here, against the stage's own config, so a mistake is reported as
``steps.<step>.<option>`` in the user's file rather than as ``stages[i]`` of a list they never wrote.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..config import RunConfig, expand_env, format_validation_error, parse_config
from ..errors import UserError

M = TypeVar("M", bound=BaseModel)

Step = dict[str, Any] | bool
StepOrder = list[tuple[str, str, dict[str, Any]]]  # (step key, registered stage, defaults under the user's options)


def stage_spec(stage: str, options: dict[str, Any], source: str, where: tuple) -> dict[str, Any]:
    """``{"stage": stage, **options}`` after checking the options against the stage's config."""
    from ..registry import stage_class

    cls = stage_class(stage).Config
    try:
        cls.model_validate(options)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, where, model=cls)) from None
    return {"stage": stage, **options}


def expand_steps(order: StepOrder, steps: BaseModel, source: str = "<config>") -> list[dict[str, Any]]:
    """The stage list: fixed order, step defaults under the user's options, skipped steps out."""
    stages = []
    for key, stage, defaults in order:
        value = getattr(steps, key)
        if value is False:
            continue
        options = {**defaults, **(value if isinstance(value, dict) else {})}
        stages.append(stage_spec(stage, options, source, ("steps", key)))
    return stages


def parse_pipeline(model: type[M], data: Any, source: str, inputs: list[str] | None = None,
                   output: str | None = None, input_defaults: dict[str, Any] | None = None) -> M:
    """A pipeline config mapping, ``${VAR}``s expanded and ``inputs``/``output`` overriding the file's."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = expand_env(dict(data), source)
    data["input"] = {**(input_defaults or {}), **(data.get("input") or {}), **({"paths": inputs} if inputs else {})}
    if output:
        data["output"] = {**(data.get("output") or {}), "path": output}
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, model=model)) from None


def one_job_run(cfg: Any, stages: list[dict[str, Any]], source: str) -> RunConfig:
    """The run config of a one-job pipeline config (name, runner, input, output, report, extra_stages)."""
    job = {"name": cfg.name, "input": cfg.input.model_dump(), "output": cfg.output.model_dump(),
           "stages": stages + cfg.extra_stages}
    run = {"name": cfg.name, "runner": cfg.runner.model_dump(exclude_unset=True), "jobs": [job], "report": cfg.report}
    return parse_config(run, source)
