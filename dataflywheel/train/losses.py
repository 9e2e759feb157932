"""Loss functions as small pure functions (veRL's ``core_algos.py`` style): tensors in, ``(sum, count)`` out.

Every loss returns the loss summed over its items and the number of items, never a mean: the loop
(loop.py) divides the whole step's gradient by the step's total count, which is what makes
gradient accumulation exact (docs/sources.md#loss-normalisation). Shapes: B rows, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataflywheel.models.label_logps import IGNORE  # the label of a position that is not trained

from .pref_losses import LENGTH_READERS, REFERENCE_FREE, Knobs, Pairs, preference_loss


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T-1] targets: position t predicts token t+1. Counting targets after the
    shift matters (transformers PR #46204 counted before it, one too many per row)."""
    return labels[:, 1:]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits, [B, T] labels -> [B, T-1] log p(target), 0.0 where the target is IGNORE.

    The direct computation on full logits; the trainers get the same numbers from hidden states in
    chunks without these logits (models/label_logps.py). Log-softmax in fp32 (bf16 logits lose ~3
    digits), through the fused cross-entropy kernel so no second [B, T, V] tensor is kept alive.
    """
    targets = shifted_targets(labels)
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return -nll.view(targets.shape)


def sft_loss(logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T-1] target log-probs -> next-token NLL summed over target tokens, and their number.

    Packed rows need nothing special here: the collator already set the label of every document's
    first token to IGNORE, so no document is trained to predict the next one's start.
    """
    return -logps.sum(), (shifted_targets(labels) != IGNORE).sum()


def sequence_logps(logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T-1] target log-probs -> [B] summed log-probs of each row's target tokens (DPO sums, not
    averages: TRL, docs/sources.md#dpo) and [B] target counts (IPO's length normalisation needs them)."""
    return logps.sum(-1), (shifted_targets(labels) != IGNORE).sum(-1)


def _groups(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N] rewards -> [N/G, G] rewards, which are scored (not NaN), and the scored count per group."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    valid = ~torch.isnan(r)
    return r, valid, valid.sum(-1, keepdim=True)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """[N] rewards (NaN = could not score), groups of ``group_size`` adjacent samples of one prompt -> [N] advantages.

    A_i = r_i − mean_group(r), divided by std + eps unless ``scale == "none"`` (TRL ``scale_rewards``,
    eps 1e-4, docs/sources.md#grpo): "group" uses the group's std (GRPO), "batch" the std of all rewards
    (TRL), "none" no division (Dr. GRPO: dividing by a small std up-weights near-unanimous groups).
    Stds are unbiased (torch.std, as TRL and veRL). NaN rewards are left out of the mean and std
    (TRL's nan-aware reductions) and get advantage 0, so an unscorable sample trains nothing.
    """
    r, valid, n = _groups(rewards, group_size)
    mean = torch.where(valid, r, 0.0).sum(-1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(valid, r - mean, 0.0)
    if scale == "none":
        return centred.view(-1)
    if scale == "group":
        std = (centred.square().sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    elif scale == "batch":
        scored = r[valid]
        std = scored.std() if scored.numel() > 1 else r.new_zeros(())
    else:
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return (centred / (std + eps)).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024) as TRL 1.16 computes it (``rloo_trainer.py``,
    ``_generate_and_score_completions``): [N] rewards -> [N] advantages.

    A_i = r_i − mean_{j≠i} r_j over the group's scored siblings, = G/(G−1)·(r_i − mean) when the whole
    group is scored: the baseline leaves the sample out, so it is independent of the sample's own reward.
    A NaN reward is out of every baseline and gets 0, as does the one scored sample of a group (no
    sibling: TRL's 0/0, zeroed). ``normalize`` (TRL ``RLOOConfig.normalize_advantages``) then maps the
    batch's defined advantages to (A − mean) / (std + eps), unbiased std and eps 1e-4 as TRL.
    """
    r, valid, n = _groups(rewards, group_size)
    defined = valid & (n > 1)
    total = torch.where(valid, r, 0.0).sum(-1, keepdim=True)
    adv = torch.where(defined, r - (total - torch.where(valid, r, 0.0)) / (n - 1).clamp(min=1), 0.0)
    if normalize:
        a = adv[defined]
        # TRL's nanstd of fewer than 2 values is NaN, which it then zeroes: every advantage 0
        adv = torch.where(defined, (adv - a.mean()) / (a.std() + eps), 0.0) if a.numel() > 1 else adv.zero_()
    return adv.view(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, weights: torch.Tensor | None = None,
                            eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262) as OpenRLHF computes it
    (``openrlhf/trainer/ppo_utils/experience_maker.py``, ``advantage_estimator="reinforce_baseline"``):
    [N] rewards -> [N] advantages.

    x_i = r_i − mean_group(r) (no division by the group's std), then whitened over the whole batch:
    (x_i − μ) / σ, with μ and the population variance σ² (clamped at eps = 1e-8, OpenRLHF's) over the
    batch. OpenRLHF whitens token-level advantages over every response token; with one outcome reward,
    γ = 1 and no KL in the reward, every token carries its completion's x_i, so ``weights`` = [N]
    trained-token counts reproduces it exactly (None: every completion weighs the same). The batch is
    the whole rollout, every rank's (grpo.py gathers rewards and counts first). NaN rewards are out of
    both means and get 0. Unlike GRPO, a unanimous group trains: its x = 0 becomes −μ/σ.
    """
    r, valid, _ = _groups(rewards, group_size)
    x = group_advantages(rewards, group_size, "none").view_as(r)
    w = (torch.ones_like(r) if weights is None else weights.float().view_as(r)) * valid
    total = w.sum()
    if total <= 0:
        return torch.zeros_like(x).view(-1)
    mean = (x * w).sum() / total
    var = ((x - mean).square() * w).sum() / total
    return torch.where(valid, (x - mean) * var.clamp(min=eps).rsqrt(), 0.0).view(-1)


def estimate_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo", *, scale: str = "group",
                        normalize: bool = False, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The configured estimator (``GrpoConfig.advantage``) on [N] rewards; ``scale`` is GRPO's, ``normalize``
    RLOO's, ``weights`` (trained tokens per completion) REINFORCE++'s."""
    if estimator == "grpo":
        return group_advantages(rewards, group_size, scale)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_size, normalize)
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, group_size, weights)
    raise ValueError(f"advantage estimator must be grpo, rloo or reinforce_pp, got {estimator!r}")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π || π_ref) (Schulman's; TRL, veRL ``low_var_kl``):
    exp(ref − logp) − (ref − logp) − 1, which is >= 0 everywhere and 0 where the two agree."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    is_weights: torch.Tensor | None = None,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, float, dict[str, tuple[float, float]]]:
    """PPO-clip policy loss of GRPO (TRL ``grpo_trainer._compute_loss``, docs/sources.md#grpo) as ``(sum, count, metrics)``.

    Shapes: ``logps`` (with grad), ``old_logps``, ``ref_logps``, ``is_weights`` and ``mask`` [B, T]
    (log-probs of the completion tokens, mask 1 on trained completion tokens); ``advantages`` [B].
    Per token: ρ = exp(logp − old), ℓ = −min(ρA, clip(ρ, 1−ε, 1+ε_high)A), times the sampler
    importance weight when given (TIS), plus β·k3 KL to the reference when β > 0.
    ``importance_sampling_level="sequence"`` is GSPO (Zheng et al. 2025): one ratio per completion,
    s = exp(mean over its masked tokens of (logp − old)), clipped and broadcast over its tokens. As in
    TRL 1.16 the gradient flows through the mean, so each token gets −A·s/|y| (unclipped): GSPO's
    sequence-level gradient, also what the paper's GSPO-token form sg[s]·π/sg[π] gives.

    The normalisations as (sum, count), so the loop's Σsum / Σcount over the step's micro-batches and
    processes is the whole step's loss:
    - dapo:    (Σ ℓM, ΣM) — every completion token of the step weighs the same (TRL's default; TRL
               divides by the token count of the whole step, across accumulation and processes).
    - bnpo:    (Σ ℓM / ΣM of this micro-batch, 1) — TRL's token mean over the *local* batch, so the
               step averages micro-batch means (TRL divides by the accumulation steps, DDP averages
               ranks). It equals dapo when a step is one micro-batch on one process; otherwise a token
               of a micro-batch with few tokens weighs more.
    - grpo:    (Σ_seq Σ_t ℓM / Σ_t M, number of sequences) — the per-sequence mean of the paper; it
               gives each token of a short answer more weight (the length bias Dr. GRPO points out).
    - dr_grpo: (Σ ℓM, sequences × max_completion_length) — a constant denominator, so no length bias.
    With GSPO, ``grpo`` is the paper's objective; the token-summing ones weight a sequence by its length.
    Metrics, each (sum, count): clip_ratio (low, high and either: the share of trained tokens, or with
    GSPO of trained sequences, whose gradient the clip removed), kl (with a reference), is_weight (with
    IS weights), over masked tokens.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":  # [B, 1]: one ratio per completion
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        units = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)  # clip metrics count trained sequences
    elif importance_sampling_level == "token":
        units = mask
    else:
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics: dict[str, tuple[float, float]] = {}
    tokens = float(mask.sum())
    if beta > 0 or ref_logps is not None:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        if beta > 0:
            per_token = per_token + beta * kl
        metrics["kl"] = (float((kl.detach() * mask).sum()), tokens)
    with torch.no_grad():  # clipped regions: where min() picked the clipped, constant term
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype) * units
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype) * units
        n = float(units.sum())
        metrics["clip_ratio/low"] = (float(low.sum()), n)
        metrics["clip_ratio/high"] = (float(high.sum()), n)
        metrics["clip_ratio"] = (float((low + high).sum()), n)
        if is_weights is not None:
            metrics["is_weight"] = (float((is_weights * mask).sum()), tokens)
    masked = per_token * mask
    rows = float(logps.shape[0])
    if loss_type == "dapo":
        return masked.sum(), tokens, metrics
    if loss_type == "bnpo":
        return masked.sum() / max(tokens, 1.0), 1.0, metrics
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), rows, metrics
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        return masked.sum(), rows * max_completion_length, metrics
    raise ValueError(f"loss_type must be dapo, bnpo, grpo or dr_grpo, got {loss_type!r}")


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coef: float | None = None) -> tuple[torch.Tensor, int]:
    """Reward-model loss summed over pairs, and the number of pairs. [P] rewards (and [P] margins) in.

    Per pair: −log σ(r_c − r_r − m) (Bradley–Terry; the margin m is Llama 2's), plus η·(r_c + r_r)²
    when ``center_coef`` η is set (arXiv 2312.09244 Eq. 2: pulls rewards towards zero mean, so the
    scale stays usable as a score). Summed, not averaged: the loop divides by the step's pairs, which
    is TRL's mean over the batch when there is no accumulation (docs/sources.md#reward-model).
    """
    r_chosen, r_rejected = r_chosen.float(), r_rejected.float()
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss.sum(), r_chosen.numel()


def dpo_loss(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor | None, ref_r: torch.Tensor | None,
             knobs: Knobs, loss_type: str | list[str] = "sigmoid", len_c: torch.Tensor | None = None,
             len_r: torch.Tensor | None = None, *, weights: list[float] | None = None,
             kl: torch.Tensor | None = None,
             sides: torch.Tensor | None = None) -> tuple[torch.Tensor, float, dict[str, tuple[float, float]]]:
    """DPO-family loss summed over pairs, the number of pairs, and metrics as (sum, count).

    Inputs are [P] completion log-probs *summed* over tokens (policy and reference, chosen and
    rejected; TRL, docs/sources.md#dpo) and the [P] completion token counts (ipo, sigmoid_norm, sft,
    simpo and orpo read them). ``loss_type``: one name of ``pref_losses.LOSSES`` or a list, combined
    with ``weights`` (TRL's ``loss_weights``). ``ref_c``/``ref_r`` None: reference-free losses only.
    ``kl``: KTO's mismatched-row log-ratios; ``sides`` [P, 2]: which sides are real rows (KTO's
    unpaired data: the count is then half the real rows, so a step's loss is TRL's mean over rows,
    and the chosen / rejected metrics count real rows only). Rewards (metrics) are β·(summed log-ratio), as TRL
    reports them (β·log-prob without a reference, as TRL's CPO and ORPO trainers); the log-probs
    themselves and their change from the reference are reported too, since DPO's failure mode is
    both falling together.
    """
    pol_c, pol_r = pol_c.float(), pol_r.float()
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    free = ref_c is None or ref_r is None
    if free:
        if set(types) - REFERENCE_FREE:
            raise ValueError(f"{sorted(set(types) - REFERENCE_FREE)} need reference log-probs")
        ref_c, ref_r = torch.zeros_like(pol_c), torch.zeros_like(pol_r)
    ref_c, ref_r = ref_c.float(), ref_r.float()
    if len_c is None or len_r is None:
        len_c, len_r = torch.ones_like(pol_c), torch.ones_like(pol_r)
        if LENGTH_READERS & set(types):
            raise ValueError(f"{', '.join(sorted(LENGTH_READERS & set(types)))} need the completion lengths len_c "
                             "and len_r")
    mask = None if sides is None else sides.to(pol_c)
    pairs = Pairs(pol_c, pol_r, ref_c, ref_r, len_c.to(pol_c), len_r.to(pol_r), None if kl is None else kl.float(), mask)
    loss = preference_loss(pairs, knobs, types, weights)
    n = pol_c.numel()
    w_c, w_r = (torch.ones_like(pol_c), torch.ones_like(pol_r)) if mask is None else mask.unbind(-1)
    n_c, n_r, both = float(w_c.sum()), float(w_r.sum()), w_c * w_r
    ratio_c, ratio_r = (pol_c - ref_c).detach(), (pol_r - ref_r).detach()
    reward_c, reward_r = knobs.beta * ratio_c, knobs.beta * ratio_r

    def total(x: torch.Tensor, w: torch.Tensor) -> float:
        return float((x.detach().float() * w).sum())

    metrics = {
        "rewards/chosen": (total(reward_c, w_c), n_c),
        "rewards/rejected": (total(reward_r, w_r), n_r),
        "rewards/margins": (total(reward_c - reward_r, both), float(both.sum())),
        "rewards/accuracies": (total((reward_c > reward_r).float(), both), float(both.sum())),
        "logps/chosen": (total(pol_c, w_c), n_c),
        "logps/rejected": (total(pol_r, w_r), n_r),
        "length/chosen": (total(len_c, w_c), n_c),
        "length/rejected": (total(len_r, w_r), n_r),
    }
    if not free:
        metrics["logratio/chosen"] = (total(ratio_c, w_c), n_c)  # π_c − ref_c: below 0 means chosen fell
        metrics["logratio/rejected"] = (total(ratio_r, w_r), n_r)
    if kl is not None:
        metrics["kl"] = (float(pairs.z0) * n, n)  # KTO's z0, as TRL logs it
    return loss.sum(), n if mask is None else (n_c + n_r) / 2, metrics
