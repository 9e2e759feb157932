"""Stage registry: config names -> stage classes.

Built-in stages register themselves with ``@register("name")`` in the modules listed in
``BUILTIN_MODULES``; a user's own stage is named by import path, ``my_pkg.my_module:MyStage``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from .errors import UserError
from .stages import Stage

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
