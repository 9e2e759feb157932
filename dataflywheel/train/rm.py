"""Reward model training: a 1-logit head on a causal LM's backbone, trained with Bradley–Terry on preference pairs.

Rewards are read by ``models/reward_model.last_token_rewards`` (the head at the last real token,
from the attention mask, never transformers' last-non-pad guess, which is wrong when pad == eos):
the same function scores pairs in training and rows in ``models/reward_model.RewardModel``, the
inference side, which the scorers use without importing this trainer.

With LoRA (lora.py) the value head trains in full beside the adapter and is saved with it.
Simplifications, stated: chosen and rejected share one forward,
stacked on the batch dim (as TRL's RewardTrainer); over-long pairs are dropped by the linter, not cut.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field

from dataflywheel.errors import UserError
from dataflywheel.models.reward_model import last_token_rewards

from . import distributed as dist
from .checkpoint import latest_checkpoint, trim_jsonl
from .config import LoopConfig, TrainBase
from .data import Lint, PairExample, load_split, pair_examples, use_chat_template
from .loop import LossOut, autocast, index_plan, pick_device, steps_for, train_loop
from .losses import bradley_terry
from .model import load_for_training, resolve_model, save_final, to_device
from .output import RunOutput
from .pack import collate_padded

EVAL_FILE = "eval.jsonl"


class RmLoop(LoopConfig):
    lr: float = Field(1e-4, gt=0)  # TRL RewardConfig (docs/sources.md#reward-model)


class RmConfig(TrainBase):
    loop: RmLoop = RmLoop()
    margin_field: str | None = None  # a numeric row field used as the margin m (Llama 2); None: no margin
    center_rewards_coefficient: float | None = Field(None, ge=0)  # TRL: None; 0.01 recommended (arXiv 2312.09244)
    eval_every: int | None = Field(None, ge=1)  # held-out accuracy every N steps (eval.jsonl); always at the end
    eval_batch_size: int = Field(16, ge=1)  # pairs per held-out batch


def pair_batch(pairs: Sequence[PairExample], pad_id: int, margins: Sequence[float] | None = None) -> dict:
    """Chosen rows then rejected rows, right-padded into one batch (one forward for both halves)."""
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch.pop("labels")  # the reward reads every token; labels are for the LM losses
    if margins is not None:
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    return batch


def rm_loss_fn(device: str, center: float | None) -> Callable[[Any, dict], LossOut]:
    def loss_fn(model: Any, batch: dict) -> LossOut:
        batch = to_device(batch, device)
        rewards = last_token_rewards(model, batch["input_ids"], batch["attention_mask"])
        r_c, r_r = rewards.chunk(2)
        total, n = bradley_terry(r_c, r_r, batch.get("margin"), center)
        r_c, r_r = r_c.detach(), r_r.detach()
        return LossOut(total, n, {"accuracy": (float((r_c > r_r).sum()), n), "margin": (float((r_c - r_r).sum()), n),
                                  "reward_mean": (float((r_c + r_r).sum()), 2 * n),
                                  "tokens": (batch["num_tokens"], 1)})

    return loss_fn


def _rewards(model: Any, batch: dict) -> torch.Tensor:
    return last_token_rewards(model, batch["input_ids"], batch["attention_mask"])


@torch.no_grad()
def evaluate(engine: Any, pairs: Sequence[PairExample], margins: Sequence[float] | None, cfg: RmConfig,
             pad_id: int) -> dict[str, float | None]:
    """Held-out loss and accuracy (a tie counts as wrong); ``engine``: the wrapped model
    (distributed.py), on which every rank runs every pair."""
    if not pairs:
        return {"eval_loss": None, "eval_accuracy": None}
    device, bf16 = pick_device(cfg.loop)
    was_training = engine.training
    engine.eval()
    loss, right = 0.0, 0
    for at in range(0, len(pairs), cfg.eval_batch_size):
        part = slice(at, at + cfg.eval_batch_size)
        batch = to_device(pair_batch(pairs[part], pad_id, margins[part] if margins else None), device)
        with autocast(device, bf16):
            r_c, r_r = engine(_rewards, batch).chunk(2)
        loss += float(bradley_terry(r_c, r_r, batch.get("margin"), cfg.center_rewards_coefficient)[0])
        right += int((r_c > r_r).sum())
    engine.train(was_training)
    return {"eval_loss": loss / len(pairs), "eval_accuracy": right / len(pairs)}


def _margins(rows: Sequence[dict], pairs: Sequence[PairExample], field: str | None) -> list[float] | None:
    if field is None:
        return None
    by_id = {}
    for row in rows:
        if not isinstance(row.get(field), (int, float)):
            raise UserError(f"row {row['id']}: margin_field {field!r} is missing or not a number")
        by_id[row["id"]] = float(row[field])
    return [by_id[p.id] for p in pairs]


def run(cfg: RmConfig) -> dict:
    """Train; returns the summary also written to ``output/summary.json``."""
    device, bf16 = pick_device(cfg.loop)
    dist.setup(cfg.distributed, device)
    output = RunOutput.start(cfg.output, cfg.resume)  # a bucket output: its latest checkpoint comes here first
    lint = Lint()
    train_rows, held = load_split(cfg.data, cfg.eval_data, cfg.eval_fraction, "preference", lint)
    texts = (m["content"] for r in train_rows for k in ("prompt", "chosen", "rejected") for m in r[k])
    model_name = resolve_model(cfg.model, cfg.tiny, cfg.out, texts)

    def load() -> Any:
        torch.manual_seed(cfg.loop.seed)  # the new head's random init (and the adapter's): the same on every rank
        return load_for_training(model_name, head="seq_cls", gradient_checkpointing=cfg.gradient_checkpointing,
                                 lora=cfg.lora, seed=cfg.loop.seed)

    model, tok = load()
    engine = dist.wrap(model, cfg.distributed, device, bf16)
    use_chat_template(tok, cfg.chat_template, model_name)
    pairs = pair_examples(train_rows, tok, cfg.max_length, lint)
    eval_pairs = pair_examples(held, tok, cfg.max_length, lint)
    lint.enforce(cfg.lint, "rm data")
    if not pairs:
        raise UserError("no training pairs left after the data lint")
    margins, eval_margins = _margins(train_rows, pairs, cfg.margin_field), _margins(held, eval_pairs, cfg.margin_field)
    loop = cfg.loop
    plan = index_plan(len(pairs), loop.batch_size, loop.grad_accum, loop.seed, loop.shuffle)

    if cfg.eval_every:  # eval.jsonl continues a resumed run's lines (the resumed step re-evaluates), else starts afresh
        ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
        path = cfg.out / EVAL_FILE
        if dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            trim_jsonl(path, int(ckpt.name.split("-")[1]) - 1 if ckpt else -1)

    def step_batches(step: int) -> list[dict]:
        if cfg.eval_every and step and step % cfg.eval_every == 0:
            scores = evaluate(engine, eval_pairs, eval_margins, cfg, tok.pad_token_id)  # every rank: FSDP's forwards
            if dist.is_main():
                with open(cfg.out / EVAL_FILE, "a") as f:  # before the step: the weights after `step` updates
                    f.write(json.dumps({"step": step, **scores}) + "\n")
        return [pair_batch([pairs[i] for i in mb], tok.pad_token_id, [margins[i] for i in mb] if margins else None)
                for mb in plan(step)]

    total = steps_for(len(pairs), loop)
    dist.say(f"rm: {len(pairs)} pairs, {len(eval_pairs)} held out, {total} steps")
    t0 = time.perf_counter()
    last = train_loop(model, loop, cfg.out, total_steps=total, step_batches=step_batches, engine=engine,
                      loss_fn=rm_loss_fn(device, cfg.center_rewards_coefficient), tokenizer=tok,
                      on_checkpoint=output.push_checkpoint, resume=cfg.resume, desc="rm",
                      config=cfg.model_dump(mode="json"))
    seconds = time.perf_counter() - t0
    summary = {
        "algorithm": "rm", "model": model_name, "pairs": len(pairs), "eval_pairs": len(eval_pairs),
        "lint": dict(lint.counts), "rows_dropped": lint.rows, "steps": last["step"],
        "resumed_from": last["resumed_from"], "train_loss": last.get("loss"),
        "train_accuracy": last.get("accuracy"), "seconds": round(seconds, 2),
        "step_seconds": last.get("step_seconds"), "tokens_per_s": last.get("tokens_per_s_run"),
        "seconds_per_step": last.get("seconds_per_step"), "world_size": dist.shard()[1],
        **evaluate(engine, eval_pairs, eval_margins, cfg, tok.pad_token_id),
    }
    if last["step"] >= total:
        summary["final"] = output.publish_final(save_final(model, tok, cfg.out, summary, cfg.lora,
                                                           lambda: load()[0]))
    return summary
