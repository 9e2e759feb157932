"""The synthesis pipeline (``dataflywheel synth configs/synth.yaml``): seeds -> synthesized rows.

    seeds --Self-Instruct or Evol-Instruct (rounds on the driver, every call through the backend)-->
    candidates (+ every rejected candidate with its reason) --Beam job: [generate responses] ->
    exact dedup -> MinHash dedup--> Conversation rows with lineage ``meta.synth``

The methods are loops whose next round depends on the whole pool (novelty against every earlier
instruction, evolved items replacing their parents), so they run on the driver, batched through
the backend (vLLM / a server / transformers); the per-row work after them is an ordinary Beam job
with the usual report and reconciliation. With ``backend.cache`` set, every call of both parts is
cached by sample, so a re-run of the same config generates nothing (the summary counts hits,
misses and tokens).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Literal

from ..config import InputConfig, OutputConfig, Strict, load_yaml
from ..errors import UserError
from ..filters.basic import ExactDedup
from ..filters.dedup.stage import MinHashDedup, MinHashDedupConfig
from ..io import fs
from ..registry import StageSpec
from ..runner import RunnerConfig
from ..stats import RunReport
from ..synth.backends.config import BackendConfig, build_backend
from ..synth.evol import EvolConfig, EvolInstruct, failure_row
from ..synth.generate import Generate, GenerateConfig
from ..synth.self_instruct import SelfInstruct, SelfInstructConfig, load_seed_tasks
from .config import RunConfig, one_job
from .steps import Step


class ResponsesConfig(GenerateConfig):
    backend: BackendConfig | None = None  # None: the synth config's backend


class SynthConfig(Strict):
    name: str = "synth"
    runner: RunnerConfig = RunnerConfig()
    method: Literal["self_instruct", "evol_instruct"]
    seeds: str  # Self-Instruct: seed tasks JSONL (reference format); Evol: any readable rows or JSONL of instructions
    backend: BackendConfig
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    evol_instruct: EvolConfig = EvolConfig()
    responses: Step[ResponsesConfig] = None  # answer the synthesized prompts in the job (`generate` options)
    dedup: Step[MinHashDedupConfig] = MinHashDedupConfig()  # near-dedup of the results (exact dedup always runs)
    output: OutputConfig
    report: str | None = None


def load_synth_config(path: str | os.PathLike) -> SynthConfig:
    return load_yaml(path, SynthConfig)


def synthesize(cfg: SynthConfig, backend: Any) -> tuple[list[dict], list[dict], Counter, str]:
    """Run the method: (candidate rows, rejected rows, reason counts, record kind of the candidates)."""
    prompts_only = cfg.responses is not None
    if cfg.method == "self_instruct":
        try:
            seeds = load_seed_tasks(cfg.seeds)
        except (OSError, ValueError) as err:
            raise UserError(f"seeds: {err}") from None
        result = SelfInstruct(backend, seeds, cfg.self_instruct).run(instances=not prompts_only)
        rows = ([{**{k: v for k, v in r.items() if k != "messages"}, "prompt": r["messages"]} for r in result.prompt_rows]
                if prompts_only else result.instance_rows)
        rejected = [{**r, "rejected": {"stage": "self_instruct", "reason": r["reason"]}} for r in result.rejected]
        return rows, rejected, result.rejections, "prompt" if prompts_only else "conversation"
    from ..io import read

    evol = cfg.evol_instruct.model_copy(update={"generate_responses": False}) if prompts_only else cfg.evol_instruct
    seeds = list(read(cfg.seeds)) if not cfg.seeds.endswith(".txt") else fs.read_text(cfg.seeds).splitlines()
    result = EvolInstruct(backend, evol).run(seeds)
    if prompts_only:
        rows = [{"id": it.id, "prompt": [{"role": "user", "content": it.instruction}],
                 "meta": {"synth": it.synth_meta()}} for it in result.evolved]
    else:
        rows = result.rows
    return rows, [failure_row(f) for f in result.failures], result.reasons, "prompt" if prompts_only else "conversation"


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with fs.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def job_config(cfg: SynthConfig, candidates: str, kind: str) -> RunConfig:
    stages: list[StageSpec] = []
    if cfg.responses is not None:
        responses = cfg.responses if cfg.responses.backend else cfg.responses.model_copy(update={"backend": cfg.backend})
        stages.append(StageSpec.of(Generate, responses))
    stages.append(StageSpec.of(ExactDedup))
    if cfg.dedup is not None:
        stages.append(StageSpec.of(MinHashDedup, cfg.dedup))
    return one_job(cfg.name, cfg.runner, InputConfig(paths=[str(candidates)], kind=kind), stages, cfg.output,
                   cfg.report)


def run_synth(cfg: SynthConfig) -> tuple[dict, RunReport]:
    """Synthesize, write candidates and rejects under ``<output>/_synth``, then run the job."""
    from .job import run_job

    backend = build_backend(cfg.backend)
    rows, rejected, reasons, kind = synthesize(cfg, backend)
    work = fs.join(cfg.output.path, "_synth")
    _write_jsonl(fs.join(work, "candidates.jsonl"), rows)
    _write_jsonl(fs.join(work, "rejected.jsonl"), rejected)
    summary = {"method": cfg.method, "candidates": len(rows), "rejected": len(rejected),
               "rejected_by_reason": dict(reasons), "backend": dict(backend.counts)}
    if not rows:
        raise UserError(f"{cfg.method} produced no candidates ({len(rejected)} rejected: "
                        f"{dict(reasons.most_common(5))}); see {fs.join(work, 'rejected.jsonl')}")
    run = job_config(cfg, fs.join(work, "candidates.jsonl"), kind)
    report = run_job(run.jobs[0], run.runner)
    fs.write_text(fs.join(work, "summary.json"), json.dumps(summary, indent=2))
    return summary, report
