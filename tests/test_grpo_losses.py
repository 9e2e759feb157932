"""The GRPO family in train/losses.py: the advantage estimators (grpo, rloo, reinforce_pp), GSPO's
sequence-level ratio and the bnpo normalisation, each by a closed form and against TRL 1.16's own code
on the same tensors (GRPOTrainer._compute_loss on a stub trainer; RLOO's and GRPO's advantage lines,
which sit inside the trainers' generation step, replicated with their file and line) to 1e-6."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dataflywheel.train.losses import (
    estimate_advantages,
    group_advantages,
    grpo_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)

TOL = 1e-6
NAN = math.nan


def rollout(rows: int = 8, width: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 per-token log-probs with π/π_old spread around 1 (some rows and tokens beyond the clip
    range), completions of varying length, advantages of both signs, reference log-probs, IS weights."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3
    shift = torch.linspace(-0.5, 0.5, rows, dtype=torch.float64).unsqueeze(-1)  # per row: GSPO clips some rows
    old = logps - shift - 0.2 * torch.randn(rows, width, generator=g, dtype=torch.float64)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        mask[r, :1 + (r * 3) % width] = 1
    return {"logps": logps, "old": old, "mask": mask, "adv": torch.randn(rows, generator=g, dtype=torch.float64),
            "ref": logps - 0.3 * torch.rand(rows, width, generator=g, dtype=torch.float64),
            "is": 0.5 + torch.rand(rows, width, generator=g, dtype=torch.float64)}


def trl_loss(t: dict, loss_type: str, level: str, *, beta: float = 0.0, with_is: bool = False, accum: int = 1,
             step_tokens: float | None = None, max_completion_length: int = 16) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """TRL 1.16's GRPOTrainer._compute_loss on a stub trainer whose model returns ``t["logps"]``: (loss,
    d loss / d logps, TRL's metrics). ``accum``: micro-batches per step; ``step_tokens``: the step's
    token count (TRL's num_items_in_batch, for dapo), None: this micro-batch's."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    logps = t["logps"].clone().requires_grad_()
    b, width = logps.shape
    metrics: dict = {"train": defaultdict(list), "eval": defaultdict(list)}
    accel = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                            reduce=lambda x, reduction: x)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accum),
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=with_is,
        vllm_importance_sampling_correction=with_is, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accum, max_completion_length=max_completion_length, accelerator=accel,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=metrics)
    tokens = t["mask"].sum() if step_tokens is None else torch.tensor(step_tokens)
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, width, dtype=torch.long), "completion_mask": t["mask"],
              "advantages": t["adv"], "old_per_token_logps": t["old"], "ref_per_token_logps": t["ref"],
              "importance_sampling_ratio": t["is"] if with_is else None, "num_items_in_batch": tokens}
    loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.detach(), logps.grad, metrics["train"]


def ours(t: dict, loss_type: str, level: str, *, beta: float = 0.0, with_is: bool = False,
         max_completion_length: int = 16) -> tuple[torch.Tensor, float, torch.Tensor, dict]:
    """grpo_loss's (sum, count), d sum / d logps, metrics."""
    logps = t["logps"].clone().requires_grad_()
    s, c, m = grpo_loss(logps, t["old"], t["adv"], t["mask"], epsilon=0.2, epsilon_high=0.28, beta=beta,
                        ref_logps=t["ref"] if beta else None, loss_type=loss_type,
                        max_completion_length=max_completion_length, is_weights=t["is"] if with_is else None,
                        importance_sampling_level=level)
    s.backward()
    return s.detach(), c, logps.grad, m


LOSS_TYPES = ["dapo", "bnpo", "grpo", "dr_grpo"]
CASES = [(lt, lvl, extra) for lt in LOSS_TYPES for lvl in ("token", "sequence") for extra in (False, True)]


@pytest.mark.parametrize(("loss_type", "level", "extra"), CASES,
                         ids=[f"{lt}-{lvl}-{'kl+is' if x else 'plain'}" for lt, lvl, x in CASES])
def test_loss_and_gradient_equal_trl(loss_type, level, extra):
    """One micro-batch, one process: our sum / count is TRL's loss, with the same gradient, for every
    normalisation at both importance-sampling levels, plain and with β·k3 KL and sampler IS weights."""
    t = rollout()
    kw = {"beta": 0.04, "with_is": True} if extra else {}
    want, want_grad, metrics = trl_loss(t, loss_type, level, **kw)
    s, c, grad, m = ours(t, loss_type, level, **kw)
    assert float(want_grad.abs().max()) > 1e-3  # a real gradient
    assert abs(float(s / c) - float(want)) < TOL
    assert float((grad / c - want_grad).abs().max()) < TOL
    # the clip metrics count what TRL counts: masked tokens, or with GSPO sequences (every row has tokens here)
    assert m["clip_ratio"][0] / m["clip_ratio"][1] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=TOL)
    assert m["clip_ratio/low"][0] / m["clip_ratio/low"][1] == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=TOL)
    if level == "sequence":
        assert 0 < m["clip_ratio"][0] < m["clip_ratio"][1]  # some sequences clipped, not all


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bnpo_and_dapo_over_two_micro_batches_equal_trl_with_accumulation(level):
    """Two micro-batches (2 and 6 completions, 5 and 24 tokens), one step (TRL: gradient_accumulation_steps 2). Each
    micro-batch's bnpo value is TRL's local token mean; the loop's Σsum / Σcount is TRL's accumulated
    loss for both bnpo (mean of the micro-batch means) and dapo (the step's token mean), which differ."""
    t = rollout(rows=8)
    halves = [{k: v[:2] for k, v in t.items()}, {k: v[2:] for k, v in t.items()}]
    step_tokens = float(t["mask"].sum())
    assert [int(h["mask"].sum()) for h in halves] == [5, 24]
    results = {}
    for loss_type in ("bnpo", "dapo"):
        sums, counts, grads, theirs, their_grads = [], [], [], [], []
        for h in halves:
            s, c, grad, _ = ours(h, loss_type, level)
            want, want_grad, _ = trl_loss(h, loss_type, level, accum=2, step_tokens=step_tokens)
            sums.append(s), counts.append(c), grads.append(grad), theirs.append(want), their_grads.append(want_grad)
            if loss_type == "bnpo":  # the per-micro-batch value: TRL's (before its 1/accum)
                assert abs(float(s / c) - 2 * float(want)) < TOL
        step = float(sum(sums)) / sum(counts)
        assert abs(step - float(sum(theirs))) < TOL
        assert float((torch.cat(grads) / sum(counts) - torch.cat(their_grads)).abs().max()) < TOL
        results[loss_type] = step
    assert abs(results["bnpo"] - results["dapo"]) > 1e-3  # uneven micro-batches: not the same normalisation
    one_s, one_c, _, _ = ours(t, "bnpo", level)  # one micro-batch per step: bnpo is dapo
    dapo_s, dapo_c, _, _ = ours(t, "dapo", level)
    assert float(one_s / one_c) == pytest.approx(float(dapo_s / dapo_c), abs=1e-12)


def test_gspo_ratio_is_exp_of_the_mean_log_ratio_and_its_gradient_the_sequence_one():
    """ℓ_i = −s_i A_i with s_i = exp(mean_t(logp − old)) over masked tokens (clip range wide open);
    d/d logp_t = −A_i s_i / |y_i| on y_i's tokens, 0 on padding; the paper's GSPO-token form
    sg[s]·π/sg[π] gives the same value and gradient."""
    t = rollout(rows=5)
    mask = t["mask"].double()
    lens = mask.sum(-1)
    s_i = torch.exp(((t["logps"] - t["old"]) * mask).sum(-1) / lens)
    logps = t["logps"].clone().requires_grad_()
    total, count, _ = grpo_loss(logps, t["old"], t["adv"], t["mask"], epsilon=0.99, epsilon_high=100.0,
                                loss_type="grpo", importance_sampling_level="sequence")
    total.backward()
    assert count == 5.0
    assert float(total.detach()) == pytest.approx(float(-(s_i * t["adv"]).sum()), abs=1e-12)
    want = (-t["adv"] * s_i / lens).unsqueeze(-1) * mask
    assert float((logps.grad - want).abs().max()) < 1e-12

    lp = t["logps"].clone().requires_grad_()  # GSPO-token (Zheng et al. 2025, eq. 13)
    seq = ((lp - t["old"]) * mask).sum(-1, keepdim=True) / lens.unsqueeze(-1)
    s_tok = torch.exp(seq.detach() + lp - lp.detach())
    (-(s_tok * t["adv"].unsqueeze(-1) * mask).sum(-1) / lens).sum().backward()
    assert float((lp.grad - want).abs().max()) < 1e-12


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_with_equal_token_log_ratios_is_token_level(loss_type):
    """When every token of a completion has the same log-ratio, its sequence ratio is that ratio:
    value and gradient equal token level, inside and outside the clip range."""
    t = rollout(rows=6)
    t["old"] = t["logps"] - torch.tensor([-0.6, -0.1, 0.0, 0.05, 0.15, 0.5], dtype=torch.float64).unsqueeze(-1)
    tok_s, tok_c, tok_g, _ = ours(t, loss_type, "token")
    seq_s, seq_c, seq_g, _ = ours(t, loss_type, "sequence")
    assert (float(seq_s), seq_c) == pytest.approx((float(tok_s), tok_c), abs=1e-12)
    assert float((seq_g - tok_g).abs().max()) < 1e-12


def test_rloo_by_hand():
    # A_i = r_i − mean of the other three: [1, 0, 0, 1] -> ±(1 − 1/3) = ±2/3, = 4/3 (r_i − 1/2)
    assert rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # NaN: out of the baselines, advantage 0; the group's scored siblings are {1, 0, 1}
    got = rloo_advantages(torch.tensor([1.0, NAN, 0.0, 1.0]), 4).tolist()
    assert got == pytest.approx([1 - 0.5, 0.0, 0 - 1.0, 1 - 0.5])
    # one scored sample has no sibling to compare with (TRL's 0/0): 0; a unanimous group: 0
    assert rloo_advantages(torch.tensor([NAN, NAN, NAN, 2.0, 3.0, 3.0, 3.0, 3.0]), 4).tolist() == [0.0] * 8
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 1.0]), 4, normalize=True)
    raw = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 4 / 3, -4 / 3, 0.0, 0.0])
    assert adv.tolist() == pytest.approx(((raw - raw.mean()) / (raw.std() + 1e-4)).tolist(), abs=1e-6)


def trl_rloo(rewards: torch.Tensor, g: int, normalize: bool) -> torch.Tensor:
    """TRL 1.16 trl/trainer/rloo_trainer.py lines 1675-1699 (RLOOTrainer._generate_and_score_completions),
    verbatim but for names: the computation sits inside the generation step, so it is replicated."""
    from trl.trainer.utils import nanstd

    grouped_rewards = rewards.view(-1, g)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_grpo_advantages(rewards: torch.Tensor, g: int, scale: str) -> torch.Tensor:
    """TRL 1.16 trl/trainer/grpo_trainer.py lines 2765-2787 and 2810 (sum_then_normalize), replicated."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def reward_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    spread = torch.randn(32, generator=g, dtype=torch.float64)
    binary = (torch.rand(32, generator=g) > 0.6).double()
    holes = spread.clone()
    holes[[1, 2, 9, 12, 13, 14]] = NAN  # a group with one scored sample (12-15), NaNs elsewhere
    binary[[0, 1, 2, 3]] = 1.0  # a unanimous group
    return [spread, binary, holes]


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_equals_trl(normalize):
    pytest.importorskip("trl")
    for rewards in reward_batches():
        want = trl_rloo(rewards, 4, normalize)
        got = estimate_advantages(rewards, 4, "rloo", normalize=normalize)
        assert float((got.double() - want).abs().max()) < TOL


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_equal_trl(scale):
    pytest.importorskip("trl")
    for rewards in reward_batches():
        got = estimate_advantages(rewards, 4, "grpo", scale=scale)
        assert float((got.double() - trl_grpo_advantages(rewards, 4, scale)).abs().max()) < TOL


def openrlhf_reinforce_baseline(rewards: torch.Tensor, g: int, lengths: list[int]) -> torch.Tensor:
    """OpenRLHF openrlhf/trainer/ppo_utils/experience_maker.py (advantage_estimator reinforce_baseline),
    replicated: r − group mean, every response token of a completion carries it (γ = 1, no KL in the
    reward), then the token-level advantages are whitened over all action tokens of the batch.
    Returns [N, T] per-token advantages."""
    rewards = rewards.reshape(-1, g)
    rewards = (rewards - rewards.mean(-1, keepdim=True)).reshape(-1)
    width = max(lengths)
    action_mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)
    advantages = rewards.unsqueeze(-1) * action_mask
    num_actions = action_mask.sum()
    mean = (advantages * action_mask).sum() / num_actions
    var = ((advantages - mean).pow(2) * action_mask).sum() / num_actions
    rstd = var.clamp(min=1e-8).rsqrt()
    return (advantages - mean) * rstd


def test_reinforce_pp_by_hand_and_against_openrlhf():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    x = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])  # r − group mean, batch mean 0
    sd = math.sqrt(float((x ** 2).mean()))  # the batch's population std, not a group's
    assert reinforce_pp_advantages(r, 4).tolist() == pytest.approx((x / sd).tolist(), abs=1e-6)
    # the batch std couples groups: scaling group 1 changes group 0's advantages (GRPO's would not)
    scaled = torch.cat([r[:4], 10 * r[4:]])
    assert reinforce_pp_advantages(scaled, 4)[0] != pytest.approx(float(x[0] / sd))
    assert group_advantages(scaled, 4)[0] == pytest.approx(float(group_advantages(r, 4)[0]))
    # token-weighted as OpenRLHF: the batch mean moves off 0, so a unanimous group trains (−μ/σ)
    g = torch.Generator().manual_seed(5)
    rewards = torch.rand(16, generator=g, dtype=torch.float64).round()
    rewards[4:8] = 1.0
    lengths = torch.randint(1, 9, (16,), generator=g).tolist()
    want = openrlhf_reinforce_baseline(rewards, 4, lengths)
    got = estimate_advantages(rewards, 4, "reinforce_pp", weights=torch.tensor(lengths, dtype=torch.float64))
    for i, n in enumerate(lengths):
        assert float((want[i, :n] - got[i]).abs().max()) < TOL
    assert float(got[4:8].abs().min()) > 1e-3
    # NaN: out of the group mean and the batch statistics, advantage 0. OpenRLHF has no NaN; the same
    # numbers come from it with the sample given its group's scored mean (x = 0) and no tokens
    holes = rewards.clone()
    holes[9] = NAN
    got = reinforce_pp_advantages(holes, 4, torch.tensor(lengths, dtype=torch.float64))
    stand_in, no_tokens = rewards.clone(), list(lengths)
    stand_in[9], no_tokens[9] = rewards[[8, 10, 11]].mean(), 0
    want = openrlhf_reinforce_baseline(stand_in, 4, no_tokens)
    assert got[9] == 0.0
    for i, n in enumerate(no_tokens):
        if n:
            assert float((want[i, :n] - got[i]).abs().max()) < TOL


def test_unknown_names_are_errors():
    t = rollout(rows=2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(t["logps"], t["old"], t["adv"], t["mask"], importance_sampling_level="token_seq")
    with pytest.raises(ValueError, match="bnpo"):
        grpo_loss(t["logps"], t["old"], t["adv"], t["mask"], loss_type="sum")
    with pytest.raises(ValueError, match="reinforce_pp"):
        estimate_advantages(torch.zeros(4), 2, "ppo")
