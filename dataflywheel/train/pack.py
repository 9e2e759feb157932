"""Packing: best-fit-decreasing bins over the whole dataset, and the collators that feed them.

BFD (Ding et al. 2024, docs/sources.md#sft-and-packing): sort documents longest first; put each in the open bin
with the least free space that still fits it, else open a bin. We pack the whole dataset at once
(TRL packs per ``datasets.map`` batch). A sorted list of (free space, bin) with bisect finds the
best bin in O(log n) comparisons.

A packed row restarts ``position_ids`` at 0 for each document and passes no attention mask, so
transformers sees the packed sequences and keeps attention inside each document (flash varlen on
GPU; a block mask for sdpa / eager on CPU). That only holds with ``use_cache=False``
(docs/sources.md#sft-and-packing), which every training forward here passes. ``attention="block_mask"`` builds the
block-diagonal causal mask explicitly, for models that do not read packed position ids. The label
of each document's first token is IGNORE: the shifted loss would otherwise train the previous
document's last token to predict it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from .data import Example
from .losses import IGNORE


def bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= ``capacity``; every length must fit alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"item {i} has length {size} > capacity {capacity}")
        if size == 0:
            continue
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, b))
    return bins


def padding_fraction(row_lengths: Sequence[int], width: int | Sequence[int]) -> float:
    """1 - real tokens / (rows x width): the share of computed positions that are padding."""
    widths = [width] * len(row_lengths) if isinstance(width, int) else list(width)
    total = sum(widths)
    return 1 - sum(row_lengths) / total if total else 0.0


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask (the unpacked baseline and the RM/DPO batches);
    ``num_tokens`` counts the real (non-pad) positions."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "num_tokens": int(mask.sum())}


def collate_packed(bins: Sequence[Sequence[Example]], pad_id: int, attention: str = "position_ids") -> dict:
    """One row per bin: documents end to end, positions restarting, the first label of each IGNORE.

    The tail of a row (shorter bins in the micro-batch) is padding, a document of its own with
    IGNORE labels. ``attention="block_mask"`` adds a [B, 1, L, L] boolean mask (True = may attend).
    """
    width = max(sum(len(e.input_ids) for e in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    seg = torch.full((len(bins), width), -1, dtype=torch.long)
    for r, docs in enumerate(bins):
        at = 0
        for d, e in enumerate(docs):
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE  # never predicted from the previous document
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = d
            at += n
        pos[r, at:] = torch.arange(width - at)  # padding: one more document, never trained
    real = sum(len(e.input_ids) for b in bins for e in b)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "num_tokens": real}
    if attention == "block_mask":
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        batch["attention_mask"] = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    elif attention != "position_ids":
        raise ValueError(f"unknown packed attention {attention!r}; position_ids or block_mask")
    return batch
