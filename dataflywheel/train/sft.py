"""Supervised fine-tuning on Conversation rows: assistant tokens only, packed, one loop.

Several processes (distributed.py) each take their share of every step's bins; LoRA (lora.py)
trains adapters. The loss is plain next-token NLL on assistant tokens (every assistant turn of a multi-turn chat, EOS
included); packing is on by default (TRL's default is off) because BFD bins waste almost nothing.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field

from dataflywheel.errors import UserError
from dataflywheel.models.label_logps import label_logps

from . import distributed as dist
from .config import TrainBase
from .data import Example, Lint, load_split, sft_examples, use_chat_template
from .loop import LossOut, index_plan, pick_device, steps_for, train_loop
from .losses import sft_loss
from .model import load_for_training, resolve_model, save_final, to_device
from .output import RunOutput
from .pack import bfd, collate_packed, collate_padded, padding_fraction


class SftConfig(TrainBase):
    packing: bool = True
    attention: Literal["position_ids", "block_mask"] = "position_ids"  # block_mask: models ignoring packed positions
    eval_batch_size: int = Field(16, ge=1)


def sft_batches(examples: list[Example], cfg: SftConfig, pad_id: int) -> tuple[Any, int, dict[str, float]]:
    """``(step -> micro-batches, number of items, packing stats)``; items are bins when packing."""
    lengths = [len(e.input_ids) for e in examples]
    loop = cfg.loop
    if cfg.packing:
        bins = bfd(lengths, cfg.max_length)
        fill = [sum(lengths[i] for i in b) for b in bins]
        stats = {"bins": len(bins), "padding_fraction": padding_fraction(fill, cfg.max_length)}
        plan = index_plan(len(bins), loop.batch_size, loop.grad_accum, loop.seed, loop.shuffle)

        def step_batches(step: int) -> list[dict]:
            return [collate_packed([[examples[i] for i in bins[b]] for b in mb], pad_id, cfg.attention)
                    for mb in plan(step)]

        return step_batches, len(bins), stats
    plan = index_plan(len(examples), loop.batch_size, loop.grad_accum, loop.seed, loop.shuffle)
    first = plan(0)  # padding is per micro-batch: measure it over one epoch's worth of batches
    widths = [max(lengths[i] for i in mb) for mb in first]
    stats = {"padding_fraction": padding_fraction([sum(lengths[i] for i in mb) for mb in first],
                                                  [w * len(mb) for w, mb in zip(widths, first)])}

    def padded(step: int) -> list[dict]:
        return [collate_padded([examples[i] for i in mb], pad_id) for mb in plan(step)]

    return padded, len(examples), stats


def sft_loss_fn(device: str, chunk: int):
    def loss_fn(model: Any, batch: dict) -> LossOut:
        batch = to_device(batch, device)
        labels, real = batch.pop("labels"), batch.pop("num_tokens")
        total, count = sft_loss(label_logps(model, labels, chunk=chunk, **batch), labels)
        # per step: real tokens, and the share of computed positions that were padding
        return LossOut(total, float(count), {"tokens": (real, 1), "padding": (labels.numel() - real, labels.numel())})

    return loss_fn


def _nll(model: Any, batch: dict, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels, _ = batch.pop("labels"), batch.pop("num_tokens")
    return sft_loss(label_logps(model, labels, chunk=chunk, **batch), labels)


@torch.no_grad()
def eval_loss(engine: Any, examples: list[Example], pad_id: int, device: str, batch_size: int,
              chunk: int) -> float | None:
    """Token-weighted NLL over held-out examples (padded batches); every rank runs all of them
    (``engine``: the wrapped model, distributed.py)."""
    if not examples:
        return None
    engine.eval()
    total, count = 0.0, 0
    for at in range(0, len(examples), batch_size):
        batch = to_device(collate_padded(examples[at:at + batch_size], pad_id), device)
        s, c = engine(_nll, batch, chunk)
        total, count = total + float(s), count + int(c)
    return total / count if count else None


def run(cfg: SftConfig) -> dict:
    """Train; returns the summary also written to ``output/summary.json``."""
    device, bf16 = pick_device(cfg.loop)
    dist.setup(cfg.distributed, device)
    output = RunOutput.start(cfg.output, cfg.resume)  # a bucket output: its latest checkpoint comes here first
    lint = Lint()
    train_rows, held = load_split(cfg.data, cfg.eval_data, cfg.eval_fraction, "conversation", lint)
    texts = (m["content"] for r in train_rows for m in r["messages"])
    model_name = resolve_model(cfg.model, cfg.tiny, cfg.out, texts)

    def load() -> Any:
        return load_for_training(model_name, gradient_checkpointing=cfg.gradient_checkpointing, lora=cfg.lora,
                                 seed=cfg.loop.seed)

    model, tok = load()
    engine = dist.wrap(model, cfg.distributed, device, bf16)
    use_chat_template(tok, cfg.chat_template, model_name)
    examples = sft_examples(train_rows, tok, cfg.max_length, lint)
    eval_examples = sft_examples(held, tok, cfg.max_length, lint)
    lint.enforce(cfg.lint, "sft data")
    if not examples:
        raise UserError("no training rows left after the data lint")
    step_batches, n_items, pack_stats = sft_batches(examples, cfg, tok.pad_token_id)
    total = steps_for(n_items, cfg.loop)
    dist.say(f"sft: {len(examples)} rows ({lint.truncated} truncated at {cfg.max_length}), {n_items} "
             f"{'bins' if cfg.packing else 'rows'}, padding {pack_stats['padding_fraction']:.1%}, {total} steps")
    t0 = time.perf_counter()
    last = train_loop(model, cfg.loop, cfg.out, total_steps=total, step_batches=step_batches, engine=engine,
                      loss_fn=sft_loss_fn(device, cfg.logits_chunk), tokenizer=tok, on_checkpoint=output.push_checkpoint,
                      resume=cfg.resume, desc="sft", config=cfg.model_dump(mode="json"))
    summary = {
        "algorithm": "sft", "model": model_name, "rows": len(examples), "eval_rows": len(eval_examples),
        "lint": dict(lint.counts), "rows_dropped": lint.rows, "truncated": lint.truncated, "packing": cfg.packing, **pack_stats,
        "steps": last["step"], "resumed_from": last["resumed_from"], "train_loss": last.get("loss"),
        "seconds": round(time.perf_counter() - t0, 2),
        "step_seconds": last.get("step_seconds"), "tokens_per_s": last.get("tokens_per_s_run"),
        "eval_loss": eval_loss(engine, eval_examples, tok.pad_token_id, device, cfg.eval_batch_size,
                               cfg.logits_chunk),
        "world_size": dist.shard()[1],
    }
    if last["step"] >= total:
        summary["final"] = output.publish_final(save_final(model, tok, cfg.out, summary, cfg.lora,
                                                           lambda: load()[0]))
    return summary
