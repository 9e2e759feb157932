"""Loss functions as small pure functions (veRL's ``core_algos.py`` style): tensors in, ``(sum, count)`` out.

Every loss returns the loss summed over its items and the number of items, never a mean: the loop
(loop.py) divides the whole step's gradient by the step's total count, which is what makes
gradient accumulation exact (REFERENCES §6.2). Shapes: B rows, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position that is not trained (the transformers / PyTorch convention)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T-1] targets: position t predicts token t+1. Counting targets after the
    shift matters (transformers PR #46204 counted before it, one too many per row)."""
    return labels[:, 1:]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits, [B, T] labels -> [B, T-1] log p(target), 0.0 where the target is IGNORE.

    Log-softmax in fp32 (bf16 logits lose ~3 digits), through the fused cross-entropy kernel so no
    second [B, T, V] tensor of log-probs is kept alive.
    """
    targets = shifted_targets(labels)
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return -nll.view(targets.shape)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL summed over target tokens, and the number of target tokens.

    Packed rows need nothing special here: the collator already set the label of every document's
    first token to IGNORE, so no document is trained to predict the next one's start.
    """
    targets = shifted_targets(labels)
    total = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                            reduction="sum")
    return total, (targets != IGNORE).sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] summed log-probs of each row's target tokens (DPO sums, not averages: TRL, REFERENCES §6.4)
    and [B] target counts (IPO's length normalisation needs them)."""
    logps = token_logps(logits, labels)
    return logps.sum(-1), (shifted_targets(labels) != IGNORE).sum(-1)
