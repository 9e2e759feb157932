"""Models for training: a fresh, private copy (never the shared load-once instance the scorers use,
since training changes its weights), or a tiny model built on the spot for configs and tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dataflywheel.errors import UserError
from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_fp32

from . import distributed as dist
from . import lora as lora_mod
from .lora import LoraConfig


class TinyInit(BaseModel):
    """Build a randomly initialised model (tokenizer trained on the training text) instead of loading one:
    the configs' offline default, so ``dataflywheel train`` runs on a fresh machine in about a minute."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "llama"
    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    vocab_size: int = Field(2000, ge=300)
    max_positions: int = Field(1024, ge=16)
    seed: int = 0
    split_digits: bool = False  # one token per digit (arithmetic tasks); see train_bpe_tokenizer


def resolve_model(model: str | None, tiny: TinyInit | None, out: Path, texts: Iterable[str]) -> str:
    """The model to start from: ``model``, or a tiny one built once into ``out/base``."""
    if (model is None) == (tiny is None):
        raise UserError("give exactly one of model (a folder or Hub id) or tiny (build a small model here)")
    if tiny is None:
        return model  # type: ignore[return-value]
    base = out / "base"

    def build() -> None:  # rank 0 builds it; the others then find it
        if not (base / "config.json").is_file():
            build_tiny_causal_lm(base, texts=list(texts), arch=tiny.arch, hidden=tiny.hidden, layers=tiny.layers,
                                 heads=tiny.heads, vocab_size=tiny.vocab_size, seed=tiny.seed,
                                 max_positions=tiny.max_positions, split_digits=tiny.split_digits)

    dist.main_first(build)
    return str(base)


def load_for_training(name: str, head: str = "causal_lm", trust_remote_code: bool = False,
                      gradient_checkpointing: bool = False, lora: LoraConfig | None = None,
                      seed: int = 0) -> tuple[Any, Any]:
    """``(model in fp32, tokenizer)``; ``head="seq_cls"`` loads a 1-logit sequence classifier (reward model)
    on the same backbone. fp32 master weights: bf16 runs as autocast in the loop.
    ``gradient_checkpointing``: each layer's activations are recomputed in the backward pass
    (non-reentrant, PyTorch's recommended variant) instead of kept from the forward.
    ``lora``: the model comes back as a peft model with fresh adapters drawn from ``seed`` (lora.py)."""
    if lora is not None and lora.load_in_4bit:
        model, tok = lora_mod.load_4bit(name, head, trust_remote_code)
    else:
        model, tok = load_fp32(name, head, trust_remote_code)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = lora_mod.apply(model, lora, head, seed)
    return model, tok


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def save_final(model: Any, tokenizer: Any, out: Path, summary: dict, lora: LoraConfig | None = None,
               rebuild: Callable[[], Any] | None = None) -> Path:
    """``out/final``: a standard transformers folder (safetensors), or with LoRA the adapter (and
    ``final/merged`` on request), plus ``out/summary.json``. Every rank calls it: the weights are
    gathered from all processes and rank 0 writes. ``rebuild()``: the same model freshly built on
    rank 0, to take the gathered weights when ``model``'s own are sharded (FSDP)."""
    final = out / "final"
    state = dist.full_state_dict(model) if dist.initialized() else None
    if dist.is_main():
        if state is not None and dist.sharded_model(model):
            model = rebuild()  # type: ignore[misc]
            model.load_state_dict(state)
            state = None
        if lora is not None:
            model.save_pretrained(final)  # the adapter
            if lora.merge:
                lora_mod.merged_model(model).save_pretrained(final / "merged")
                tokenizer.save_pretrained(final / "merged")
        else:
            model.save_pretrained(final, state_dict=state)
        tokenizer.save_pretrained(final)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    dist.barrier()
    return final
