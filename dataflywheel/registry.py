"""Stage registry: config names -> stage classes, and ``StageSpec``: one stage of a config,
validated once.

Built-in stages register themselves with ``@register("name")`` in the modules listed in
``BUILTIN_MODULES``; a user's own stage is named by import path, ``my_pkg.my_module:MyStage``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializationInfo,
    SerializeAsAny,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import UserError
from .stages import Stage, StageConfig

S = TypeVar("S", bound=type[Stage])
STAGES: dict[str, type[Stage]] = {}
BUILTIN_MODULES = (
    "dataflywheel.filters.basic",
    "dataflywheel.filters.dedup.stage",
    "dataflywheel.filters.extract",
    "dataflywheel.filters.langid",
    "dataflywheel.filters.perplexity",
    "dataflywheel.filters.quality",
    "dataflywheel.filters.url",
    "dataflywheel.filters.safety",
    "dataflywheel.filters.decontam",
    "dataflywheel.synth.generate",
    "dataflywheel.synth.score",
    "dataflywheel.synth.judge",
    "dataflywheel.synth.pairs",
    "dataflywheel.selectors.instag",
    "dataflywheel.selectors.tag_normalize",
    "dataflywheel.selectors.tag_sample",
    "dataflywheel.selectors.deita",
    "dataflywheel.selectors.mixture",
    "dataflywheel.selectors.ifd",
    "dataflywheel.selectors.diversity_stage",
    "dataflywheel.selectors.top",
)


def register(name: str) -> Callable[[S], S]:
    def wrap(cls: S) -> S:
        if STAGES.get(name, cls) is not cls:
            raise ValueError(f"stage name {name!r} registered twice ({STAGES[name].__module__}, {cls.__module__})")
        cls.stage_name = name
        STAGES[name] = cls
        return cls

    return wrap


def load_builtins() -> dict[str, type[Stage]]:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return STAGES


def stage_class(name: str) -> type[Stage]:
    """The class for a config's ``stage:`` value; UserError listing what is allowed."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise UserError(f"cannot import stage {name!r}: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise UserError(f"{name!r} is not a dataflywheel Stage subclass")
        return cls
    load_builtins()
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; allowed: {', '.join(sorted(STAGES))} (or module:Class)")
    return STAGES[name]


def _spec_error(kind: str, message: str, value: Any, loc: tuple = ("stage",)) -> ValidationError:
    error = InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)
    return ValidationError.from_exception_data("StageSpec", [error])


def _with_allowed_keys(err: ValidationError, config: type[StageConfig]) -> ValidationError:
    """The stage config's errors, an unknown key naming the keys the stage allows."""
    allowed = ", ".join(sorted(config.model_fields))
    errors = []
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            error = PydanticCustomError("extra_forbidden", "unknown key; allowed: {allowed}", {"allowed": allowed})
            errors.append(InitErrorDetails(type=error, loc=e["loc"], input=e["input"]))
        else:
            errors.append(InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]), loc=e["loc"], input=e["input"]))
    return ValidationError.from_exception_data("StageSpec", errors)


class StageSpec(BaseModel):
    """One stage of a job: its registered name (or ``module:Class``) and its validated config.

    Written in YAML as ``{stage: NAME, **options}``; validated here, once, against the stage's own
    ``Config`` (every problem reported with its key), whichever way the spec was made.
    """

    model_config = ConfigDict(frozen=True)

    stage: str
    config: SerializeAsAny[StageConfig]

    @model_validator(mode="before")
    @classmethod
    def _from_options(cls, data: Any) -> Any:
        if isinstance(data, StageSpec):
            return data
        if not isinstance(data, dict) or "stage" not in data:
            got = type(data).__name__ if not isinstance(data, dict) else "no 'stage' key"
            raise _spec_error("missing_stage", "expected {stage: NAME, ...options} (got " + got + ")", data, ())
        name = data["stage"]
        try:
            stage_cls = stage_class(str(name))
        except UserError as err:
            raise _spec_error("unknown_stage", str(err), name) from None
        if isinstance(data.get("config"), StageConfig) and set(data) == {"stage", "config"}:
            options: Any = data["config"]
        else:
            options = {k: v for k, v in data.items() if k != "stage"}
        if isinstance(options, stage_cls.Config):
            return {"stage": str(name), "config": options}
        try:
            return {"stage": str(name), "config": stage_cls.Config.model_validate(
                options.model_dump(exclude_unset=True) if isinstance(options, BaseModel) else options)}
        except ValidationError as err:
            raise _with_allowed_keys(err, stage_cls.Config) from None

    @model_serializer
    def _as_options(self, info: SerializationInfo) -> dict[str, Any]:
        return {"stage": self.stage, **self.config.model_dump(mode=info.mode)}

    @classmethod
    def of(cls, stage: type[Stage] | str, config: StageConfig | dict[str, Any] | None = None) -> StageSpec:
        """A spec from a stage class (or name) and its config (or options)."""
        name = stage if isinstance(stage, str) else stage.stage_name
        if isinstance(config, StageConfig):
            return cls.model_validate({"stage": name, "config": config})
        return cls.model_validate({"stage": name, **(config or {})})

    def build(self) -> Stage:
        return stage_class(self.stage)(self.config)
