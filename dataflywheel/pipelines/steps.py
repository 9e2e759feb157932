"""Typed pipeline steps -> stage specs (shared by the front-ends: curate, select, synth, pairs).

A front-end config names *steps* in a fixed order rather than a free stage list. Each step is a
field typed with its stage's own config (``Step[LangIdConfig]``): ``{...}`` gives options, ``{}``
or ``true`` the stage's defaults, ``false`` skips the step. So options are validated once, when
the front-end's config is, and a mistake is reported as ``steps.langid.threshold`` in the user's
file. A step table maps each field to its stage class, in the order the stages run.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ValidationError

from ..config import error_lines, mapping, validate
from ..errors import UserError
from ..registry import StageSpec
from ..stages import Stage, StageConfig

C = TypeVar("C")
M = TypeVar("M", bound=BaseModel)


def _step(value: Any) -> Any:
    if value is True:
        return {}
    if value is False:
        return None
    return value


# A step's config; ``true`` means the defaults and ``false`` (None) skips it.
Step = Annotated[C | None, BeforeValidator(_step)]


def step_specs(steps: BaseModel, table: dict[str, type[Stage]]) -> list[StageSpec]:
    """The stage specs of the steps that are on, in the table's order."""
    return [StageSpec.of(cls, getattr(steps, key)) for key, cls in table.items() if getattr(steps, key) is not None]


def spec(stage: type[Stage] | str, options: StageConfig | dict[str, Any], source: str, where: tuple) -> StageSpec:
    """A stage spec from options a front-end assembled (e.g. a selection recipe's), with errors
    located at ``where`` in the user's file."""
    try:
        return StageSpec.of(stage, options)
    except ValidationError as err:
        raise UserError("\n".join(error_lines(err, source, prefix=where))) from None


def parse_front_end(model: type[M], data: Any, source: str, inputs: list[str] | None = None,
                    output: str | None = None, input_defaults: dict[str, Any] | None = None) -> M:
    """A front-end config from a mapping: ``${VAR}``s expanded, ``inputs`` / ``output`` (the
    command line's ``--input`` / ``--output``) overriding the file's, ``input_defaults`` under the
    file's ``input`` (a front-end's record kind)."""
    data = mapping(data, source)
    data["input"] = {**(input_defaults or {}), **(data.get("input") or {}), **({"paths": inputs} if inputs else {})}
    if output:
        data["output"] = {**(data.get("output") or {}), "path": output}
    return validate(model, data, source)
