"""A round's training stages (docs/flywheel.md): the next policy (SFT, DPO or GRPO from the
current one) and, with ``rm_refresh``, the next reward model. Each returns ``{"counts", "metrics",
"hash"}`` as every stage in round.py does; each training run is one tracker run (``tracked``)."""

from __future__ import annotations

import json
import os
from typing import Any

from ..io import fs
from .config import FlywheelConfig
from .round import read_rows, row_count
from .state import run_relative, tree_hash


def training_mix(seed_rows: list[dict], pool_rows: list[dict], weight: float) -> list[dict]:
    """Seed rows plus pool rows, the pool repeated (whole copies, fresh ids) so it makes about
    ``weight`` of the mix: a deliberate share, not whatever the pool's size happens to be."""
    if not pool_rows or weight <= 0:
        return list(seed_rows)
    copies = max(1, round(weight * len(seed_rows) / ((1 - weight) * len(pool_rows)))) if weight < 1 else 1
    mix = list(seed_rows) if weight < 1 else []
    for j in range(copies):
        mix += [{**r, "id": f"{r['id']}#{j}"} for r in pool_rows]
    return mix


def stage_train(cfg: FlywheelConfig, k: int, policy: str | None, seed_dir: str, curated: str | None,
                pairs: str | None, out: str, prompts: str | None = None, reference: str | None = None) -> dict:
    """Train the next policy from ``policy`` (None: round 0, from ``policy.model`` or a tiny model):
    SFT on seed + pool (``sft``), then DPO on the round's pairs (``sft+dpo``), DPO alone with the
    current policy as reference (``dpo``, RLHFlow), or GRPO on the round's prompts (``grpo``). Round 0
    and the control always run SFT (the control on the seed set alone), except that round 0 with
    ``policy.steps: 0`` takes ``policy.model`` as it is."""
    if k == 0 and cfg.policy.steps == 0:  # a pretrained model, evaluated and sampled as it is
        return _as_given(cfg.policy.model, row_count(seed_dir))
    algorithm = "sft" if k == 0 or cfg.control else cfg.train.algorithm
    seed_rows = read_rows(seed_dir)
    pool_rows = read_rows(curated) if curated is not None and not cfg.control else []
    counts: dict[str, Any] = {"seed": len(seed_rows), "pool": len(pool_rows)}
    metrics: dict[str, Any] = {}
    current = policy
    if algorithm in ("sft", "sft+dpo"):
        mix = training_mix(seed_rows, pool_rows, cfg.pool.weight)
        counts["mix"] = len(mix)
        current, metrics["sft"] = _sft(cfg, k, policy, mix, out)
    if algorithm in ("sft+dpo", "dpo"):
        n_pairs = row_count(pairs) if pairs is not None else 0
        counts["pairs"] = n_pairs
        if n_pairs:  # no pairs (every sample tied): the policy stays as it is
            current, metrics["dpo"] = _dpo(cfg, k, current, pairs, out, reference)
    if algorithm == "grpo":
        current, metrics["grpo"] = _grpo(cfg, k, policy, prompts, out)
    assert current is not None
    # run-relative: a run folder can be moved or copied (the ablations copy round 0)
    return {"counts": counts, "metrics": {**metrics, "policy": run_relative(current, cfg.output)},
            "hash": tree_hash(current)}


def _as_given(model: str, seed_count: int) -> dict:
    """Round 0's policy when it is ``policy.model`` untrained: a local folder by its absolute path,
    a bucket URL as it is, a Hub id by its downloaded snapshot (the hash is always of the weights)."""
    if not fs.is_remote(model) and not os.path.isdir(model):
        from huggingface_hub import snapshot_download

        model = snapshot_download(model)
    policy = model if fs.is_remote(model) else os.path.abspath(model)
    return {"counts": {"seed": seed_count, "trained_steps": 0}, "metrics": {"policy": policy},
            "hash": tree_hash(policy)}


def _summary(run: dict, keys: tuple[str, ...] = ("steps", "train_loss", "rows", "padding_fraction", "seconds")) -> dict:
    return {key: run.get(key) for key in keys if key in run}


def tracked(cfg: FlywheelConfig, k: int, stage: str, tags: dict[str, str]) -> dict[str, Any]:
    """The trackers' run of one round's training stage (loop.report_to): one run per round and stage,
    grouped by the flywheel run."""
    name = fs.basename(cfg.output.rstrip("/"))
    return {"run_name": f"{name}/round-{k:03d}/{stage}",
            "tags": {**tags, "group": name, "round": str(k), "stage": stage}}


def _sft(cfg: FlywheelConfig, k: int, policy: str | None, mix: list[dict], out: str) -> tuple[str, dict]:
    from ..train import sft as sft_mod

    data = fs.join(out, "mix.jsonl")
    if not fs.isfile(data):  # a resumed stage trains on the same file
        fs.write_text(data, "".join(json.dumps(r, sort_keys=True) + "\n" for r in mix))
    if k == 0:
        start = {"model": cfg.policy.model} if cfg.policy.model else {"tiny": cfg.policy.tiny}
        loop = cfg.policy.loop.model_copy(update={"max_steps": cfg.policy.steps, "seed": cfg.seed,
                                                  **tracked(cfg, k, "sft", cfg.policy.loop.tags)})
    else:
        start = {"model": str(policy)}
        loop = cfg.train.loop.model_copy(update={"max_steps": cfg.train.steps, "seed": cfg.round_seed(k),
                                                 **tracked(cfg, k, "sft", cfg.train.loop.tags)})
    summary = sft_mod.run(sft_mod.SftConfig(**start, data=[data], output=fs.join(out, "sft"), eval_fraction=0.0,
                                            max_length=cfg.train.max_length, loop=loop))
    return str(summary["final"]), _summary(summary)


def _dpo(cfg: FlywheelConfig, k: int, policy: str, pairs: str, out: str, reference: str | None) -> tuple[str, dict]:
    """DPO (any loss of train/pref_losses.py) on the round's pairs from ``policy``. The reference is
    ``policy`` itself (``dpo_reference: round_start``: the round's starting policy, after this
    round's SFT under sft+dpo) or ``reference`` (``fixed``: round 0's policy)."""
    from ..train import dpo as dpo_mod

    loop = cfg.train.dpo_loop.model_copy(update={"max_steps": cfg.train.dpo_steps, "seed": cfg.round_seed(k),
                                                 **tracked(cfg, k, "dpo", cfg.train.dpo_loop.tags)})
    ref = None if cfg.train.dpo_reference == "round_start" or reference is None else str(reference)
    options = {"beta": cfg.train.dpo_beta, **cfg.train.dpo}
    summary = dpo_mod.run(dpo_mod.DpoConfig(model=str(policy), data=[str(pairs)], output=fs.join(out, "dpo"),
                                            eval_fraction=0.0, max_length=cfg.train.max_length, ref_model=ref,
                                            loop=loop.model_dump(), **options))
    return str(summary["final"]), _summary(summary, ("steps", "train_loss", "rows", "seconds", "loss_type",
                                                     "reference", "ref_model"))


def _grpo(cfg: FlywheelConfig, k: int, policy: str, prompts: str, out: str) -> tuple[str, dict]:
    """GRPO on this round's prompts, rewarded by the round's verifier (or reward model) scorer."""
    from ..train import grpo as grpo_mod

    verify, rm = cfg.scorer("verify"), cfg.scorer("reward_model")
    reward: dict[str, Any] = {}
    if verify is not None:
        reward = {"verifier": verify.config.verifier, "verifier_options": verify.config.options}
    elif rm is not None:
        reward = {"reward_model": rm.config.model}
    loop = cfg.train.loop.model_copy(update={"max_steps": cfg.train.steps, "seed": cfg.round_seed(k),
                                             **tracked(cfg, k, "grpo", cfg.train.loop.tags)})
    s = cfg.sampling
    options = {"num_generations": s.n, "max_completion_length": s.max_tokens, "temperature": s.temperature,
               **reward, **cfg.train.grpo}
    summary = grpo_mod.run(grpo_mod.GrpoConfig(model=str(policy), data=[str(prompts)], output=fs.join(out, "grpo"),
                                               eval_fraction=0.0, max_length=cfg.train.max_length,
                                               loop=loop.model_dump(), **options))
    return str(summary["final"]), _summary(summary, ("steps", "seconds", "reward_start", "reward_end"))


def stage_rm(cfg: FlywheelConfig, k: int, rm: str, pairs: str, out: str) -> dict:
    """Refresh the reward model on the round's West-of-N pairs (+ labelled data)."""
    from ..train import rm as rm_mod

    r = cfg.rm_refresh
    n_pairs = row_count(pairs)
    if not n_pairs and not r.data:  # nothing to learn from: the model stays
        return {"counts": {"pairs": 0}, "metrics": {"rm": run_relative(rm, cfg.output)}, "hash": tree_hash(rm)}
    data = ([str(pairs)] if n_pairs else []) + list(r.data)
    loop = {"lr": r.lr, "batch_size": r.batch_size, "max_steps": r.steps, "seed": cfg.round_seed(k), "progress": False,
            "report_to": cfg.train.loop.report_to, **tracked(cfg, k, "rm", cfg.train.loop.tags)}
    summary = rm_mod.run(rm_mod.RmConfig(model=str(rm), data=data, output=fs.join(out, "train"), eval_fraction=0.0,
                                         max_length=cfg.train.max_length, loop=loop))
    final = str(summary["final"])
    metrics = {"rm": run_relative(final, cfg.output), **_summary(summary, ("steps", "train_loss", "seconds"))}
    return {"counts": {"pairs": n_pairs, "labelled_paths": len(r.data)}, "metrics": metrics, "hash": tree_hash(final)}
