"""GRPO's per-step rollout monitoring (docs/sources.md#grpo), computed on the whole rollout, every
rank's samples gathered, so N processes report what one would."""

from __future__ import annotations

import torch


def rollout_metrics(rewards: torch.Tensor, g: int, lengths: torch.Tensor, truncated: torch.Tensor,
                    advantages: torch.Tensor, ratio: torch.Tensor | None) -> dict[str, float]:
    """[N] rewards (NaN: unscored), completion lengths in tokens, truncated flags and advantages of the
    rollout (``ratio``: this rank's sampler IS ratios, or None) -> reward, the mean within-group std and
    the share of groups with one reward for all (as TRL logs them: with G equal rewards GRPO trains
    nothing), completion lengths under TRL's names (``completions/mean_length``, ``min_length``,
    ``max_length``, ``clipped_ratio`` = truncated share), the mean length of the completions the step
    pushes up (advantage > 0) and down (< 0), whose gap shows a length bias (Dr. GRPO), and the IS
    ratio's mean and max. ``completion_length`` and ``truncated`` are the earlier names of two of them."""
    stds = [float(grp[~grp.isnan()].std()) if (~grp.isnan()).sum() > 1 else 0.0 for grp in rewards.view(-1, g)]
    valid, lengths = rewards[~rewards.isnan()], lengths.float()
    mean_length, clipped = float(lengths.mean()), float(truncated.float().mean())
    out = {"reward_std": sum(stds) / len(stds), "frac_reward_zero_std": sum(s < 1e-8 for s in stds) / len(stds),
           "unscored": float(rewards.isnan().float().mean()), "truncated": clipped, "completion_length": mean_length,
           "completions/mean_length": mean_length, "completions/min_length": float(lengths.min()),
           "completions/max_length": float(lengths.max()), "completions/clipped_ratio": clipped}
    for name, side in (("completions/mean_length_adv_pos", advantages > 0), ("completions/mean_length_adv_neg",
                                                                             advantages < 0)):
        if side.any():
            out[name] = float(lengths[side].mean())
    if valid.numel():
        out["reward"] = float(valid.mean())
    if ratio is not None and ratio.numel():
        out["is_ratio/mean"], out["is_ratio/max"] = float(ratio.mean()), float(ratio.max())
    return out
