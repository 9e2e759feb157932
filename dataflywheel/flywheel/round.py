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
- ``train``: SFT from the current policy on the seed set mixed with the curated pool at a fixed
  pool share and a fixed step count, then DPO on this round's pairs when configured.
- ``eval``: greedy answers to the held-out prompts, verified: the number the demo reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
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
from ..synth.backends.base import Sampling
from ..synth.backends.config import BackendConfig
from ..synth.generate import GenerateConfig
from ..synth.pairs import BestOfNConfig, PairsConfig
from .config import FlywheelConfig
from .state import run_relative, tree_hash

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
    rows = [as_conversation(r) for r in task_rows(cfg, "seed")]
    write_rows(out, rows)
    return {"counts": {"rows": len(rows)}, "hash": rows_hash(rows, cfg.output)}


def stage_prompts(cfg: FlywheelConfig, k: int, out: str) -> dict:
    if cfg.task is not None:
        rows = task_rows(cfg, "round", k)
    else:  # the k-th disjoint slice of the pool, in a seeded order
        pool = [r for r in read(cfg.prompts.paths) if isinstance(r, dict)]
        random.Random(f"flywheel-prompts:{cfg.seed}").shuffle(pool)
        n = cfg.prompts.per_round
        rows = pool[(k - 1) * n: k * n]
    write_rows(out, rows)
    return {"counts": {"rows": len(rows)}, "hash": rows_hash(rows, cfg.output)}


# ---- samples: the pairs pipeline ----------------------------------------------------------------

def scorers_for(cfg: FlywheelConfig, rm: str | None) -> list[StageSpec]:
    """The configured scorers, the reward model replaced by the refreshed one when there is one."""
    return [StageSpec.of(s.stage, s.config.model_copy(update={"model": str(rm)}))
            if rm is not None and s.stage == "reward_model" else s for s in cfg.scorers]


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
        output=OutputConfig(path=str(out), format="jsonl"), generate=generate, scorers=scorers_for(cfg, rm),
        pairs=PairsConfig(method="west_of_n"), best_of_n=BestOfNConfig(field=cfg.pool.field, min_score=cfg.pool.min_score))


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
               "sample_accuracy": _mean([x for x in rewards if x is not None]),
               "prompts_with_verified": verified / max(1, len(scored)),
               "pair_margins": [p["scores"]["margin"] for p in pairs][:2000],
               "mean_tokens": _mean([c.get("tokens") for c in samples if c.get("tokens") is not None])}
    h = rows_hash([*scored, *pairs, *read_rows(fs.join(out, "sft"))], cfg.output)
    return {"counts": counts, "metrics": metrics, "hash": h}


def _mean(xs: list) -> float | None:
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


# ---- training and evaluation --------------------------------------------------------------------

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
                pairs: str | None, out: str, prompts: str | None = None) -> dict:
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
            current, metrics["dpo"] = _dpo(cfg, k, current, pairs, out)
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


def _dpo(cfg: FlywheelConfig, k: int, policy: str, pairs: str, out: str) -> tuple[str, dict]:
    from ..train import dpo as dpo_mod

    loop = cfg.train.dpo_loop.model_copy(update={"max_steps": cfg.train.dpo_steps, "seed": cfg.round_seed(k),
                                                 **tracked(cfg, k, "dpo", cfg.train.dpo_loop.tags)})
    summary = dpo_mod.run(dpo_mod.DpoConfig(model=str(policy), data=[str(pairs)], output=fs.join(out, "dpo"),
                                            eval_fraction=0.0, max_length=cfg.train.max_length,
                                            beta=cfg.train.dpo_beta, loop=loop.model_dump()))
    return str(summary["final"]), _summary(summary)


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


def evaluate(cfg: FlywheelConfig, policy: str, rows: list[dict]) -> tuple[list[dict], dict]:
    """Greedy answers (and pass@k samples when asked) to held-out prompts, verified."""
    from ..synth.backends.base import Request
    from ..synth.backends.transformers import TransformersBackend
    from ..synth.generate import prompt_messages
    from ..synth.verifiers import verifier_reward

    check = verifier_reward(cfg.prompts.verifier)
    backend = TransformersBackend(str(policy), batch_size=cfg.batch_size, device="cpu")
    greedy = Sampling(n=1, temperature=0.0, max_tokens=cfg.sampling.max_tokens, seed=0)
    reqs = [Request(r["id"], messages=tuple(prompt_messages(r)), sampling=greedy) for r in rows]
    texts = {res.request_id: res.samples[0].text for res in backend.generate(reqs)}
    scores = check(rows, [texts[r["id"]] for r in rows])
    results = [{"id": r["id"], "answer": r.get("answer"), "completion": texts[r["id"]], "correct": s}
               for r, s in zip(rows, scores)]
    metrics: dict[str, Any] = {"accuracy": _mean([s or 0.0 for s in scores]), "n": len(rows)}
    if cfg.eval.pass_at:
        k = cfg.eval.pass_at
        sampled = cfg.sampling.model_copy(update={"n": k, "seed": cfg.seed + 7})
        reqs = [Request(r["id"], messages=tuple(prompt_messages(r)), sampling=sampled) for r in rows]
        got = {res.request_id: [s.text for s in res.samples] for res in backend.generate(reqs)}
        hits = [max((v or 0.0) for v in check([r] * k, got[r["id"]])) for r in rows]
        metrics[f"pass@{k}"] = _mean(hits)
    return results, metrics


def stage_eval(cfg: FlywheelConfig, policy: str, heldout: list[dict], out: str) -> dict:
    results, metrics = evaluate(cfg, policy, heldout)
    write_rows(out, results)
    return {"counts": {"rows": len(results)}, "metrics": metrics, "hash": rows_hash(results, cfg.output)}
