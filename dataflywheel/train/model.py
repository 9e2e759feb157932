"""Models for training: a fresh, private copy (never the shared load-once instance the scorers use,
since training changes its weights), or a tiny model built on the spot for configs and tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dataflywheel.errors import UserError
from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_fp32


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
    if not (base / "config.json").is_file():
        build_tiny_causal_lm(base, texts=list(texts), arch=tiny.arch, hidden=tiny.hidden, layers=tiny.layers,
                             heads=tiny.heads, vocab_size=tiny.vocab_size, seed=tiny.seed,
                             max_positions=tiny.max_positions, split_digits=tiny.split_digits)
    return str(base)


def load_for_training(name: str, head: str = "causal_lm", trust_remote_code: bool = False,
                      gradient_checkpointing: bool = False) -> tuple[Any, Any]:
    """``(model in fp32, tokenizer)``; ``head="seq_cls"`` loads a 1-logit sequence classifier (reward model)
    on the same backbone. fp32 master weights: bf16 runs as autocast in the loop.
    ``gradient_checkpointing``: each layer's activations are recomputed in the backward pass
    (non-reentrant, PyTorch's recommended variant) instead of kept from the forward."""
    model, tok = load_fp32(name, head, trust_remote_code)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, tok


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def save_final(model: Any, tokenizer: Any, out: Path, summary: dict) -> Path:
    """``out/final``: a standard transformers folder (safetensors), plus ``out/summary.json``."""
    final = out / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return final
