"""The SFT selection pipeline (``dataflywheel select configs/sft_select.yaml``): a pool in, a training set out.

    instruction pool --dedup, decontamination--> scoring steps (IFD, Deita, InsTag tags; scores
    stay on the rows) --select: one method to a budget--> [mixture by group] --> training set

Scoring and deciding are separate (NeMo Curator's split; dolma's tag-then-mix): every score is
written to ``row["scores"]`` and kept in the output, and every model call is cached by (model,
text) when a step's ``cache`` is set, so a second run with another method, threshold or budget
recomputes nothing. Steps run in a fixed order, each taking its stage's options, ``{}`` or
``false`` (as ``curate``). ``select.method`` names a recipe, expanded here into plain stages:

- ``top``: the top ``budget`` / ``fraction`` rows by ``field`` (Cherry_LLM's IFD top-k, Li et al. 2024).
- ``deita``: rows ranked by ``field`` (default ``deita_score`` = sum over turns of complexity x
  quality), then Deita's representation filter (cosine <= 0.9 to every row already taken) until
  the budget is met (Liu et al. 2024, "What Makes Good Data for Alignment").
- ``superfiltering_d``: Superfiltering.D (Li et al. 2024): keep rows with ``field`` (IFD) in
  [0.9, 1.0], the top ``quality_fraction`` (0.2) of them, then facility location to the budget.
- ``instag``: InsTag's complexity-first diverse sampling over normalized tags (Lu et al. 2024).
- ``kcenter`` / ``kmeans`` / ``facility_location`` / ``repr_filter``: embedding diversity alone.
- ``none``: scores only; selection can be run later on the scored output.

Fractions are of the rows reaching that stage. The result is an ordinary run config, so every
engine, the report and the reconciliation (in == kept + rejected + dead letter) work as for ``run``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import InputConfig, OutputConfig, Strict, read_yaml
from ..filters.basic import ExactDedup
from ..filters.decontam import DecontamConfig, Decontaminate
from ..filters.dedup.stage import MinHashDedup, MinHashDedupConfig
from ..filters.perplexity import ScoreBand
from ..registry import StageSpec
from ..runner import RunnerConfig
from ..selectors.deita import CombineScores, CombineScoresConfig, DeitaScore, DeitaScoreConfig
from ..selectors.diversity_stage import Diversity
from ..selectors.ifd import IFD, IFDConfig
from ..selectors.instag import InsTagTag, InsTagTagConfig
from ..selectors.mixture import Mixture, MixtureConfig
from ..selectors.tag_normalize import InsTagNormalize, InsTagNormalizeConfig
from ..selectors.tag_sample import InsTagSample
from ..selectors.top import SelectRandom, SelectTop
from ..stages import StageConfig
from .config import RunConfig, one_job
from .steps import Step, parse_front_end, spec, step_specs


class SftSteps(Strict):
    exact_dedup: Step[StageConfig] = StageConfig()
    # Near-copies of one instruction are the commonest waste in merged SFT pools.
    minhash_dedup: Step[MinHashDedupConfig] = MinHashDedupConfig()
    decontaminate: Step[DecontamConfig] = None  # needs evaluation sets
    ifd: Step[IFDConfig] = None  # needs a model
    deita_score: Step[DeitaScoreConfig] = None  # needs a model
    instag_tag: Step[InsTagTagConfig] = None  # needs a generation backend
    instag_normalize: Step[InsTagNormalizeConfig] = None  # after instag_tag; needs the whole pool
    combine_scores: Step[CombineScoresConfig] = None  # e.g. ifd x instag_count as one ranking field


# Cheap, row-shrinking steps first; model scoring on what is left.
SFT_STEPS = {"exact_dedup": ExactDedup, "minhash_dedup": MinHashDedup, "decontaminate": Decontaminate, "ifd": IFD,
             "deita_score": DeitaScore, "instag_tag": InsTagTag, "instag_normalize": InsTagNormalize,
             "combine_scores": CombineScores}

Method = Literal["none", "random", "top", "deita", "superfiltering_d", "instag", "kcenter", "kmeans", "facility_location",
                 "repr_filter"]
# The score each ranking method reads when `field` is not given.
DEFAULT_FIELD = {"top": None, "deita": "deita_score", "superfiltering_d": "ifd"}


class SelectConfig(Strict):
    method: Method = "none"
    budget: int | None = Field(None, gt=0)  # rows to select
    fraction: float | None = Field(None, gt=0, le=1)  # or a share of the rows reaching selection
    field: str | None = None  # the score ranked by (top, deita, superfiltering_d); also diversity order
    # superfiltering_d's quality stage (Superfiltering's code_diversity_fla/do_fla.py)
    ifd_lower: float = 0.9
    ifd_upper: float = 1.0
    quality_fraction: float = Field(0.2, gt=0, le=1)  # the paper keeps the top 20% before diversity
    options: dict[str, Any] = {}  # the method's final stage's options (e.g. threshold, n_clusters, cache, seed)

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
    mixture: Step[MixtureConfig] = None  # the `mixture` stage's options (group_by, budget...), or off
    report: str | None = None
    extra_stages: list[StageSpec] = Field(default_factory=list)  # appended last, as in `run`


def select_stages(sel: SelectConfig, source: str = "<config>") -> list[StageSpec]:
    """The stages of a selection recipe (see the module docstring)."""
    size = {"budget": sel.budget} if sel.budget is not None else {"fraction": sel.fraction}
    field = sel.field or DEFAULT_FIELD.get(sel.method)
    where = ("select", "options")
    if sel.method == "none":
        return []
    if sel.method == "random":  # the equal-budget baseline for every other method
        return [spec(SelectRandom, {**size, **sel.options}, source, where)]
    if sel.method == "top":
        return [spec(SelectTop, {"field": field, **size, **sel.options}, source, where)]
    if sel.method == "instag":
        return [spec(InsTagSample, {**size, **sel.options}, source, where)]
    if sel.method == "deita":
        return [spec(Diversity, {"method": "repr_filter", "order_by": field, **size, **sel.options}, source, where)]
    if sel.method == "superfiltering_d":
        band = {"name": "ifd_band", "field": field, "min_value": sel.ifd_lower, "max_value": sel.ifd_upper}
        top = {"name": "ifd_top", "field": field, "fraction": sel.quality_fraction}
        return [spec(ScoreBand, band, source, ("select",)), spec(SelectTop, top, source, ("select",)),
                spec(Diversity, {"method": "facility_location", **size, **sel.options}, source, where)]
    opts = {"method": sel.method, **size, **({"order_by": sel.field} if sel.field else {}), **sel.options}
    return [spec(Diversity, opts, source, where)]


def sft_run(cfg: SftSelectConfig, source: str = "<config>") -> RunConfig:
    """The run config of a typed selection config."""
    stages = step_specs(cfg.steps, SFT_STEPS) + select_stages(cfg.select, source)
    if cfg.mixture is not None:
        stages.append(StageSpec.of(Mixture, cfg.mixture))
    return one_job(cfg.name, cfg.runner, cfg.input, stages + cfg.extra_stages, cfg.output, cfg.report)


def sft_run_config(data: Any, source: str = "<config>", inputs: list[str] | None = None,
                   output: str | None = None) -> RunConfig:
    """An SFT selection config (mapping) -> the equivalent run config; ``inputs``/``output`` override the file's."""
    cfg = parse_front_end(SftSelectConfig, data, source, inputs, output, input_defaults={"kind": "conversation"})
    return sft_run(cfg, source)


def load_sft_config(path: str | os.PathLike, inputs: list[str] | None = None, output: str | None = None) -> RunConfig:
    return sft_run_config(read_yaml(path), str(path), inputs, output)
