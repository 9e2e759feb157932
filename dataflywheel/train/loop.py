"""The one training loop (SFT, RM, DPO and GRPO all run it), flat in the nanoGPT/nanochat style.

The normalisation contract (docs/sources.md#loss-normalisation, trl#2175): a loss function returns the loss *summed*
over its micro-batch's items (target tokens, pairs, sequences) and how many items that was. The
loop backprops the sums of all the step's micro-batches and then divides the accumulated gradient
by the step's total count. Gradients are linear, so this is exactly the gradient of
Σ loss / N_global: accumulation over k micro-batches equals one batch of the same rows, however
unevenly the tokens fall. (Averaging per-micro-batch means, the bug of trl#2175, would over-weight
short micro-batches.) Single process: with data parallelism the count would be all-reduced first.

A step's data comes from ``step_batches(step)``, a function of the step index only, so a resumed
run replays exactly the micro-batches the interrupted one would have seen. Checkpoints hold the
weights (safetensors, loadable by transformers) plus optimizer, scheduler and RNG state; resuming
from one reproduces the uninterrupted run's weights exactly on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import progress
from .config import LoopConfig

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class LossOut:
    """What a loss function gives the loop for one micro-batch."""

    loss_sum: torch.Tensor  # scalar, summed over the micro-batch's items
    count: float  # number of items in that sum
    # name -> (sum, count); reported per step as Σsum / Σcount, except "tokens" (real tokens computed),
    # reported as the step's total and as tokens_per_s
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


def steps_for(n_items: int, cfg: LoopConfig) -> int:
    """Optimizer steps for ``cfg.epochs`` passes over ``n_items`` (or ``cfg.max_steps``)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_items / (cfg.batch_size * cfg.grad_accum)))


def index_plan(n_items: int, batch_size: int, grad_accum: int, seed: int,
               shuffle: bool = True) -> Callable[[int], list[list[int]]]:
    """``step -> micro-batches of item indices``: the items in a fresh seeded shuffle per epoch (or
    in order), laid end to end and cut into micro-batches; a pure function of the step (resume replays it)."""
    if n_items < 1:
        raise ValueError("no training items")
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
        first = step * batch_size * grad_accum
        return [[item(first + m * batch_size + i) for i in range(batch_size)] for m in range(grad_accum)]

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
    """Dropout off (TRL's ``disable_dropout=True`` for DPO/RM): also makes CPU runs deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only, never on biases and norm gains (nanoGPT, transformers Trainer).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def latest_checkpoint(out_dir: Path) -> Path | None:
    folders = sorted((out_dir / CHECKPOINTS).glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    done = [p for p in folders if (p / STATE_FILE).is_file()]
    return done[-1] if done else None


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load every ``*.safetensors`` in ``folder`` into ``model``; keys left out must be tied to a loaded one."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k in params and params[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {untied[:5]}, unexpected {unexpected[:5]}")


def save_checkpoint(model, tokenizer, opt, sched, step: int, out_dir: Path, cfg: LoopConfig,
                    save_extra: Callable[[Path], None] | None) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temp folder renamed), then prune old ones."""
    root = out_dir / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if save_extra is not None:
        save_extra(tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng},
               tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*[0-9]"))[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _resume(model, opt, sched, folder: Path) -> int:
    load_weights(model, folder)
    state = torch.load(folder / STATE_FILE, weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def trim_jsonl(path: Path, upto: int) -> None:
    """Drop lines whose ``step`` is past ``upto`` (the resumed step), so a log continues without duplicates."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto]
    path.write_text("".join(ln + "\n" for ln in lines))


def accumulate(model: torch.nn.Module, batches: list[Any], loss_fn: Callable[[Any, Any], LossOut],
               params: list[torch.nn.Parameter], autocast: Callable[[], Any] = contextlib.nullcontext,
               ) -> tuple[float, float, dict[str, list[float]]]:
    """One step's gradient: backprop each micro-batch's summed loss, then divide the accumulated
    gradient once by the step's total count, giving the gradient of Σ loss / N_global (module
    docstring). Returns (Σ loss, N_global, metric sums)."""
    loss_total, count_total = 0.0, 0.0
    sums: dict[str, list[float]] = {}
    for batch in batches:
        with autocast():  # forward only: backward runs outside autocast (PyTorch AMP recipe)
            out = loss_fn(model, batch)
        if out.loss_sum.requires_grad:
            out.loss_sum.backward()
        loss_total += float(out.loss_sum.detach())
        count_total += float(out.count)
        for name, (s, c) in out.metrics.items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(c)
    if count_total > 0:
        for p in params:
            if p.grad is not None:
                p.grad.div_(count_total)
    return loss_total, count_total, sums


def train_loop(
    model: torch.nn.Module,
    cfg: LoopConfig,
    out_dir: Path,
    *,
    total_steps: int,
    step_batches: Callable[[int], list[Any]],
    loss_fn: Callable[[Any, Any], LossOut],
    tokenizer: Any = None,
    save_extra: Callable[[Path], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    resume: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Train ``model`` for ``total_steps`` optimizer steps; returns the last step's metrics
    (plus ``resumed_from``). Metrics of every step go to ``out_dir/metrics.jsonl``.
    ``on_checkpoint(folder)`` runs after each checkpoint is saved (output.py uploads it to a bucket)."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    device, bf16 = pick_device(cfg)
    model.to(device)
    disable_dropout(model)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    start = 0
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        start = _resume(model, opt, sched, ckpt)
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    metrics_path = out_dir / METRICS_FILE
    if start == 0:
        metrics_path.unlink(missing_ok=True)
    trim_jsonl(metrics_path, start)

    last: dict[str, Any] = {"step": start}
    # without its own bar (the flywheel turns it off) a command's progress line shows the steps
    with (tqdm(total=total_steps, initial=start, desc=desc, disable=not cfg.progress, dynamic_ncols=True) as bar,
          progress.steps(total_steps, start, desc, enabled=not cfg.progress) as line):
        step = start
        session = {"seconds": 0.0, "tokens": 0.0}  # this process's steps, for the run's throughput
        while step < total_steps:
            t0 = time.perf_counter()
            model.train()
            loss_total, count_total, sums = accumulate(model, step_batches(step), loss_fn, params,
                                                       lambda: autocast(device, bf16))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
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
            if step % cfg.log_every == 0 or step == total_steps:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
            if line is not None:
                line.step = step
            stopping = cfg.stop_after is not None and step >= cfg.stop_after
            if step == total_steps or stopping or (cfg.save_every and step % cfg.save_every == 0):
                saved = save_checkpoint(model, tokenizer, opt, sched, step, out_dir, cfg, save_extra)
                if on_checkpoint is not None:
                    on_checkpoint(saved)
            if stopping:
                break
    out = {**last, "resumed_from": start, "total_steps": total_steps, "step_seconds": round(session["seconds"], 3),
           "seconds_per_step": round(session["seconds"] / max(1, step - start), 4)}
    if session["tokens"] and session["seconds"]:
        out["tokens_per_s_run"] = round(session["tokens"] / session["seconds"], 1)
    return out
