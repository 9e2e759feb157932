"""The DPO family as small pure functions of the same (policy, reference) log-probs.

Each loss maps a batch of pairs to [P] per-pair losses. Inputs are completion log-probs summed over
tokens (policy and reference, chosen and rejected) and the completion token counts, as DPO reads
them. Names, formulas and defaults are TRL 1.16's ``DPOTrainer`` (``loss_type``), where TRL has
them; tests/test_pref_losses.py checks each against TRL's own code on the same log-probs (1e-6)
and against a closed form of its own. With h = (π_c − ref_c) − (π_r − ref_r) and β:

  sigmoid     −(1−ε) log σ(βh) − ε log σ(−βh)   DPO; ε = label_smoothing > 0 is cDPO (TRL: ε = 0 only)
  robust      (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε)   rDPO (Chowdhury et al. 2024)
  hinge       max(0, 1 − βh)                     SLiC
  ipo         (h_len − 1/(2β))², log-ratios per completion token   IPO (Azar et al. 2023)
  exo_pair    KL of softmax(βh) from (1−ε, ε)    EXO (Ji et al. 2024), needs ε > 0
  nca_pair    −log σ(βr_c) − ½ log σ(−βr_c) − ½ log σ(−βr_r)   NCA (Chen et al. 2024)
  bco_pair    −log σ(βr_c) − log σ(−βr_r)        BCO (Jung et al. 2024), without its running δ
  sppo_hard   (r_c − 1/(2β))² + (r_r + 1/(2β))²  SPPO, hard labels (Wu et al. 2024)
  aot         sorted (π_c − π_r) vs sorted (ref_c − ref_r) over the batch   AOT (Melnyk et al. 2024)
  aot_unpaired  sorted r_c vs sorted r_r over the batch
  apo_zero    1 − σ(βr_c) + σ(βr_r)              APO-zero (D'Oosterlinck et al. 2024)
  apo_down    σ(βr_c) + 1 − σ(β(r_c − r_r))      APO-down
  discopop    log-ratio-modulated mix of logistic and exponential (Chris Lu et al. 2024, τ = 0.05)
  sigmoid_norm  −log σ(β h_len)                  DPO on per-token log-ratios
  sft         −Σ π_c / Σ len_c over the batch    an SFT term on chosen; RPO is [sigmoid, sft] (Pang et al. 2024)
  dpop        −log σ(β(h − λ max(0, ref_c − π_c)))   DPO-Positive (Pal et al. 2024, Smaug); not in TRL
  simpo       −(1−ε) log σ(β(a_c − a_r) − γ) − ε log σ(−…)   SimPO (Meng et al. 2024), no reference; TRL CPOTrainer
  orpo        sft − β log σ(log odds(a_c) − log odds(a_r))   ORPO (Hong et al. 2024), no reference; TRL ORPOTrainer
  kto         w_d(1 − σ(β(r_c − z0))) + w_u(1 − σ(β(z0 − r_r))), halved   KTO (Ethayarajh et al. 2024); TRL KTOTrainer

where r_c = π_c − ref_c and r_r = π_r − ref_r (the summed log-ratios), a_c = π_c / len_c and
a_r = π_r / len_r (per-token means: SimPO's and ORPO's log-likelihoods), odds(a) = exp(a) / (1 − exp(a)),
and z0 = max(0, mean over the batch of π(y'|x) − ref(y'|x)) on mismatched rows (each prompt with another
row's completion), detached: KTO's reference point. KTO reads each pair as one desirable and one
undesirable row (TRL's ``unpair_preference_dataset``), so the mean over pairs of ``kto`` equals TRL's
mean over those rows. Unpaired data (train/data.unpaired_examples) masks the missing side
(``Pairs.sides``); the trainer then divides by half the number of real rows, not by pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DISCOPOP_TAU = 0.05  # TRL 1.16 DPOConfig.discopop_tau (the DiscoPOP paper's)
DPOP_LAMBDA = 50.0  # the Smaug paper's λ (Pal et al. 2024)
SIMPO_GAMMA = 0.5  # TRL 1.16 CPOConfig.simpo_gamma
KTO_WEIGHT = 1.0  # TRL 1.16 KTOConfig desirable_weight and undesirable_weight
REFERENCE_FREE = frozenset({"simpo", "orpo", "sft"})  # losses that never read ref_c or ref_r
LENGTH_READERS = frozenset({"ipo", "sigmoid_norm", "sft", "simpo", "orpo"})  # losses that read len_c, len_r


@dataclass(frozen=True)
class Pairs:
    """[P] tensors: summed completion log-probs and completion token counts."""

    pol_c: torch.Tensor
    pol_r: torch.Tensor
    ref_c: torch.Tensor
    ref_r: torch.Tensor
    len_c: torch.Tensor
    len_r: torch.Tensor
    kl: torch.Tensor | None = None  # [K] π − ref on KTO's mismatched rows
    sides: torch.Tensor | None = None  # [P, 2] 1.0 where chosen / rejected is a real row (KTO's unpaired data)

    @property
    def z0(self) -> torch.Tensor:
        """KTO's reference point: the batch's mean mismatched-row log-ratio, at least 0, no gradient."""
        if self.kl is None:
            raise ValueError("kto needs the log-ratios of mismatched rows (Pairs.kl) for its reference point")
        return self.kl.detach().mean().clamp(min=0)

    @property
    def a_c(self) -> torch.Tensor:
        return self.pol_c / self.len_c.clamp(min=1)

    @property
    def a_r(self) -> torch.Tensor:
        return self.pol_r / self.len_r.clamp(min=1)

    @property
    def r_c(self) -> torch.Tensor:
        return self.pol_c - self.ref_c

    @property
    def r_r(self) -> torch.Tensor:
        return self.pol_r - self.ref_r

    @property
    def h(self) -> torch.Tensor:
        return self.r_c - self.r_r

    @property
    def h_len(self) -> torch.Tensor:
        """h on per-token log-ratios (each divided by its completion's length)."""
        return self.r_c / self.len_c.clamp(min=1) - self.r_r / self.len_r.clamp(min=1)


@dataclass(frozen=True)
class Knobs:
    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = DISCOPOP_TAU
    dpop_lambda: float = DPOP_LAMBDA
    simpo_gamma: float = SIMPO_GAMMA
    desirable_weight: float = KTO_WEIGHT
    undesirable_weight: float = KTO_WEIGHT


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def sigmoid(p: Pairs, k: Knobs) -> torch.Tensor:
    return _smoothed(k.beta * p.h, k.label_smoothing)


def robust(p: Pairs, k: Knobs) -> torch.Tensor:
    x, eps = k.beta * p.h, k.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def hinge(p: Pairs, k: Knobs) -> torch.Tensor:
    return torch.relu(1 - k.beta * p.h)


def ipo(p: Pairs, k: Knobs) -> torch.Tensor:
    return (p.h_len - 1 / (2 * k.beta)) ** 2


def exo_pair(p: Pairs, k: Knobs) -> torch.Tensor:
    x, eps = k.beta * p.h, torch.tensor(k.label_smoothing)
    return (torch.sigmoid(x) * (F.logsigmoid(x) - torch.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - torch.log(eps)))


def nca_pair(p: Pairs, k: Knobs) -> torch.Tensor:
    c, r = k.beta * p.r_c, k.beta * p.r_r
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def bco_pair(p: Pairs, k: Knobs) -> torch.Tensor:
    return -F.logsigmoid(k.beta * p.r_c) - F.logsigmoid(-k.beta * p.r_r)


def sppo_hard(p: Pairs, k: Knobs) -> torch.Tensor:
    return (p.r_c - 0.5 / k.beta) ** 2 + (p.r_r + 0.5 / k.beta) ** 2


def aot(p: Pairs, k: Knobs) -> torch.Tensor:
    # optimal transport of the policy's log-ratio distribution over the reference's: sort both over the batch
    delta = torch.sort(p.pol_c - p.pol_r).values - torch.sort(p.ref_c - p.ref_r).values
    return _smoothed(k.beta * delta, k.label_smoothing)


def aot_unpaired(p: Pairs, k: Knobs) -> torch.Tensor:
    delta = torch.sort(p.r_c).values - torch.sort(p.r_r).values
    return _smoothed(k.beta * delta, k.label_smoothing)


def apo_zero(p: Pairs, k: Knobs) -> torch.Tensor:
    return 1 - torch.sigmoid(k.beta * p.r_c) + torch.sigmoid(k.beta * p.r_r)


def apo_down(p: Pairs, k: Knobs) -> torch.Tensor:
    return torch.sigmoid(k.beta * p.r_c) + 1 - torch.sigmoid(k.beta * p.h)


def discopop(p: Pairs, k: Knobs) -> torch.Tensor:
    x = k.beta * p.h
    mix = torch.sigmoid(x / k.discopop_tau)
    return -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix


def sigmoid_norm(p: Pairs, k: Knobs) -> torch.Tensor:
    return -F.logsigmoid(k.beta * p.h_len)


def sft(p: Pairs, k: Knobs) -> torch.Tensor:
    # the batch's token-mean NLL of chosen, given to every pair (TRL's form): its mean over pairs is that NLL
    return (-p.pol_c.sum() / p.len_c.sum().clamp(min=1)).expand(p.pol_c.shape)


def dpop(p: Pairs, k: Knobs) -> torch.Tensor:
    # the penalty is 0 while chosen stays at or above the reference, so it only stops chosen falling
    return -F.logsigmoid(k.beta * (p.h - k.dpop_lambda * torch.relu(p.ref_c - p.pol_c)))


def simpo(p: Pairs, k: Knobs) -> torch.Tensor:
    return _smoothed(k.beta * (p.a_c - p.a_r) - k.simpo_gamma, k.label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation (branch at −ln 2, Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(p: Pairs, k: Knobs) -> torch.Tensor:
    log_odds = (p.a_c - p.a_r) - (log1mexp(p.a_c) - log1mexp(p.a_r))
    return sft(p, k) - k.beta * F.logsigmoid(log_odds)


def kto(p: Pairs, k: Knobs) -> torch.Tensor:
    z0 = p.z0
    good = k.desirable_weight * (1 - torch.sigmoid(k.beta * (p.r_c - z0)))
    bad = k.undesirable_weight * (1 - torch.sigmoid(k.beta * (z0 - p.r_r)))
    if p.sides is not None:  # unpaired rows: a masked side is no row at all
        good, bad = good * p.sides[:, 0], bad * p.sides[:, 1]
    return (good + bad) / 2


LOSSES: dict[str, Callable[[Pairs, Knobs], torch.Tensor]] = {
    f.__name__: f for f in (sigmoid, robust, hinge, ipo, exo_pair, nca_pair, bco_pair, sppo_hard, aot,
                            aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft, dpop, simpo, orpo, kto)
}


def preference_loss(p: Pairs, k: Knobs, types: list[str], weights: list[float] | None = None) -> torch.Tensor:
    """[P] per-pair loss: Σ_i w_i · loss_i (TRL's ``loss_type`` list with ``loss_weights``; weights 1 by default)."""
    weights = [1.0] * len(types) if weights is None else weights
    if len(weights) != len(types):
        raise ValueError(f"{len(types)} loss types but {len(weights)} weights")
    unknown = [t for t in types if t not in LOSSES]
    if p.sides is not None and types != ["kto"]:
        raise ValueError("unpaired rows (masked sides) train only with kto")
    if unknown:
        raise ValueError(f"unknown DPO loss type {unknown[0]!r}; one of {', '.join(LOSSES)}")
    return sum(w * LOSSES[t](p, k) for t, w in zip(types, weights))  # type: ignore[return-value]
