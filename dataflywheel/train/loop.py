"""The one training loop (SFT, RM, DPO and GRPO all run it), flat in the nanoGPT/nanochat style.

The normalisation contract (docs/sources.md#loss-normalisation, trl#2175): a loss function returns the loss *summed*
over its micro-batch's items (target tokens, pairs, sequences) and how many items that was. The
loop backprops the sums of all the step's micro-batches and then divides the accumulated gradient
by the step's total count. Gradients are linear, so this is exactly the gradient of
Σ loss / N_global: accumulation over k micro-batches equals one batch of the same rows, however
unevenly the tokens fall. (Averaging per-micro-batch means, the bug of trl#2175, would over-weight
short micro-batches.) With several processes the count is summed over all of them first, so N processes
each running k micro-batches equal one process running the same N x k micro-batches.

A step's data comes from ``step_batches(step)``, a function of the step index (and the process's rank)
only, so a resumed run replays exactly the micro-batches the interrupted one would have seen.
Checkpoints (checkpoint.py) hold the weights plus optimizer, scheduler and RNG state; resuming from
one reproduces the uninterrupted run's weights exactly on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import progress
from . import checkpoint, report
from . import distributed as dist
from .checkpoint import latest_checkpoint, save_checkpoint, trim_jsonl
from .config import LoopConfig

METRICS_FILE = "metrics.jsonl"


@dataclass
class LossOut:
    """What a loss function gives the loop for one micro-batch."""

    loss_sum: torch.Tensor  # scalar, summed over the micro-batch's items
    count: float  # number of items in that sum
    # name -> (sum, count); reported per step as Σsum / Σcount, except "tokens" (real tokens computed),
    # reported as the step's total and as tokens_per_s
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


def steps_for(n_items: int, cfg: LoopConfig, world: int | None = None) -> int:
    """Optimizer steps for ``cfg.epochs`` passes over ``n_items`` (or ``cfg.max_steps``); each step
    takes batch_size x grad_accum items on each of the ``world`` processes (None: this run's)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    world = dist.shard()[1] if world is None else world
    return max(1, math.ceil(cfg.epochs * n_items / (cfg.batch_size * cfg.grad_accum * world)))


def index_plan(n_items: int, batch_size: int, grad_accum: int, seed: int, shuffle: bool = True,
               shard: tuple[int, int] | None = None) -> Callable[[int], list[list[int]]]:
    """``step -> micro-batches of item indices``: the items in a fresh seeded shuffle per epoch (or
    in order), laid end to end and cut into micro-batches; a pure function of the step (resume replays
    it) and of ``shard`` = (rank, world size) (None: this process's). A step takes grad_accum x world
    micro-batches; rank r gets every world-th one from the r-th, so W processes with k micro-batches
    see the rows one process with k x W would."""
    if n_items < 1:
        raise ValueError("no training items")
    rank, world = dist.shard() if shard is None else shard
    perms: dict[int, list[int]] = {}

    def item(position: int) -> int:
        epoch, at = divmod(position, n_items)
        if epoch not in perms:
            order = list(range(n_items))
            if shuffle:
                random.Random(seed * 1_000_003 + epoch).shuffle(order)
            perms[epoch] = order
        return perms[epoch][at]

    def plan(step: int) -> list[list[int]]:
        first = step * batch_size * grad_accum * world
        return [[item(first + m * batch_size + i) for i in range(batch_size)]
                for m in range(rank, grad_accum * world, world)]

    return plan


def lr_factor(step: int, total: int, cfg: LoopConfig) -> float:
    """Linear warmup from 0, then cosine / linear decay to ``min_lr_ratio`` (or constant)."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def pick_device(cfg: LoopConfig) -> tuple[str, bool]:
    """(device, bf16 autocast on?)"""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.startswith("cuda")
    return device, bf16


def autocast(device: str, bf16: bool) -> Any:
    """bf16 autocast when asked (CUDA by default; CPU on request, where torch supports it), else
    nothing: the loop's forwards and any outside it (eval, scoring, reference passes), so all see
    the same precision."""
    if bf16:
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off (TRL's ``disable_dropout=True`` for DPO/RM): also makes CPU runs deterministic.
    A LoRA adapter's own dropout (``lora.dropout``, asked for explicitly) stays."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0


def _optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only, never on biases and norm gains (nanoGPT, transformers Trainer).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def accumulate(engine: torch.nn.Module, batches: list[Any], loss_fn: Callable[[Any, Any], LossOut],
               params: list[torch.nn.Parameter], autocast: Callable[[], Any] = contextlib.nullcontext,
               ) -> tuple[float, float, dict[str, list[float]]]:
    """One step's gradient: backprop each micro-batch's summed loss, then divide the accumulated
    gradient once by the step's total count over all processes, giving the gradient of
    Σ loss / N_global (module docstring). ``engine``: the model behind ``distributed.wrap``, whose
    DDP / FSDP2 reduction averages over the W processes, so the division is by N_global / W.
    Returns (Σ loss, N_global, metric sums), all over every process."""
    def run(model: Any, batch: Any) -> tuple[torch.Tensor, LossOut]:
        out = loss_fn(model, batch)
        return out.loss_sum, out  # the tensor at the top, where FSDP2 hooks its backward

    loss_total, count_total = 0.0, 0.0
    sums: dict[str, list[float]] = {}
    for i, batch in enumerate(batches):
        with dist.no_sync(engine, last=i == len(batches) - 1):
            with autocast():  # forward only: backward runs outside autocast (PyTorch AMP recipe)
                loss, out = engine(run, batch)
            if loss.requires_grad:
                loss.backward()
        loss_total += float(loss.detach())
        count_total += float(out.count)
        for name, (s, c) in out.metrics.items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(c)
    world = dist.shard()[1]
    if world > 1:  # the step's totals over every process: the count divides, the rest is reported
        gathered = dist.gather((loss_total, count_total, sums))
        loss_total, count_total, sums = sum(g[0] for g in gathered), sum(g[1] for g in gathered), {}
        for _, _, part in gathered:
            for name, (s, c) in part.items():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
    if count_total > 0:
        for p in params:
            if p.grad is not None:
                p.grad.div_(count_total / world)
    return loss_total, count_total, sums


def train_loop(
    model: torch.nn.Module,
    cfg: LoopConfig,
    out_dir: Path,
    *,
    total_steps: int,
    step_batches: Callable[[int], list[Any]],
    loss_fn: Callable[[Any, Any], LossOut],
    engine: torch.nn.Module | None = None,
    tokenizer: Any = None,
    save_extra: Callable[[Path], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    resume: bool = True,
    desc: str = "train",
    config: dict | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``total_steps`` optimizer steps; returns the last step's metrics
    (plus ``resumed_from``). Metrics of every step go to ``out_dir/metrics.jsonl`` (and the
    trackers in ``cfg.report_to``, with ``config``), from rank 0. ``engine``: ``model`` behind
    ``distributed.wrap`` (None: wrapped here for one process); ``step_batches(step)`` gives this
    rank's micro-batches. ``on_checkpoint(folder)`` runs on rank 0 after each checkpoint is saved
    (output.py uploads it to a bucket)."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    device, bf16 = pick_device(cfg)
    main = dist.is_main()
    engine = engine if engine is not None else dist.wrap(model, dist.DistConfig(), device, bf16)
    dist.reshard(engine)
    disable_dropout(model)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    start = 0
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        start = checkpoint.resume(model, opt, sched, ckpt)
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    metrics_path = out_dir / METRICS_FILE
    if main:
        if start == 0:
            metrics_path.unlink(missing_ok=True)
        trim_jsonl(metrics_path, start)

    last: dict[str, Any] = {"step": start}
    show = cfg.progress and main
    # without its own bar (the flywheel turns it off) a command's progress line shows the steps
    with (tqdm(total=total_steps, initial=start, desc=desc, disable=not show, dynamic_ncols=True) as bar,
          progress.steps(total_steps, start, desc, enabled=main and not cfg.progress) as line,
          report.trackers(cfg.report_to, out_dir, cfg.run_name or desc, config or {}, dist.shard()[0],
                          cfg.tags) as log):
        step = start
        session = {"seconds": 0.0, "tokens": 0.0}  # this process's steps, for the run's throughput
        while step < total_steps:
            t0 = time.perf_counter()
            model.train()
            loss_total, count_total, sums = accumulate(engine, step_batches(step), loss_fn, params,
                                                       lambda: autocast(device, bf16))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
                grad_norm = grad_norm.full_tensor()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            last = {"step": step, "loss": loss_total / count_total if count_total else 0.0, "count": count_total,
                    "lr": lr, "grad_norm": float(grad_norm), "seconds": round(seconds, 4),
                    **{k: s / c for k, (s, c) in sums.items() if c}}
            session["seconds"] += seconds
            if "tokens" in sums:
                session["tokens"] += sums["tokens"][0]
                last["tokens"] = sums["tokens"][0]
                last["tokens_per_s"] = round(sums["tokens"][0] / seconds, 1)
            if main and (step % cfg.log_every == 0 or step == total_steps):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                log(last, step)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
            if line is not None:
                line.step = step
            stopping = cfg.stop_after is not None and step >= cfg.stop_after
            if step == total_steps or stopping or (cfg.save_every and step % cfg.save_every == 0):
                saved = save_checkpoint(model, tokenizer, opt, sched, step, out_dir, cfg, save_extra)
                if on_checkpoint is not None and main:
                    on_checkpoint(saved)
            if stopping:
                break
    out = {**last, "resumed_from": start, "total_steps": total_steps, "step_seconds": round(session["seconds"], 3),
           "seconds_per_step": round(session["seconds"] / max(1, step - start), 4)}
    if session["tokens"] and session["seconds"]:
        out["tokens_per_s_run"] = round(session["tokens"] / session["seconds"], 1)
    return out
