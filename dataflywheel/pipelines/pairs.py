"""The preference-data pipeline (``dataflywheel pairs configs/pairs.yaml``): prompts in, pairs and
best-of-N SFT rows out (issue 7).

    prompts --generate (n samples, per-sample seeds, cached)--> scorers (reward_model / judge /
    verify, in order) --> <output>/scored --pairs [--> pair_quantile]--> <output>/pairs
                                                   \\--best_of_n--> <output>/sft

It expands to an ordinary multi-job run config, so every engine, the report and the per-job
reconciliation (in == kept + rejected + dead letter) work as for ``run``. Scored samples are
written once (``scored``, JSONL: nested, mixed-type scores) and both builders read them, so a pair
can be re-thresholded or re-built with another method without regenerating or rescoring
(issue 7 item 5); the generation cache makes a re-run of the first job cheap too.

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
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import InputConfig, OutputConfig, RunConfig, Strict, parse_config, read_yaml
from ..errors import UserError
from ..runner import RunnerConfig
from .steps import parse_pipeline, stage_spec

MULTI_PAIR = ("all_pairs", "rso")
SCORED, PAIRS, SFT = "scored", "pairs", "sft"


class PairsConfig(Strict):
    name: str = "pairs"
    round: int = Field(0, ge=0)  # the flywheel round these samples belong to (provenance)
    runner: RunnerConfig = RunnerConfig()
    input: InputConfig
    output: OutputConfig  # a folder: scored/, pairs/, sft/ inside; format applies to pairs and sft
    generate: dict[str, Any]  # the `generate` stage's options: backend (with cache), sampling (n >= 2)
    scorers: list[dict[str, Any]] = Field(min_length=1)  # [{stage: reward_model|judge|verify, ...options}]
    pairs: dict[str, Any] | Literal[False] = Field(default_factory=dict)  # `pairs` stage options, or false
    best_of_n: dict[str, Any] | Literal[False] = False  # `best_of_n` options: a second output, the SFT set
    pair_quantile: dict[str, Any] | Literal[False] = False  # West-of-N's confidence filter over all pairs
    report: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PairsConfig:
        n = (self.generate.get("sampling") or {}).get("n", 1)
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"generate.sampling.n must be >= 2 to build pairs or pick a best of N (got {n})")
        if self.pairs is False and self.best_of_n is False:
            raise ValueError("nothing to build: give pairs and/or best_of_n")
        if self.pair_quantile is not False:
            method = self.pairs.get("method", "west_of_n") if self.pairs is not False else None
            if method is None or method in MULTI_PAIR:
                raise ValueError(f"pair_quantile needs pairs with a single-pair method (west_of_n, max_min), "
                                 f"not {method}")
        return self


def output_dirs(base: str) -> dict[str, str]:
    return {k: os.path.join(base, k) for k in (SCORED, PAIRS, SFT)}


def _scorer_specs(cfg: PairsConfig, source: str) -> list[dict[str, Any]]:
    from ..registry import stage_class

    specs = []
    for i, spec in enumerate(cfg.scorers):
        if "stage" not in spec:
            raise UserError(f"{source}: scorers[{i}]: missing key 'stage' (reward_model, judge, verify, ...)")
        try:
            stage_class(str(spec["stage"]))
        except UserError as err:
            raise UserError(f"{source}: scorers[{i}].stage: {err}") from None
        opts = {k: v for k, v in spec.items() if k != "stage"}
        specs.append(stage_spec(str(spec["stage"]), opts, source, ("scorers", i)))
    return specs


def pairs_run_config(data: Any, source: str = "<config>", inputs: list[str] | None = None,
                     output: str | None = None) -> RunConfig:
    """A pairs config (mapping) -> the equivalent run config (jobs sample, pairs, best_of_n)."""
    cfg = parse_pipeline(PairsConfig, data, source, inputs, output, input_defaults={"kind": "prompt"})
    dirs = output_dirs(cfg.output.path)
    out = cfg.output.model_dump()
    sample = [stage_spec("generate", cfg.generate, source, ("generate",)), *_scorer_specs(cfg, source)]
    jobs = [{"name": f"{cfg.name}-sample", "input": cfg.input.model_dump(), "stages": sample,
             "output": {**out, "path": dirs[SCORED], "format": "jsonl"}}]
    # Scored rows keep `prompt` (n >= 2), so they read back as prompt rows, checked like the input.
    scored = {"paths": [dirs[SCORED]], "kind": "prompt", "batch_rows": cfg.input.batch_rows}
    if cfg.pairs is not False:
        stages = [stage_spec("pairs", {"round": cfg.round, **cfg.pairs}, source, ("pairs",))]
        if cfg.pair_quantile is not False:
            stages.append(stage_spec("pair_quantile", cfg.pair_quantile, source, ("pair_quantile",)))
        jobs.append({"name": f"{cfg.name}-pairs", "input": scored, "stages": stages,
                     "output": {**out, "path": dirs[PAIRS]}})
    if cfg.best_of_n is not False:
        stages = [stage_spec("best_of_n", {"round": cfg.round, **cfg.best_of_n}, source, ("best_of_n",))]
        jobs.append({"name": f"{cfg.name}-best_of_n", "input": scored, "stages": stages,
                     "output": {**out, "path": dirs[SFT]}})
    run = {"name": cfg.name, "runner": cfg.runner.model_dump(exclude_unset=True), "jobs": jobs, "report": cfg.report}
    return parse_config(run, source)


def load_pairs_config(path: str | os.PathLike, inputs: list[str] | None = None,
                      output: str | None = None) -> RunConfig:
    return pairs_run_config(read_yaml(Path(path)), str(path), inputs, output)


def needs_explode(run: RunConfig) -> str | None:
    """The pairs folder to explode after the run (a multi-pair method), or None."""
    for job in run.jobs:
        for spec in job.stages:
            if spec["stage"] == "pairs" and spec.get("method") in MULTI_PAIR:
                return job.output.path
    return None


def explode_output(folder: str, fmt: str, rows_per_shard: int) -> dict[str, Any]:
    """Rewrite a finished pairs folder with one preference row per pair; returns its ``_SUCCESS`` info
    with ``exploded`` = {rows_in, pairs_out}. Idempotent: exploded rows have no ``pairs``."""
    from ..io import ShardWriter, read, write_success
    from ..synth.pairs import explode_pairs
    from .io_transforms import TMP_PREFIX, finalize_shards, read_success

    before = read_success(folder)
    if before is None:
        raise UserError(f"{folder}: no _SUCCESS.json: the pairs job did not finish, nothing to explode")
    if "exploded" in before:
        return before
    writer = ShardWriter(folder, fmt, prefix=f"{TMP_PREFIX}explode", rows_per_shard=rows_per_shard)
    rows_in = pairs_out = 0
    for row in read(folder):  # reads part-* files only: the hidden new shards are never read back
        if not isinstance(row, dict):  # a DeadLetter: our own shard does not read back
            raise UserError(f"{folder}: cannot explode: {row}")
        rows_in += 1
        for pair in explode_pairs(row):
            writer.write(pair)
            pairs_out += 1
    if rows_in != before["rows"]:
        raise UserError(f"{folder}: read {rows_in} rows, _SUCCESS.json says {before['rows']}")
    info = finalize_shards(folder, fmt, writer.close())
    info["exploded"] = {"rows_in": rows_in, "pairs_out": pairs_out}
    write_success(Path(folder), info)
    return info
