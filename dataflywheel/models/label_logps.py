"""Per-token log-probs of the labels without the [batch, length, vocab] logits.

A causal LM's logits are its last hidden states through the output head. At a 150k vocabulary, 8
rows of 4,096 tokens are 8 * 4096 * 150k * 4 B = 19.7 GB of fp32 logits, more than a 7B model's
activations. Here the backbone runs once, only the positions that predict a label (target !=
IGNORE) are gathered, and the head and log-softmax run over them ``chunk`` positions at a time. With
gradients on, each chunk is recomputed in the backward pass (activation checkpointing), so at most
one chunk of logits and its gradient are alive at once. Equal to ``losses.token_logps`` on the full
logits to float rounding (tests/test_lean_memory.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # the transformers / PyTorch label of a position that is not scored
# Positions whose logits are alive at once: 1024 x 49,152 (SmolLM2) x 4 B = 201 MB, x 151,936
# (Qwen2.5 / Qwen3) = 622 MB, against ~20 GB for the full logits above.
DEFAULT_CHUNK = 1024


def unwrap(model: Any) -> Any:
    """A peft model's base transformers model (adapters injected in its layers); any other model as is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: Any) -> Any:
    """The transformer under a ``*ForCausalLM`` head (``model.model`` for Llama, ``transformer`` for GPT-2),
    of a peft model's base too (its LoRA layers live inside the base's modules)."""
    model = unwrap(model)
    inner = getattr(model, model.base_model_prefix, None)
    if inner is None or inner is model:
        raise ValueError(f"{type(model).__name__} has no backbone under {model.base_model_prefix!r}")
    return inner


def _head_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor, scale: float, softcap: float | None,
                temperature: float) -> torch.Tensor:
    # what the model's own forward does after the head (Cohere's logit_scale, Gemma 2/3's softcap), in fp32
    logits = head(hidden).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def last_hidden(model: Any, **inputs: Any) -> torch.Tensor:
    """[B, T, H] final hidden states (after the last norm), the head's input; ``inputs`` go to the
    backbone (input_ids, attention_mask, position_ids)."""
    return backbone(model)(**inputs, use_cache=False).last_hidden_state


def head_logps(model: Any, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
               chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """[B, T, H] hidden states, [B, T] labels -> [B, T-1] log p(target) (position t predicts token
    t+1), 0.0 where the target is IGNORE. ``temperature`` divides the logits first (GRPO's tempered
    policy); one ``hidden`` can be read at several temperatures."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    config = model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    picked, wanted = hidden[:, :-1][keep], targets[keep]  # [N, H], [N]: only positions that are scored
    head = model.get_output_embeddings()
    grad = torch.is_grad_enabled() and picked.requires_grad
    pieces = []
    for at in range(0, picked.shape[0], chunk):
        args = (head, picked[at:at + chunk], wanted[at:at + chunk], scale, softcap, temperature)
        pieces.append(checkpoint(_head_logps, *args, use_reentrant=False) if grad else _head_logps(*args))
    values = torch.cat(pieces) if pieces else picked.new_zeros(0, dtype=torch.float32)
    return torch.zeros(targets.shape, dtype=torch.float32, device=values.device).masked_scatter(keep, values)


def label_logps(model: Any, labels: torch.Tensor, *, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
                **inputs: Any) -> torch.Tensor:
    """``head_logps`` of one backbone pass over ``inputs``: the [B, T-1] log-probs of the labels."""
    return head_logps(model, last_hidden(model, **inputs), labels, temperature=temperature, chunk=chunk)
