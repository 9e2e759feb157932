"""GRPO on prompt rows: G samples per prompt from the policy being trained, rewards from a rule verifier or
a reward model, group advantages, the PPO-clip loss (docs/sources.md#grpo, #chat-templates-and-labels).

A rollout: ``prompts_per_step`` prompts (a seeded order per epoch) x ``num_generations`` samples with
seeds derived from (loop.seed, rollout index), so a resumed run replays prompts and samples; rewards;
advantages (``advantage``: GRPO's group-normalised ones, RLOO's leave-one-out baseline, or
REINFORCE++-baseline's batch-whitened ones; losses.estimate_advantages); right-padded [prompt +
completion] batches of the backend's own token ids (the text re-tokenized can give other ids); π_old =
the policy's no-grad log-probs at rollout time (with μ = 1 the ratio is exactly 1: REINFORCE with a
group baseline); the sampler's log-probs for the importance weight exp(π_old − π_sampler), capped
(TIS, trl PR #3867; applied for vLLM by default, whose kernels differ from ours; mean and max always
logged). It serves ``num_iterations`` (μ) optimizer steps. The ratio π/π_old is per token, or per
completion (GSPO, ``importance_sampling_level: sequence``).

With several processes (DDP) each rank samples, scores and trains its share of a rollout's prompts
(prompt j keeps its seeds, so N processes sample what one would); rewards and completion lengths are
gathered, so the advantages' batch statistics and the logged metrics are those of one process. With
LoRA the vLLM engine receives the merged weights, and the KL reference (beta > 0) is the policy with
its adapter off. Simplifications, stated: FSDP is not offered for GRPO (sharded generation would need
every rank to decode in lock step); one reward source (no weighted mix); no entropy masking; no
dynamic sampling (zero-std groups train nothing under the grpo and plain rloo estimators;
``frac_reward_zero_std`` counts them, trl#3857); generation and training alternate (no asynchronous
rollouts); the vLLM engine shares the trainer's process and GPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from dataflywheel.errors import UserError
from dataflywheel.io import fs
from dataflywheel.models.label_logps import head_logps, label_logps, last_hidden
from dataflywheel.synth.backends.base import Request, Sampling
from dataflywheel.synth.backends.transformers import chat_prompt_ids
from dataflywheel.synth.verifiers import BUILTIN, RewardFn, load_verifier, verifier_reward

from . import distributed as dist
from . import lora
from .checkpoint import latest_checkpoint
from .config import TrainBase
from .data import Lint, load_split, use_chat_template
from .grpo_metrics import rollout_metrics
from .loop import LossOut, autocast, index_plan, pick_device, train_loop
from .losses import IGNORE, estimate_advantages, grpo_loss
from .model import load_for_training, resolve_model, save_final, to_device
from .output import RunOutput

GRPO_LR = 1e-6  # TRL GRPOConfig learning_rate (docs/sources.md#grpo)
ROLLOUT_FILE = "rollout.pt"


class GrpoConfig(TrainBase):
    """Defaults are TRL's ``GRPOConfig`` (docs/sources.md#grpo) unless marked."""

    beta: float = Field(0.0, ge=0)  # KL coefficient; 0.0 since trl PR #3516 (no reference model is loaded)
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)  # None: epsilon; DAPO recommends 0.28
    loss_type: Literal["dapo", "bnpo", "grpo", "dr_grpo"] = "dapo"  # normalisations: losses.grpo_loss
    # ours: the estimator's name; grpo is TRL GRPOTrainer's, rloo TRL RLOOTrainer's, reinforce_pp OpenRLHF's
    # reinforce_baseline (losses.estimate_advantages)
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantage grpo only; none: Dr. GRPO
    normalize_advantages: bool = False  # advantage rloo only: TRL RLOOConfig's batch whitening, off
    # sequence: GSPO's one ratio per completion (TRL importance_sampling_level); the GSPO paper pairs it with
    # epsilon 3e-4 / epsilon_high 4e-4 and loss_type grpo, which the config leaves to the user
    importance_sampling_level: Literal["token", "sequence"] = "token"
    num_generations: int = Field(8, ge=2)  # G, samples per prompt
    max_completion_length: int = Field(512, ge=1)
    temperature: float = Field(1.0, gt=0)  # applied to the logits on both sides (sampler and trainer; trl#4159)
    top_p: float = Field(1.0, gt=0, le=1)  # < 1 biases the IS ratio by the kept mass (trl#6789)
    num_iterations: int = Field(1, ge=1)  # μ: optimizer steps per rollout
    mask_truncated_completions: bool = False  # True: completions cut at max length train nothing (DAPO)
    # TRL's default is per_device_train_batch_size 8 / num_generations 8 = 1 prompt per step on one process
    prompts_per_step: int = Field(1, ge=1)
    verifier: str | None = None  # a built-in (numeric_match, ...) with verifier_options, or "module:function" RewardFn
    verifier_options: dict[str, Any] = {}
    reward_model: str | None = None  # a folder trained by `dataflywheel train rm` (scored by models/reward_model.RewardModel)
    backend: Literal["transformers", "vllm"] = "transformers"  # transformers: the live policy, in process
    backend_options: dict[str, Any] = {}  # transformers: batch_size; vllm: engine kwargs (gpu_memory_utilization...)
    importance_correction: bool | None = None  # None: on with vllm (TRL vllm_importance_sampling_correction)
    is_cap: float = Field(3.0, ge=1)  # TRL vllm_importance_sampling_cap
    eval_fraction: float = Field(0.0, ge=0, lt=1)  # held-out prompts scored greedily at the end (ours: none)

    @model_validator(mode="before")
    @classmethod
    def _grpo_lr(cls, data: Any) -> Any:
        # LoopConfig's lr default is SFT's; GRPO's is TRL's 1e-6 unless the config sets one
        if isinstance(data, dict):
            loop = data.get("loop") or {}
            if isinstance(loop, dict) and "lr" not in loop:
                data = {**data, "loop": {**loop, "lr": GRPO_LR}}
        return data

    @model_validator(mode="after")
    def _check(self) -> GrpoConfig:
        if (self.verifier is None) == (self.reward_model is None):
            raise ValueError("give exactly one of verifier ('module:function' or a built-in name) or reward_model")
        if self.advantage != "grpo" and self.scale_rewards != "group":
            raise ValueError(f"scale_rewards is GRPO's; advantage {self.advantage} has its own normalisation")
        if self.normalize_advantages and self.advantage != "rloo":
            raise ValueError("normalize_advantages is RLOO's (advantage: rloo)")
        if self.loop.grad_accum != 1:
            raise ValueError("grpo sets the micro-batches itself: prompts_per_step x num_generations samples per step "
                             "in micro-batches of loop.batch_size; leave loop.grad_accum at 1")
        return self


def reward_function(cfg: GrpoConfig) -> RewardFn:
    """``(prompt rows, completions) -> [float | None]`` from the config's verifier or reward model."""
    if cfg.verifier is not None:
        if cfg.verifier in BUILTIN:
            return verifier_reward(cfg.verifier, **cfg.verifier_options)
        fn = load_verifier(cfg.verifier)
        return functools.partial(fn, **cfg.verifier_options) if cfg.verifier_options else fn
    from dataflywheel.models.reward_model import RewardModel

    scorer = RewardModel(cfg.reward_model, chat_template=cfg.chat_template)  # loaded once per process

    def rm_reward(rows: list[dict], completions: list[str]) -> list[float | None]:
        return scorer.score([{"messages": [*r["prompt"], {"role": "assistant", "content": c}]}
                             for r, c in zip(rows, completions)])

    return rm_reward


def rollout_seed(seed: int, index: int, j: int) -> int:
    """Base seed of prompt j's samples in rollout ``index`` (31 bits; the backend derives one per sample)."""
    digest = hashlib.blake2b(f"grpo:{seed}:{index}:{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def collate(seqs: list[tuple[list[int], list[int]]], trained: list[bool], sampler: list[list[float]],
            pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [prompt + completion] rows. ``labels`` hold the completion ids (IGNORE elsewhere);
    ``mask`` and ``sampler_logps`` are [B, T-1], aligned with ``label_logps`` (position t predicts t+1)."""
    width, b = max(len(p) + len(c) for p, c in seqs), len(seqs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    mask, samp = torch.zeros((b, width - 1)), torch.zeros((b, width - 1))
    for r, ((p, c), keep, lp) in enumerate(zip(seqs, trained, sampler)):
        n = len(p) + len(c)
        ids[r, :n] = torch.tensor(p + c, dtype=torch.long)
        attn[r, :n] = 1
        labels[r, len(p):n] = torch.tensor(c, dtype=torch.long)
        mask[r, len(p) - 1:n - 1] = float(keep)
        if lp:
            samp[r, len(p) - 1:n - 1] = torch.tensor(lp)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": mask, "sampler_logps": samp}


@dataclass
class Rollout:
    index: int
    batches: list[dict]
    metrics: dict[str, float] = field(default_factory=dict)


def _old_logps(policy: Any, inputs: dict, labels: torch.Tensor, cfg: GrpoConfig, ref: Any) -> dict[str, torch.Tensor]:
    """π_old at the sampling temperature, the raw log-probs the sampler's are compared with, and the
    reference's (``lora.ADAPTER_OFF``: the policy's LoRA base)."""
    hidden, chunk = last_hidden(policy, **inputs), cfg.logits_chunk
    out = {"old_logps": head_logps(policy, hidden, labels, temperature=cfg.temperature, chunk=chunk)}
    # the sampler reports raw (untempered) log-probs (vLLM's default, and ours): compare like with like
    out["raw"] = out["old_logps"] if cfg.temperature == 1.0 else head_logps(policy, hidden, labels, chunk=chunk)
    if ref is not None:
        model = policy if ref is lora.ADAPTER_OFF else ref
        with lora.reference_context(model):
            out["ref_logps"] = label_logps(model, labels, temperature=cfg.temperature, chunk=chunk, **inputs)
    return {k: v.cpu() for k, v in out.items()}


@torch.no_grad()
def make_rollout(engine: Any, tok: Any, backend: Any, rows: list[dict], reward_fn: RewardFn, cfg: GrpoConfig,
                 index: int, ref: Any = None, slots: list[int] | None = None) -> Rollout:
    """Sample, score and batch this rank's prompts of one rollout (``slots``: their places in it, which
    seed their samples; None: all of it); π_old (and the reference's log-probs) are computed here, once.
    ``engine``: the policy behind ``distributed.wrap``."""
    slots = list(range(len(rows))) if slots is None else slots
    g, device = cfg.num_generations, next(engine.parameters()).device
    pids = [chat_prompt_ids(tok, r["prompt"]) for r in rows]
    requests = [Request(id=str(j), messages=tuple(r["prompt"]), sampling=Sampling(
        n=g, temperature=cfg.temperature, top_p=cfg.top_p, seed=rollout_seed(cfg.loop.seed, index, slot),
        logprobs=True, max_tokens=max(1, min(cfg.max_completion_length, cfg.max_length - len(pids[j])))))
        for j, (r, slot) in enumerate(zip(rows, slots))]
    samples = [s for res in backend.generate(requests) for s in res.samples]
    owners = [j for j in range(len(rows)) for _ in range(g)]
    ok = [s.finish_reason != "error" for s in samples]  # a failed sample: no reward, nothing trained
    if any(good and s.token_ids is None for s, good in zip(samples, ok)):
        raise UserError(f"the {backend.name} backend returned no token ids: GRPO trains on the sampled ids")
    sampled = all(len(s.logprobs or []) == len(s.token_ids) for s, good in zip(samples, ok) if good)
    correct = cfg.importance_correction if cfg.importance_correction is not None else cfg.backend == "vllm"
    if correct and not sampled:
        raise UserError(f"importance_correction needs sampled log-probs; the {backend.name} backend gave none")
    scored = reward_fn([rows[j] for j in owners], [s.text for s in samples])
    rewards = torch.tensor([math.nan if (v is None or not good) else float(v) for v, good in zip(scored, ok)])
    truncated = [s.finish_reason == "length" for s in samples]
    trained = [good and not (t and cfg.mask_truncated_completions) for good, t in zip(ok, truncated)]
    # batch statistics (scale_rewards batch, REINFORCE++'s whitening, the metrics) are over every rank's groups
    mine = torch.tensor([[r, len(s.token_ids or []), t, k] for r, s, t, k in zip(rewards.tolist(), samples, truncated,
                                                                                 trained)], dtype=torch.float64)
    everyone = dist.gather(mine)
    at = sum(len(x) for x in everyone[:dist.shard()[0]])
    every = torch.cat(everyone)
    all_adv = estimate_advantages(every[:, 0], g, cfg.advantage, scale=cfg.scale_rewards,
                                  normalize=cfg.normalize_advantages, weights=every[:, 1] * every[:, 3])
    adv = all_adv[at:at + len(rewards)]
    seqs = [(pids[j], list(s.token_ids or [])) for j, s in zip(owners, samples)]
    bf16 = pick_device(cfg.loop)[1]  # the loop's autocast, so μ = 1 gives ratio 1
    was_training, size, batches, ratios = engine.training, cfg.loop.batch_size, [], []
    engine.eval()  # π_old without dropout, as the loop trains (loop.disable_dropout)
    for start in range(0, len(seqs), size):
        batch = collate(seqs[start:start + size], trained[start:start + size],
                        [(s.logprobs or []) if sampled else [] for s in samples[start:start + size]], tok.pad_token_id)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        labels = batch["labels"].to(device)
        with autocast(device.type, bf16):
            batch.update(engine(_old_logps, inputs, labels, cfg, ref))
        raw = batch.pop("raw")
        ratio = torch.exp(raw - batch.pop("sampler_logps"))
        ratios.append(ratio[batch["labels"][:, 1:] != IGNORE])
        if correct:
            batch["is_weights"] = ratio.clamp(max=cfg.is_cap)
        batch["advantages"] = adv[start:start + size]
        batches.append(batch)
    engine.train(was_training)
    # step-level numbers ride on micro-batch 0 (the same on every rank), so the loop reports them exactly
    batches[0]["rollout"] = metrics = rollout_metrics(every[:, 0], g, every[:, 1], every[:, 2].bool(), all_adv,
                                                      torch.cat(ratios) if sampled else None)
    return Rollout(index, batches, metrics)


def grpo_loss_fn(cfg: GrpoConfig, device: str):
    def loss_fn(model: Any, batch: dict) -> LossOut:
        b = to_device(batch, device)
        logps = label_logps(model, b["labels"], temperature=cfg.temperature, chunk=cfg.logits_chunk,
                            input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        total, count, metrics = grpo_loss(
            logps, b["old_logps"], b["advantages"], b["mask"], epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            beta=cfg.beta, ref_logps=b.get("ref_logps"), loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length, is_weights=b.get("is_weights"),
            importance_sampling_level=cfg.importance_sampling_level)
        metrics["tokens"] = (float(b["attention_mask"].sum()), 1.0)
        for name, value in batch.get("rollout", {}).items():
            metrics[name] = (value, 1.0)
        return LossOut(total, count, metrics)

    return loss_fn


def make_backend(cfg: GrpoConfig, model: Any, tok: Any, model_name: str) -> Any:
    """transformers: the module being trained itself; vllm: an engine on the starting checkpoint, synced later."""
    if cfg.backend == "vllm":
        from dataflywheel.synth.backends.vllm_offline import VLLMBackend

        return VLLMBackend(fs.local_copy(model_name), **cfg.backend_options)  # vLLM loads local folders and Hub ids
    from dataflywheel.synth.backends.transformers import TransformersBackend

    return TransformersBackend.from_model(model, tok, model_name, **cfg.backend_options)


def eval_reward(backend: Any, rows: list[dict], reward_fn: RewardFn, cfg: GrpoConfig) -> float | None:
    """Mean reward of one greedy completion per held-out prompt (unscorable ones left out)."""
    if not rows:
        return None
    sampling = Sampling(temperature=0.0, max_tokens=cfg.max_completion_length)
    results = backend.generate([Request(id=str(j), messages=tuple(r["prompt"]), sampling=sampling)
                                for j, r in enumerate(rows)])
    return _mean([v for v in reward_fn(rows, [res.samples[0].text for res in results]) if v is not None])


def rollout_file() -> str:
    """Each rank keeps its own share of the rollout."""
    rank, world = dist.shard()
    return ROLLOUT_FILE if world == 1 else f"rollout-{rank}.pt"


def saved_rollout(cfg: GrpoConfig, index: int) -> Rollout | None:
    """With μ > 1 a checkpoint can fall inside a rollout's steps: its π_old came from weights that are
    gone, so the checkpoint keeps the rollout (``save_extra``) and a resumed run reuses it."""
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    if ckpt is None or not (ckpt / rollout_file()).is_file():
        return None
    saved = torch.load(ckpt / rollout_file(), weights_only=True)
    return Rollout(index, saved["batches"], saved["metrics"]) if saved["index"] == index else None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run(cfg: GrpoConfig) -> dict:
    """Train; returns the summary also written to ``output/summary.json``."""
    device, bf16 = pick_device(cfg.loop)
    dist.setup(cfg.distributed, device)
    rank, world = dist.shard()
    if cfg.distributed.strategy == "fsdp" and dist.initialized():
        raise UserError("grpo runs with distributed.strategy ddp (sharded generation is not offered)")
    if cfg.prompts_per_step % world:
        raise UserError(f"prompts_per_step {cfg.prompts_per_step} does not split over {world} processes")
    output = RunOutput.start(cfg.output, cfg.resume)  # a bucket output: its latest checkpoint comes here first
    lint = Lint()
    # prompt rows: `prompt`, Alpaca `instruction`, or `messages` ending with the user turn (records.py);
    # every other column (e.g. `answer`) stays on the row for the reward function
    train_rows, held = load_split(cfg.data, cfg.eval_data, cfg.eval_fraction, "prompt", lint)
    model_name = resolve_model(cfg.model, cfg.tiny, cfg.out, (m["content"] for r in train_rows for m in r["prompt"]))
    model, tok = load_for_training(model_name, gradient_checkpointing=cfg.gradient_checkpointing, lora=cfg.lora,
                                   seed=cfg.loop.seed)
    use_chat_template(tok, cfg.chat_template, model_name)
    fits = [len(chat_prompt_ids(tok, r["prompt"])) < cfg.max_length for r in train_rows]  # room for a completion
    for row in (r for r, ok in zip(train_rows, fits) if not ok):
        lint.add("prompt_too_long", row["id"])
    lint.enforce(cfg.lint, "grpo prompts")
    train_rows = [r for r, ok in zip(train_rows, fits) if ok]
    if not train_rows:
        raise UserError("no training prompts left after the data lint and the eval split")
    reward_fn = reward_function(cfg)
    # the reference is the starting policy (with LoRA: the policy's base); with beta 0 none is loaded (TRL)
    ref = None
    if cfg.beta > 0:
        ref = lora.ADAPTER_OFF if cfg.lora else load_for_training(model_name)[0].to(device).eval().requires_grad_(False)
    engine = dist.wrap(model, cfg.distributed, device, bf16)
    backend = make_backend(cfg, model, tok, model_name)
    mu, loop = cfg.num_iterations, cfg.loop
    total = loop.max_steps or mu * max(1, math.ceil(loop.epochs * len(train_rows) / cfg.prompts_per_step))
    plan = index_plan(len(train_rows), cfg.prompts_per_step, 1, loop.seed, loop.shuffle, shard=(0, 1))  # whole rollouts
    state: dict[str, Any] = {"rollout": None, "engine_step": 0, "syncs": 0}
    fresh = latest_checkpoint(cfg.out) is None or not cfg.resume
    before = eval_reward(backend, held, reward_fn, cfg) if fresh else None

    def sync(step: int) -> None:
        if cfg.backend == "vllm" and state["engine_step"] != step:
            backend.sync_weights(lora.merged_weights(model) if cfg.lora else model)
            state["engine_step"], state["syncs"] = step, state["syncs"] + 1

    def step_batches(step: int) -> list[dict]:
        index = step // mu
        current = state["rollout"]
        if current is None or current.index != index:
            current = saved_rollout(cfg, index) if mu > 1 else None
            if current is None:
                sync(step)
                slots = list(range(rank, cfg.prompts_per_step, world))  # this rank's share of the rollout
                order = plan(index)[0]
                prompts = [train_rows[order[j]] for j in slots]
                current = make_rollout(engine, tok, backend, prompts, reward_fn, cfg, index, ref, slots)
            state["rollout"] = current
        return current.batches

    def save_extra(folder: Any) -> None:
        if mu > 1 and (r := state["rollout"]) is not None:
            torch.save({"index": r.index, "batches": r.batches, "metrics": r.metrics}, folder / rollout_file())

    dist.say(f"grpo: {len(train_rows)} prompts ({len(held)} held out), {cfg.prompts_per_step} x {cfg.num_generations} "
             f"samples per rollout, {total} steps, backend {cfg.backend}, {world} process(es)")
    t0 = time.perf_counter()
    last = train_loop(model, loop, cfg.out, total_steps=total, step_batches=step_batches, engine=engine,
                      loss_fn=grpo_loss_fn(cfg, device), tokenizer=tok, save_extra=save_extra,
                      on_checkpoint=output.push_checkpoint, resume=cfg.resume, desc="grpo",
                      config=cfg.model_dump(mode="json"))
    metrics = (cfg.out / "metrics.jsonl").read_text().splitlines() if dist.is_main() else []  # rank 0 writes it
    steps = [json.loads(ln) for ln in metrics if ln.strip()]
    curve, done = [s["reward"] for s in steps if "reward" in s], last["step"] >= total
    if done:
        sync(last["step"])
    summary = {
        "algorithm": "grpo", "model": model_name, "prompts": len(train_rows), "eval_prompts": len(held),
        "lint": dict(lint.counts), "rows_dropped": lint.rows,
        "steps": last["step"], "resumed_from": last.get("resumed_from", 0),
        "seconds": round(time.perf_counter() - t0, 2),
        "step_seconds": round(_mean([s["seconds"] for s in steps]) or 0.0, 4),
        # the reward curve's two ends, each a mean over up to 10 steps (one step's reward is noisy)
        "reward_start": _mean(curve[:10]), "reward_end": _mean(curve[-10:]),
        "frac_reward_zero_std": last.get("frac_reward_zero_std"), "weight_syncs": state["syncs"],
        "eval_reward_before": before,
        "eval_reward": eval_reward(backend, held, reward_fn, cfg) if done else None,
    }
    summary["world_size"] = world
    if done:
        summary["final"] = output.publish_final(save_final(model, tok, cfg.out, summary, cfg.lora))
    return summary
