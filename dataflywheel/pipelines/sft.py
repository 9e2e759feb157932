"""The SFT selection pipeline (``dataflywheel select configs/sft_select.yaml``): a pool in, a training set out.

    instruction pool --dedup, decontamination--> scoring steps (IFD, Deita, InsTag tags; scores
    stay on the rows) --select: one method to a budget--> [mixture by group] --> training set

Scoring and deciding are separate (NeMo Curator's split; dolma's tag-then-mix): every score is
written to ``row["scores"]`` and kept in the output, and every model call is cached by (model,
text) when a step's ``cache`` is set, so a second run with another method, threshold or budget
recomputes nothing. Steps run in a fixed order, each taking its stage's options, ``{}`` or
``false`` (as ``curate``). ``select.method`` names a recipe, expanded here into plain stages:

- ``top``: the top ``budget`` / ``fraction`` rows by ``field`` (Cherry_LLM's IFD top-k, REFERENCES §3.1).
- ``deita``: rows ranked by ``field`` (default ``deita_score`` = sum over turns of complexity x
  quality), then Deita's representation filter (cosine <= 0.9 to every row already taken) until
  the budget is met (REFERENCES §3.4).
- ``superfiltering_d``: Superfiltering.D (REFERENCES §3.2): keep rows with ``field`` (IFD) in
  [0.9, 1.0], the top ``quality_fraction`` (0.2) of them, then facility location to the budget.
- ``instag``: InsTag's complexity-first diverse sampling over normalized tags (REFERENCES §3.3).
- ``kcenter`` / ``kmeans`` / ``facility_location`` / ``repr_filter``: embedding diversity alone.
- ``none``: scores only; selection can be run later on the scored output.

Fractions are of the rows reaching that stage. The result is an ordinary run config, so every
engine, the report and the reconciliation (in == kept + rejected + dead letter) work as for ``run``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import (
    InputConfig,
    OutputConfig,
    RunConfig,
    Strict,
    read_yaml,
)
from ..runner import RunnerConfig
from .steps import Step, StepOrder, expand_steps, one_job_run, parse_pipeline, stage_spec

# Cheap, row-shrinking steps first; model scoring on what is left (step key, stage, defaults).
SFT_STEPS: StepOrder = [
    ("exact_dedup", "exact_dedup", {}),
    ("minhash_dedup", "minhash_dedup", {}),
    ("decontaminate", "decontaminate", {}),
    ("ifd", "ifd", {}),
    ("deita_score", "deita_score", {}),
    ("instag_tag", "instag_tag", {}),
    ("instag_normalize", "instag_normalize", {}),
    ("combine_scores", "combine_scores", {}),
]


class SftSteps(Strict):
    exact_dedup: Step = True
    # Near-copies of one instruction are the commonest waste in merged SFT pools (REFERENCES §7 idea 3).
    minhash_dedup: Step = True
    decontaminate: Step = False  # needs eval sets
    ifd: Step = False  # needs a model
    deita_score: Step = False  # needs a model
    instag_tag: Step = False  # needs a generation backend
    instag_normalize: Step = False  # after instag_tag; needs the whole pool
    combine_scores: Step = False  # e.g. ifd x instag_count as one ranking field


Method = Literal["none", "random", "top", "deita", "superfiltering_d", "instag", "kcenter", "kmeans", "facility_location",
                 "repr_filter"]
# The score each ranking method reads when `field` is not given.
DEFAULT_FIELD = {"top": None, "deita": "deita_score", "superfiltering_d": "ifd"}


class SelectConfig(Strict):
    method: Method = "none"
    budget: int | None = Field(None, gt=0)  # rows to select
    fraction: float | None = Field(None, gt=0, le=1)  # or a share of the rows reaching selection
    field: str | None = None  # the score ranked by (top, deita, superfiltering_d); also diversity order
    # superfiltering_d's quality stage (Superfiltering code_diversity_fla/do_fla.py, REFERENCES §3.2)
    ifd_lower: float = 0.9
    ifd_upper: float = 1.0
    quality_fraction: float = Field(0.2, gt=0, le=1)  # the paper keeps the top 20% before diversity
    options: dict[str, Any] = {}  # passed to the method's final stage (e.g. threshold, part, n_clusters, cache)

    @model_validator(mode="after")
    def _budget(self) -> SelectConfig:
        if self.method != "none" and (self.budget is None) == (self.fraction is None):
            raise ValueError(f"method {self.method}: give exactly one of budget or fraction")
        if self.method == "top" and not self.field:
            raise ValueError("method top needs field (the score to rank by, e.g. ifd)")
        return self


class SftSelectConfig(Strict):
    name: str = "sft_select"
    runner: RunnerConfig = RunnerConfig()
    input: InputConfig
    output: OutputConfig
    steps: SftSteps = SftSteps()
    select: SelectConfig = SelectConfig()
    mixture: dict[str, Any] | Literal[False] = False  # `mixture` stage options (group_by, budget...), or false
    report: str | None = None
    extra_stages: list[dict[str, Any]] = Field(default_factory=list)  # appended last, as in `run`


def select_stages(sel: SelectConfig, source: str = "<config>") -> list[dict[str, Any]]:
    """The stages of a selection recipe (see the module docstring)."""
    size = {"budget": sel.budget} if sel.budget is not None else {"fraction": sel.fraction}
    field = sel.field or DEFAULT_FIELD.get(sel.method)
    where = ("select", "options")
    if sel.method == "none":
        return []
    if sel.method == "random":  # the equal-budget baseline for every other method
        return [stage_spec("select_random", {**size, **sel.options}, source, where)]
    if sel.method == "top":
        return [stage_spec("select_top", {"field": field, **size, **sel.options}, source, where)]
    if sel.method == "instag":
        return [stage_spec("instag_sample", {**size, **sel.options}, source, where)]
    if sel.method == "deita":
        opts = {"method": "repr_filter", "order_by": field, **size, **sel.options}
        return [stage_spec("diversity", opts, source, where)]
    if sel.method == "superfiltering_d":
        band = {"name": "ifd_band", "field": field, "min_value": sel.ifd_lower, "max_value": sel.ifd_upper}
        top = {"name": "ifd_top", "field": field, "fraction": sel.quality_fraction}
        return [stage_spec("score_band", band, source, ("select",)),
                stage_spec("select_top", top, source, ("select",)),
                stage_spec("diversity", {"method": "facility_location", **size, **sel.options}, source, where)]
    opts = {"method": sel.method, **size, **({"order_by": sel.field} if sel.field else {}), **sel.options}
    return [stage_spec("diversity", opts, source, where)]


def sft_run_config(data: Any, source: str = "<config>", inputs: list[str] | None = None,
                   output: str | None = None) -> RunConfig:
    """An SFT selection config (mapping) -> the equivalent run config; ``inputs``/``output`` override the file's."""
    cfg = parse_pipeline(SftSelectConfig, data, source, inputs, output, input_defaults={"kind": "conversation"})
    stages = expand_steps(SFT_STEPS, cfg.steps, source) + select_stages(cfg.select, source)
    if cfg.mixture is not False:
        stages.append(stage_spec("mixture", cfg.mixture, source, ("mixture",)))
    return one_job_run(cfg, stages, source)


def load_sft_config(path: str | os.PathLike, inputs: list[str] | None = None, output: str | None = None) -> RunConfig:
    return sft_run_config(read_yaml(Path(path)), str(path), inputs, output)
