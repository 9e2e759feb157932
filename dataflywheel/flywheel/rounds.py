"""The rounds driver: ``dataflywheel rounds CONFIG [--rounds N | --round K] [--until-plateau]``.

A run is a folder (``output``): ``round-000/`` (seed -> train -> eval), then ``round-00K/``
(prompts -> samples -> pool -> curate -> train -> eval), each stage with its completion marker
(state.py), each round with ``manifest.json``, and the run's ``manifest.json`` (every round's
counts, metrics, policy and model hash, plus what `dataflywheel export RUN` publishes). The run
folder is locked while a driver writes it. Every stage is a deterministic function of its inputs
(seeded sampling per prompt, seeded training, exact resume), so a run killed at any point and
started again ends with the same outputs as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..io import fs
from .config import FlywheelConfig
from .evaluate import stage_eval
from .prompts import heldout_prompts
from .round import (
    read_rows,
    rows_hash,
    stage_curate,
    stage_pool,
    stage_prompts,
    stage_samples,
    stage_seed,
    task_rows,
)
from .state import canonical_hash, in_run, lock_run, read_json, run_stage, write_json
from .train_stages import stage_rm, stage_train

TRAIN_SKIP = ("checkpoints",)  # a finished training folder's hash: the weights, not the resume state


def round_dir(run: str, k: int) -> str:
    return fs.join(run, f"round-{k:03d}")


def heldout_rows(cfg: FlywheelConfig) -> list[dict]:
    if cfg.task is not None:
        return task_rows(cfg, "eval")
    return heldout_prompts(cfg)


def _summary(marker: dict) -> dict:
    return {k: marker.get(k) for k in ("inputs", "output", "counts", "metrics", "seconds", "skipped")}


def run_round(cfg: FlywheelConfig, run: str, k: int, prev: dict | None, heldout: list[dict],
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) round ``k``; ``prev`` is round k-1's record. Returns this round's record."""
    rd = round_dir(run, k)
    fs.makedirs(rd)
    stages: dict[str, dict] = {}
    common = {"seed": cfg.seed, "max_length": cfg.train.max_length}
    if k == 0:
        stages["seed"] = run_stage(rd, "seed", {"task": cfg.task and cfg.task.model_dump(), **common},
                                   lambda out: stage_seed(cfg, out), log=log)
        stages["train"] = run_stage(
            rd, "train", {"seed": stages["seed"]["output"], "policy": cfg.policy.model_dump(), **common},
            lambda out: stage_train(cfg, 0, None, fs.join(rd, "seed"), None, None, out),
            resumable=True, skip_dirs=TRAIN_SKIP, log=log)
    else:
        policy = in_run(run, prev["policy"])
        seed_dir = fs.join(round_dir(run, 0), "seed")
        seed_hash = prev["seed_hash"]
        if cfg.control:  # the compute-matched control: the same steps on the seed set alone
            inputs = {"policy": prev["policy_hash"], "seed": seed_hash, "train": cfg.train.model_dump(),
                      "control": True, **common}
            stages["train"] = run_stage(rd, "train", inputs,
                                        lambda out: stage_train(cfg, k, policy, seed_dir, None, None, out),
                                        resumable=True, skip_dirs=TRAIN_SKIP, log=log)
        else:
            stages["prompts"] = run_stage(
                rd, "prompts", {"task": cfg.task and cfg.task.model_dump(), "prompts": cfg.prompts.model_dump(),
                                "round": k, **common},
                lambda out: stage_prompts(cfg, k, out, heldout), log=log)
            rm = in_run(run, prev["rm"]) if prev.get("rm") else None  # refreshed in the round before
            stages["samples"] = run_stage(
                rd, "samples", {"prompts": stages["prompts"]["output"], "policy": prev["policy_hash"],
                                "sampling": cfg.sampling.model_dump(), "scorers": [s.model_dump() for s in cfg.scorers],
                                "pool": cfg.pool.model_dump(), "pairs": cfg.pairs.model_dump(),
                                "rm": prev.get("rm_hash")},
                lambda out: stage_samples(cfg, k, fs.join(rd, "prompts"), policy, out, rm), log=log)
            if cfg.rm_refresh is not None:
                start = rm or str(cfg.scorer("reward_model").config.model)
                stages["rm"] = run_stage(
                    rd, "rm", {"samples": stages["samples"]["output"], "rm": prev.get("rm_hash") or str(start),
                               "refresh": cfg.rm_refresh.model_dump(), **common},
                    lambda out: stage_rm(cfg, k, start, fs.join(rd, "samples", "pairs"), out),
                    resumable=True, skip_dirs=TRAIN_SKIP, log=log)
            prev_pool = fs.join(round_dir(run, k - 1), "pool") if k > 1 else None
            stages["pool"] = run_stage(
                rd, "pool", {"samples": stages["samples"]["output"], "previous": prev.get("pool_hash"),
                             "pool": cfg.pool.model_dump()},
                lambda out: stage_pool(cfg, k, prev_pool, fs.join(rd, "samples", "sft"), out), log=log)
            stages["curate"] = run_stage(
                rd, "curate", {"pool": stages["pool"]["output"], "curate": cfg.curate.model_dump(),
                               "policy": prev["policy_hash"], **common},
                lambda out: stage_curate(cfg, k, fs.join(rd, "pool", "rows"), policy, out), log=log)
            inputs = {"policy": prev["policy_hash"], "seed": seed_hash, "curated": stages["curate"]["output"],
                      "pairs": stages["samples"]["output"], "prompts": stages["prompts"]["output"],
                      "train": cfg.train.model_dump(),
                      "weight": cfg.pool.weight, **common}
            if cfg.train.dpo_reference == "fixed":
                inputs["reference"] = prev["origin_hash"]
            stages["train"] = run_stage(
                rd, "train", inputs,
                lambda out: stage_train(cfg, k, policy, seed_dir, fs.join(rd, "curate"), fs.join(rd, "samples", "pairs"),
                                        out, fs.join(rd, "prompts"), in_run(run, prev["origin"])),
                resumable=True, skip_dirs=TRAIN_SKIP, log=log)
    policy_now = stages["train"]["metrics"]["policy"]
    eval_inputs = {"policy": stages["train"]["output"], "heldout": rows_hash(heldout), "eval": cfg.eval.model_dump(),
                   "verifier": cfg.prompts.verifier, "max_tokens": cfg.sampling.max_tokens}
    baseline_dir = fs.join(round_dir(run, 0), "eval")
    if k > 0:  # judged against round 0's answers
        eval_inputs["baseline"] = prev["baseline_hash"]
    stages["eval"] = run_stage(
        rd, "eval", eval_inputs,
        lambda out: stage_eval(cfg, in_run(run, policy_now), heldout, out, read_rows(baseline_dir) if k else None),
        log=log)
    record = {
        "round": k, "policy": policy_now, "policy_hash": stages["train"]["output"],  # policy: run-relative
        "seed_hash": stages["seed"]["output"] if k == 0 else prev["seed_hash"],
        "origin": policy_now if k == 0 else prev["origin"],  # round 0's policy: a fixed DPO reference
        "origin_hash": stages["train"]["output"] if k == 0 else prev["origin_hash"],
        "pool_hash": stages["pool"]["output"] if "pool" in stages else (prev or {}).get("pool_hash"),
        "rm": stages["rm"]["metrics"]["rm"] if "rm" in stages else (prev or {}).get("rm"),
        "rm_hash": stages["rm"]["output"] if "rm" in stages else (prev or {}).get("rm_hash"),
        "baseline_hash": stages["eval"]["output"] if k == 0 else prev["baseline_hash"],
        "accuracy": stages["eval"]["metrics"].get("accuracy"),
        # the number a round is judged by: verified accuracy, else the evaluation RM's mean reward
        "headline": headline(cfg, stages["eval"]["metrics"]),
        "stages": {name: _summary(m) for name, m in stages.items()},
    }
    write_json(fs.join(rd, "manifest.json"), record)
    return record


def headline(cfg: FlywheelConfig, metrics: dict) -> tuple[str, float | None]:
    """(name, value) of a round's main number: accuracy with a verifier, else the mean reward under
    the evaluation RM, else the judge's length-controlled win rate against round 0 (0.5 in round 0)."""
    if cfg.prompts.verifier is not None:
        return "accuracy", metrics.get("accuracy")
    if cfg.eval.reward_model is not None:
        return "mean_reward", metrics.get("mean_reward")
    return "lc_win_rate", metrics.get("lc_win_rate", 0.5)


def dry_run_round(cfg: FlywheelConfig, k: int = 1) -> dict[str, Any]:
    """Build round ``k``'s Beam pipelines (samples: generate + scorers, pairs, best-of-N; curate) for
    Dataflow with ``dry_run``: each job graph is built and validated, nothing is submitted or run.
    Returns {job name: pipeline proto}. Paths are where the round would read and write them."""
    from ..errors import UserError
    from ..pipelines.job import run_job
    from ..pipelines.pairs import pairs_run
    from ..pipelines.sft import sft_run
    from .round import pairs_config, select_config

    if cfg.runner.engine != "dataflow" or cfg.runner.dataflow is None:
        raise UserError("--dry-run builds Dataflow job graphs: give a runner with engine dataflow "
                        "(e.g. --runner configs/dataflow.yaml)")
    if k < 1:
        raise UserError("round 0 has no Beam stages (seed, train, eval): dry-run a round >= 1")
    runner = cfg.runner.model_copy(update={"dataflow": cfg.runner.dataflow.model_copy(update={"dry_run": True})})
    run = cfg.output
    rd, policy = round_dir(run, k), fs.join(round_dir(run, k - 1), "train", "sft", "final")
    runs = [pairs_run(pairs_config(cfg, k, fs.join(rd, "prompts"), policy, fs.join(rd, "samples"), runner)),
            sft_run(select_config(cfg, k, fs.join(rd, "pool", "rows"), policy, fs.join(rd, "curate"), runner))]
    return {job.name: run_job(job, one.runner).job_graph for one in runs for job in one.jobs}


def plateaued(accuracies: list[float], patience: int, min_delta: float) -> bool:
    """True when the last ``patience`` rounds all failed to beat the best before them by ``min_delta``."""
    if len(accuracies) <= patience:
        return False
    best_before = max(accuracies[:-patience])
    return all(a < best_before + min_delta for a in accuracies[-patience:])


def run_rounds(cfg: FlywheelConfig, rounds: int | None = None, only_round: int | None = None,
               until_plateau: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run rounds 0..N (``only_round``: 0..K, for schedulers); returns the run manifest."""
    run = cfg.output
    lock = lock_run(run)
    try:
        last = only_round if only_round is not None else (cfg.rounds if rounds is None else rounds)
        heldout = heldout_rows(cfg)
        records: list[dict] = []
        stopped = None
        for k in range(last + 1):
            record = run_round(cfg, run, k, records[-1] if records else None, heldout, log)
            records.append(record)
            name, value = record["headline"]
            extra = {m: v for m, v in record["stages"]["eval"]["metrics"].items()
                     if m in ("mean_reward", "win_rate", "lc_win_rate", "mean_tokens") and m != name and v is not None}
            log(f"round {k}: held-out {name} {value:.3f}" + "".join(f", {m} {v:.3f}" for m, v in extra.items())
                if value is not None else f"round {k}: no {name}")
            manifest = write_manifest(cfg, run, records, stopped)
            accs = [r["headline"][1] or 0.0 for r in records]
            if until_plateau and k < last and plateaued(accs, cfg.plateau.patience, cfg.plateau.min_delta):
                stopped = f"plateau after round {k}: no gain of {cfg.plateau.min_delta} in {cfg.plateau.patience} round(s)"
                log(stopped)
                manifest = write_manifest(cfg, run, records, stopped)
                break
        return manifest
    finally:
        lock.close()


def write_manifest(cfg: FlywheelConfig, run: str, records: list[dict], stopped: str | None) -> dict:
    """The run's manifest: config, every round's record, and the datasets `export` publishes."""
    old = read_json(fs.join(run, "manifest.json")) or {}
    by_round = {r["round"]: r for r in old.get("rounds", [])}
    by_round.update({r["round"]: r for r in records})
    rounds = [by_round[k] for k in sorted(by_round)]
    latest = max(r["round"] for r in records)
    exports: dict[str, str] = {}
    if latest > 0 and not cfg.control:
        exports = {"sft_pool": f"round-{latest:03d}/pool/rows", "pairs": f"round-{latest:03d}/samples/pairs",
                   "samples": f"round-{latest:03d}/samples/scored"}
    card = {"run": cfg.name, "rounds": len(rounds), "config_hash": canonical_hash(cfg.model_dump()),
            "held_out_accuracy": {r["round"]: r["accuracy"] for r in rounds},
            "held_out": {r["round"]: r["stages"]["eval"]["metrics"] for r in rounds},
            "policies": {r["round"]: r["policy_hash"] for r in rounds},
            "curation": cfg.curate.model_dump(), "pool": cfg.pool.model_dump(), "sampling": cfg.sampling.model_dump(),
            "stage_counts": {r["round"]: {s: m["counts"] for s, m in r["stages"].items()} for r in rounds}}
    manifest: dict[str, Any] = {"name": cfg.name, "config": cfg.model_dump(), "rounds": rounds,
                                "stopped": stopped, "exports": exports, "card": card}
    write_json(fs.join(run, "manifest.json"), manifest)
    return manifest
