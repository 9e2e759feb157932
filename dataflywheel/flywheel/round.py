"""One flywheel round, as stages (docs/flywheel.md). Each stage function writes into its own folder and
returns ``{"counts", "metrics", "hash"}``; ``state.run_stage`` makes it resumable.

    round 0:   seed ----------------------------------------------> train -> eval
    round k:   prompts -> samples -> pool -> curate -> train -> eval
                          (generate N, score, pairs, best-of-N: the `pairs` Beam pipeline)

- ``prompts``: fresh prompts for this round (the task's curriculum, or the next slice of a pool).
- ``samples``: the `pairs` pipeline on the current policy: N samples per prompt, scorers, West-of-N
  pairs (``pairs/``) and verified best-of-N rows (``sft/``), every sample kept in ``scored/``.
- ``pool``: the best sample per prompt over all rounds (``BestPool``; Llama 2's fix), or this
  round's only (``pool.mode: last_round``, an ablation).
- ``curate``: the `select` pipeline over the pool: exact dedup, then random or IFD selection at a
  fixed budget (the ablation's two arms).
- ``train`` (train_stages.py): SFT from the current policy on the seed set mixed with the curated pool at a fixed
  pool share and a fixed step count, then DPO on this round's pairs when configured.
- ``eval`` (evaluate.py): greedy answers to the held-out prompts, verified (the number the demo
  reports), scored by a fixed evaluation reward model, and judged against round 0's answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config import InputConfig, OutputConfig
from ..io import fs, read, read_success, write_rows
from ..pipelines.pairs import PairsPipelineConfig
from ..pipelines.sft import SelectConfig, SftSelectConfig, SftSteps
from ..registry import StageSpec
from ..runner import RunnerConfig
from ..selectors.ifd import IFDConfig
from ..stages import StageConfig
from ..synth.backends.config import BackendConfig
from ..synth.generate import GenerateConfig
from ..synth.pairs import BestOfNConfig
from .config import FlywheelConfig
from .prompts import round_prompts, seed_conversations

VOLATILE = ("cached",)  # sample fields that differ between a fresh and a cache-served (re-)run


# ---- data helpers -------------------------------------------------------------------------------

def row_count(folder: str) -> int:
    """A finished output folder's row count, from its ``_SUCCESS.json`` (no rows read)."""
    done = read_success(folder)
    if done is None:
        raise FileNotFoundError(f"{folder}: no _SUCCESS.json: not a finished output")
    return int(done["rows"])


def read_rows(folder: str) -> list[dict]:
    """A finished output folder's kept rows, by id (an empty output has no part files to read)."""
    done = read_success(folder)
    if done is not None and done.get("rows") == 0:
        return []
    rows = [r for r in read(str(folder)) if isinstance(r, dict)]
    return sorted(rows, key=lambda r: str(r.get("id")))


def _strip(value: Any, roots: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, roots) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "$RUN")
    return value


def rows_hash(rows: Iterable[dict], root: str | None = None) -> str:
    """Order-independent content hash of rows (volatile fields left out): Beam may write the same
    rows in another shard order, and a cache-served re-run marks samples ``cached``. Paths inside
    the run folder ``root`` (a policy named in provenance) count as run-relative, so a run moved or
    repeated elsewhere hashes the same."""
    both = {str(root)} if root is None or fs.is_remote(root) else {str(root), str(Path(root).resolve())}
    roots = tuple(sorted(both, key=len, reverse=True)) if root else ()
    digests = sorted(hashlib.sha256(json.dumps(_strip(r, roots), sort_keys=True, default=str).encode()).hexdigest()
                     for r in rows)
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


# ---- task and prompts ---------------------------------------------------------------------------

def task_rows(cfg: FlywheelConfig, which: str, k: int = 0) -> list[dict]:
    """The task's seed set, held-out set or round-k prompts (deterministic in the config)."""
    from .tasks.arithmetic import make_prompts

    t = cfg.task
    common = {"ops": t.ops, "width": t.width, "reverse": t.reverse, "template": t.template}
    if which == "seed":
        return make_prompts(t.seed_rows, t.seed_digits, cfg.seed, prefix="seed", **common)
    if which == "eval":
        return make_prompts(t.eval_rows, t.eval_digits, cfg.seed, prefix="heldout", **common)
    curriculum = cfg.prompts.curriculum or [t.eval_digits]
    digits = curriculum[min(k, len(curriculum)) - 1]
    return make_prompts(cfg.prompts.per_round, tuple(digits), cfg.round_seed(k), prefix=f"r{k}", **common)


def as_conversation(row: dict) -> dict:
    return {"id": row["id"], "messages": [*row["messages"], {"role": "assistant", "content": str(row["answer"])}],
            "meta": {"source": "seed"}}


def stage_seed(cfg: FlywheelConfig, out: str) -> dict:
    rows = [as_conversation(r) for r in task_rows(cfg, "seed")] if cfg.task is not None else seed_conversations(cfg)
    write_rows(out, rows)
    return {"counts": {"rows": len(rows)}, "hash": rows_hash(rows, cfg.output)}


def stage_prompts(cfg: FlywheelConfig, k: int, out: str, heldout: list[dict]) -> dict:
    """Round ``k``'s prompts; ``heldout``: the run's held-out prompts, which a pool's slice leaves out."""
    counts: dict[str, Any] = {}
    if cfg.task is not None:
        rows = task_rows(cfg, "round", k)
    else:  # the k-th disjoint slice of the pool, in a seeded order
        rows, counts = round_prompts(cfg, k, heldout)
    write_rows(out, rows)
    return {"counts": {"rows": len(rows), **({"pool": counts} if counts else {})}, "hash": rows_hash(rows, cfg.output)}


# ---- samples: the pairs pipeline ----------------------------------------------------------------

POLICY = "policy"  # a judge scorer's backend model naming the current policy: Self-Rewarding's own judge


def scorers_for(cfg: FlywheelConfig, rm: str | None, policy: str | None = None) -> list[StageSpec]:
    """The configured scorers, the reward model replaced by the refreshed one when there is one, and
    a judge whose backend model is ``policy`` given the round's current policy (Self-Rewarding:
    the model judges its own samples)."""
    out = []
    for s in cfg.scorers:
        if rm is not None and s.stage == "reward_model":
            s = StageSpec.of(s.stage, s.config.model_copy(update={"model": str(rm)}))
        elif s.stage == "judge" and s.config.backend.model == POLICY and policy is not None:
            backend = s.config.backend.model_copy(update={"model": str(policy)})
            s = StageSpec.of(s.stage, s.config.model_copy(update={"backend": backend}))
        out.append(s)
    return out


def pairs_config(cfg: FlywheelConfig, k: int, prompts: str, policy: str, out: str,
                 runner: RunnerConfig | None = None, rm: str | None = None) -> PairsPipelineConfig:
    """The round's `pairs` pipeline config (pipelines/pairs.py expands it to Beam jobs)."""
    backend = BackendConfig(kind="transformers", model=str(policy),
                            options={"device": "cpu", "batch_size": cfg.batch_size})
    generate = GenerateConfig(backend=backend, sampling=cfg.sampling.model_copy(update={"seed": cfg.round_seed(k)}),
                              batch_size=cfg.batch_size, reject_overlong=False)
    return PairsPipelineConfig(
        name=f"{cfg.name}-round{k}", round=k, runner=runner or cfg.runner,
        input=InputConfig(paths=[str(prompts)], kind="prompt", batch_rows=cfg.batch_size),
        output=OutputConfig(path=str(out), format="jsonl"), generate=generate, scorers=scorers_for(cfg, rm, policy),
        pairs=cfg.pairs, best_of_n=BestOfNConfig(field=cfg.pool.field, min_score=cfg.pool.min_score))


def stage_samples(cfg: FlywheelConfig, k: int, prompts: str, policy: str, out: str, rm: str | None = None) -> dict:
    from ..pipelines.job import run_job
    from ..pipelines.pairs import pairs_run

    run = pairs_run(pairs_config(cfg, k, prompts, policy, out, rm=rm))
    counts: dict[str, Any] = {}
    for job in run.jobs:
        report = run_job(job, run.runner)
        last = report.stages[-1]
        counts[job.name.rsplit("-", 1)[-1]] = {"in": report.stages[0].rows_in, "kept": last.kept,
                                                "rejected": {k2: v for s in report.stages for k2, v in s.rejected.items()},
                                                "dead_letter": sum(s.dead_letter for s in report.stages)}
    scored, pairs = read_rows(fs.join(out, "scored")), read_rows(fs.join(out, "pairs"))
    samples = [c for r in scored for c in r.get("completions", [])]
    rewards = [(c.get("scores") or {}).get(cfg.pool.field) for c in samples]
    verified = sum(1 for r in scored if any(((c.get("scores") or {}).get(cfg.pool.field) or 0) >= cfg.pool.min_score
                                            for c in r.get("completions", [])))
    metrics = {"prompts": len(scored), "samples": len(samples),
               "sample_accuracy": mean_of([x for x in rewards if x is not None]),
               "prompts_with_verified": verified / max(1, len(scored)),
               "pair_margins": [p["scores"]["margin"] for p in pairs][:2000],
               "mean_tokens": mean_of([c.get("tokens") for c in samples if c.get("tokens") is not None])}
    h = rows_hash([*scored, *pairs, *read_rows(fs.join(out, "sft"))], cfg.output)
    return {"counts": counts, "metrics": metrics, "hash": h}


def mean_of(xs: list) -> float | None:
    """The mean of the values that are not None, to 6 decimals (None when there are none)."""
    xs = [float(x) for x in xs if x is not None]
    return round(sum(xs) / len(xs), 6) if xs else None


# ---- pool and curation --------------------------------------------------------------------------

def stage_pool(cfg: FlywheelConfig, k: int, prev: str | None, best: str, out: str) -> dict:
    """This round's verified best-of-N rows merged into the previous round's pool (a copy: a re-run
    of this stage starts again from the previous round's file, so it is idempotent). The pool is a
    sqlite file, worked on locally and stored with the stage (uploaded whole to a bucket run)."""
    from ..synth.best_pool import BestPool

    with tempfile.TemporaryDirectory(prefix="pool-") as scratch:
        db = os.path.join(scratch, "pool.sqlite")
        if cfg.pool.mode == "all_rounds" and prev is not None and fs.isfile(fs.join(prev, "pool.sqlite")):
            fs.copy_file(fs.join(prev, "pool.sqlite"), db)
        with BestPool(db) as pool:
            counts = pool.update(read_rows(best), k)
            rows = pool.export()
            by_round = pool.rounds()
        fs.copy_file(db, fs.join(out, "pool.sqlite"))
    write_rows(fs.join(out, "rows"), rows)
    return {"counts": {**counts, "pool": len(rows)}, "metrics": {"pool_by_round": by_round}, "hash": rows_hash(rows, cfg.output)}


def select_config(cfg: FlywheelConfig, k: int, rows: str, policy: str, out: str,
                  runner: RunnerConfig | None = None) -> SftSelectConfig:
    """The round's `select` pipeline config over the pool (pipelines/sft.py)."""
    c = cfg.curate
    steps = SftSteps(exact_dedup=StageConfig() if c.exact_dedup else None, minhash_dedup=None)
    select = SelectConfig()
    if c.select == "random":
        select = SelectConfig(method="random", budget=c.budget, options={"seed": cfg.round_seed(k)})
    elif c.select == "ifd":  # IFD under the policy that wrote the samples (Cherry_LLM's own-model IFD)
        steps.ifd = IFDConfig(model=str(policy), template="chat", max_length=cfg.train.max_length)
        select = SelectConfig(method="top", field="ifd", budget=c.budget)
    return SftSelectConfig(name=f"{cfg.name}-curate{k}", runner=runner or cfg.runner,
                           input=InputConfig(paths=[str(rows)], kind="conversation"),
                           output=OutputConfig(path=str(out), format="jsonl"), steps=steps, select=select)


def stage_curate(cfg: FlywheelConfig, k: int, rows: str, policy: str, out: str) -> dict:
    from ..pipelines.job import run_job
    from ..pipelines.sft import sft_run

    if not row_count(rows):  # nothing verified yet: an empty selection, no pipeline to run
        write_rows(out, [])
        return {"counts": {"in": 0, "kept": 0}, "hash": rows_hash([], cfg.output)}
    run = sft_run(select_config(cfg, k, rows, policy, out))
    report = run_job(run.jobs[0], run.runner)
    kept = read_rows(out)
    counts = {"in": report.stages[0].rows_in if report.stages else 0, "kept": len(kept),
              "rejected": {r: n for s in report.stages for r, n in s.rejected.items()},
              "stages": {s.stage: {"in": s.rows_in, "kept": s.kept} for s in report.stages}}
    return {"counts": counts, "hash": rows_hash(kept, cfg.output)}
