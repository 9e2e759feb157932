"""Checkpoints: ``checkpoints/step-N``, made whole by renaming a temp folder, resumed exactly.

One process writes the weights as safetensors (transformers loads them; with LoRA the adapter) and the optimizer,
scheduler and RNG state in ``trainer_state.pt``. Several processes write model and optimizer
state with ``torch.distributed.checkpoint`` (``sharded/``: each rank its own shards, in parallel),
each rank's RNG state, and rank 0 the rest. ``trainer_state.pt`` is written last: a step folder
without it is not a checkpoint. A sharded checkpoint loads at any world size (DCP reshards on load);
the RNG streams, and so bit-exact resumption, need the same world size.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from . import lora
from .config import LoopConfig

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
SHARDED = "sharded"


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


def _rng() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(model, tokenizer, opt, sched, step: int, out_dir: Path, cfg: LoopConfig,
                    save_extra: Callable[[Path], None] | None) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temp folder renamed), then prune old ones. Every
    rank calls it; ``save_extra(folder)`` runs on every rank (its files must be named per rank)."""
    root = out_dir / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    rank, world = dist.shard()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state: dict[str, Any] = {"step": step, "scheduler": sched.state_dict(), "world_size": world}
    if dist.initialized():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / SHARDED))
        torch.save(_rng(), tmp / f"rng-{rank}.pt")
    else:
        model.save_pretrained(tmp)
        state.update(optimizer=opt.state_dict(), rng=_rng())
    if save_extra is not None:
        save_extra(tmp)
    dist.barrier()
    if rank == 0:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*[0-9]"))[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def resume(model, opt, sched, folder: Path) -> int:
    """Load a checkpoint into ``model``, ``opt`` and ``sched`` (and this rank's RNG); returns its step."""
    state = torch.load(folder / STATE_FILE, weights_only=True)
    sched.load_state_dict(state["scheduler"])
    if (folder / SHARDED).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)  # templates (the optimizer's state made), filled in place
        sharded = {"model": msd, "optim": osd}
        dcp.load(sharded, checkpoint_id=str(folder / SHARDED))
        set_state_dict(model, opt, model_state_dict=sharded["model"], optim_state_dict=sharded["optim"])
        rng = folder / f"rng-{dist.shard()[0]}.pt"
        if state["world_size"] == dist.shard()[1] and rng.is_file():
            _set_rng(torch.load(rng, weights_only=True))
        return int(state["step"])
    if dist.sharded_model(model):
        raise RuntimeError(f"checkpoint {folder} was written by one process: resume it with strategy ddp")
    if lora.is_peft(model):  # the checkpoint holds the adapter (save_pretrained of a peft model)
        from safetensors.torch import load_file

        lora.load_adapter_state(model, load_file(folder / "adapter_model.safetensors"))
    else:
        load_weights(model, folder)
    opt.load_state_dict(state["optimizer"])
    _set_rng(state["rng"])
    return int(state["step"])


def trim_jsonl(path: Path, upto: int) -> None:
    """Drop lines whose ``step`` is past ``upto`` (the resumed step), so a log continues without duplicates."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto]
    path.write_text("".join(ln + "\n" for ln in lines))
