"""The preference-data pipeline (``dataflywheel pairs configs/pairs.yaml``): prompts in, pairs and
best-of-N SFT rows out.

    prompts --generate (n samples, per-sample seeds, cached)--> scorers (reward_model / judge /
    verify, in order) --> <output>/scored --pairs [--> pair_quantile]--> <output>/pairs
                                                   \\--best_of_n--> <output>/sft

It expands to an ordinary multi-job run config, so every engine, the report and the per-job
reconciliation (in == kept + rejected + dead letter) work as for ``run``. Scored samples are
written once (``scored``, JSONL: nested, mixed-type scores) and both builders read them, so a pair
can be re-thresholded or re-built with another method without regenerating or rescoring; the
generation cache makes a re-run of the first job cheap too.

Multi-pair methods (``all_pairs``, ``rso``) yield one row per prompt with a ``pairs`` list (a
Scorer is one row out per row in); they are exploded after the job, over the written output,
by ``explode_output``: new hidden shards, then the same finalize as the sink (old parts replaced,
``_SUCCESS.json`` last), so a reader never sees a half-exploded folder as complete. The counts
land in ``_SUCCESS.json`` (``exploded``: rows in, pairs out). ``pair_quantile`` needs every pair
as a row, so it is only allowed with the single-pair methods (west_of_n, max_min).

Provenance: the builders write ``meta.policy`` (the generate backend's model), ``meta.round``
(a prompt row's own ``meta.round``, else this config's ``round``), sampling and scorers.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, model_validator

from ..config import InputConfig, OutputConfig, Strict, read_yaml
from ..errors import UserError
from ..registry import StageSpec, stage_class
from ..runner import RunnerConfig
from ..stages import Scorer
from ..synth.generate import Generate, GenerateConfig
from ..synth.pairs import BestOfN, BestOfNConfig, PairQuantile, PairQuantileConfig, Pairs, PairsConfig
from .config import JobConfig, RunConfig
from .steps import Step, parse_front_end

MULTI_PAIR = ("all_pairs", "rso")
SCORED, PAIRS, SFT = "scored", "pairs", "sft"


class PairsPipelineConfig(Strict):
    name: str = "pairs"
    round: int = Field(0, ge=0)  # the flywheel round these samples belong to (provenance)
    runner: RunnerConfig = RunnerConfig()
    input: InputConfig
    output: OutputConfig  # a folder: scored/, pairs/, sft/ inside; format applies to pairs and sft
    generate: GenerateConfig  # backend (with cache), sampling (n >= 2)
    scorers: list[StageSpec] = Field(min_length=1)  # [{stage: reward_model|judge|verify, ...options}], in order
    pairs: Step[PairsConfig] = PairsConfig()  # the pair builder, or false
    best_of_n: Step[BestOfNConfig] = None  # a second output, the SFT set
    pair_quantile: Step[PairQuantileConfig] = None  # West-of-N's confidence filter over all pairs

    report: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PairsPipelineConfig:
        n = self.generate.sampling.n
        if n < 2:
            raise ValueError(f"generate.sampling.n must be >= 2 to build pairs or pick a best of N (got {n})")
        if self.pairs is None and self.best_of_n is None:
            raise ValueError("nothing to build: give pairs and/or best_of_n")
        not_scorers = [s.stage for s in self.scorers if not issubclass(stage_class(s.stage), Scorer)]
        if not_scorers:
            raise ValueError(f"scorers must be scoring stages (reward_model, judge, verify), not {not_scorers}")
        if self.pair_quantile is not None and (self.pairs is None or self.pairs.method in MULTI_PAIR):
            method = None if self.pairs is None else self.pairs.method
            raise ValueError(f"pair_quantile needs pairs with a single-pair method (west_of_n, max_min), not {method}")
        return self


def output_dirs(base: str) -> dict[str, str]:
    return {k: os.path.join(base, k) for k in (SCORED, PAIRS, SFT)}


def _with_round(cfg: PairsConfig | BestOfNConfig, k: int) -> PairsConfig | BestOfNConfig:
    """The builder's config with this pipeline's round, unless the config gives its own."""
    return cfg if "round" in cfg.model_fields_set else cfg.model_copy(update={"round": k})


def pairs_run(cfg: PairsPipelineConfig) -> RunConfig:
    """The run config of a typed pairs config: jobs sample, then pairs and/or best_of_n over its output."""
    dirs = output_dirs(cfg.output.path)
    sample = [StageSpec.of(Generate, cfg.generate), *cfg.scorers]
    jobs = [JobConfig(name=f"{cfg.name}-sample", input=cfg.input, stages=sample,
                      output=cfg.output.model_copy(update={"path": dirs[SCORED], "format": "jsonl"}))]
    # Scored rows keep `prompt` (n >= 2), so they read back as prompt rows, checked like the input.
    scored = InputConfig(paths=[dirs[SCORED]], kind="prompt", batch_rows=cfg.input.batch_rows)
    if cfg.pairs is not None:
        stages = [StageSpec.of(Pairs, _with_round(cfg.pairs, cfg.round))]
        if cfg.pair_quantile is not None:
            stages.append(StageSpec.of(PairQuantile, cfg.pair_quantile))
        jobs.append(JobConfig(name=f"{cfg.name}-pairs", input=scored, stages=stages,
                              output=cfg.output.model_copy(update={"path": dirs[PAIRS]})))
    if cfg.best_of_n is not None:
        stages = [StageSpec.of(BestOfN, _with_round(cfg.best_of_n, cfg.round))]
        jobs.append(JobConfig(name=f"{cfg.name}-best_of_n", input=scored, stages=stages,
                              output=cfg.output.model_copy(update={"path": dirs[SFT]})))
    return RunConfig(name=cfg.name, runner=cfg.runner, jobs=jobs, report=cfg.report)


def pairs_run_config(data: Any, source: str = "<config>", inputs: list[str] | None = None,
                     output: str | None = None) -> RunConfig:
    """A pairs config (mapping) -> the equivalent run config (jobs sample, pairs, best_of_n)."""
    return pairs_run(parse_front_end(PairsPipelineConfig, data, source, inputs, output,
                                     input_defaults={"kind": "prompt"}))


def load_pairs_config(path: str | os.PathLike, inputs: list[str] | None = None,
                      output: str | None = None) -> RunConfig:
    return pairs_run_config(read_yaml(path), str(path), inputs, output)


def multi_pair(job: JobConfig) -> bool:
    """Whether a job builds multi-pair rows (all_pairs, rso), to be exploded after it ran."""
    return any(isinstance(spec.config, PairsConfig) and spec.config.method in MULTI_PAIR for spec in job.stages)


def explode_output(folder: str, fmt: str, rows_per_shard: int) -> dict[str, Any]:
    """Rewrite a finished pairs folder with one preference row per pair; returns its ``_SUCCESS`` info
    with ``exploded`` = {rows_in, pairs_out}. Idempotent: exploded rows have no ``pairs``."""
    from ..io import ShardWriter, read
    from ..io.commit import finalize_shards, read_success, shard_prefix, shards_of
    from ..synth.pairs import explode_pairs

    before = read_success(folder)
    if before is None:
        raise UserError(f"{folder}: no _SUCCESS.json: the pairs job did not finish, nothing to explode")
    if "exploded" in before:
        return before
    writer = ShardWriter(folder, fmt, prefix=shard_prefix(), rows_per_shard=rows_per_shard)
    rows_in = pairs_out = 0
    for row in read(folder):  # the shards _SUCCESS.json names: the new ones are never read back
        if not isinstance(row, dict):  # a DeadLetter: our own shard does not read back
            raise UserError(f"{folder}: cannot explode: {row}")
        rows_in += 1
        for pair in explode_pairs(row):
            writer.write(pair)
            pairs_out += 1
    if rows_in != before["rows"]:
        raise UserError(f"{folder}: read {rows_in} rows, _SUCCESS.json says {before['rows']}")
    return finalize_shards(folder, fmt, shards_of(writer),
                           extra={"exploded": {"rows_in": rows_in, "pairs_out": pairs_out}})
