"""Several processes on PyTorch's own engine: ``torchrun`` (or ``dataflywheel train ... --nproc N``),
DDP or FSDP2 (``torch.distributed.fsdp.fully_shard``), gloo on CPU and nccl on CUDA (docs/training.md#several-processes).

Every use of the model goes through one wrapper's ``forward`` (``Calls``): DDP prepares its gradient
all-reduce and FSDP2 gathers the root's parameters only when the wrapped module's forward runs, and
our losses read the backbone and the head separately (models/label_logps.py), never ``model(...)``.
So ``engine(fn, *args)`` runs ``fn(model, *args)`` inside that forward, whatever the strategy.

Under FSDP every rank must make the same forward calls (each layer's parameters are all-gathered as
it runs), so evaluation passes run the same batches on every rank; training micro-batches and DPO's
reference pass are split evenly by construction.

Without ``torchrun`` (``WORLD_SIZE`` unset) nothing here starts a process group: one process,
``Calls`` around the bare model, checkpoints as before.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict


class DistConfig(BaseModel):
    """``strategy``: ddp replicates the model and all-reduces gradients; fsdp shards parameters,
    gradients and optimizer state over the processes (FSDP2: each decoder layer, then the rest).
    Both take effect only under ``torchrun`` (fsdp also with one process there: ``--nproc 1``)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["ddp", "fsdp"] = "ddp"
    timeout_minutes: float = 30.0  # a rank waiting longer on the others fails (torch's default is 10 for nccl)


class Calls(torch.nn.Module):
    """``Calls(model)(fn, *args)`` == ``fn(model, *args)``, run as this module's forward (module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def launched() -> bool:
    """Started by torchrun (or our ``--nproc``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(cfg: DistConfig, device: str) -> None:
    """Join the process group once (gloo on CPU, nccl on CUDA); each rank takes its local GPU."""
    if not launched() or dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(minutes=cfg.timeout_minutes))


def shard() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return shard()[0] == 0


def say(message: str) -> None:
    """Print from rank 0 only (every rank runs the same script)."""
    if is_main():
        print(message, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0, then on the others (which find its files made: a tiny model's base, a
    bucket checkpoint pulled into the staging folder)."""
    if is_main():
        out = fn()
        barrier()
        return out
    barrier()
    return fn()


def initialized() -> bool:
    return dist.is_initialized()


def sharded_model(module: torch.nn.Module) -> bool:
    """Parameters sharded by FSDP2 (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def wrap(model: torch.nn.Module, cfg: DistConfig, device: str, bf16: bool) -> torch.nn.Module:
    """The engine every forward goes through: ``Calls(model)``, under DDP or FSDP2 when several
    processes run (or fsdp is asked for). ``model`` is moved to ``device`` first."""
    if not getattr(model, "is_loaded_in_4bit", False):  # a QLoRA base is placed on its GPU as it loads
        model.to(device)
    engine = Calls(model)
    if cfg.strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 parameters in forward/backward, fp32 gradient reduction and master weights (CUDA only:
        # on CPU bf16 runs as autocast in the loop)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and device.startswith("cuda") else MixedPrecisionPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(engine, mp_policy=mp)  # the rest: embeddings, final norm, head
        return engine
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        # no buffer broadcast: rotary tables are constants, and a broadcast per forward would make
        # ranks that run different numbers of no-grad forwards wait on each other
        # gradients as views of the all-reduce buckets: no second copy of them (4 bytes per parameter)
        return DistributedDataParallel(engine, device_ids=[torch.cuda.current_device()] if device.startswith("cuda")
                                       else None, broadcast_buffers=False, gradient_as_bucket_view=True)
    return engine


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: the modules named in transformers'
    ``_no_split_modules`` (LlamaDecoderLayer, GPT2Block, ...), found through a PEFT wrapper too."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    base = getattr(model, "get_base_model", lambda: model)()
    names |= set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp: no decoder layers found in {type(model).__name__} (no _no_split_modules)")
    return layers


def no_sync(engine: torch.nn.Module, last: bool) -> Any:
    """Gradients are reduced only with a step's last micro-batch (DDP ``no_sync``; FSDP2's
    ``set_requires_gradient_sync``), once per step instead of once per micro-batch."""
    import contextlib

    from torch.distributed.fsdp import FSDPModule

    if isinstance(engine, FSDPModule):
        engine.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if hasattr(engine, "no_sync") and not last:
        return engine.no_sync()
    return contextlib.nullcontext()


def reshard(engine: torch.nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward outside training (DPO's reference
    pass, evaluation): shard them again, so the optimizer is built on the shards."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(engine, FSDPModule):
        engine.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state, gathered on CPU on rank 0 (other ranks get {}): for ``final/``."""
    if not dist.is_initialized():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
