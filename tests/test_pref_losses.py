"""The DPO family (train/pref_losses.py): each loss equals TRL 1.16's own code on the same
log-probs (1e-6), and has a closed-form check of its own (step-0 value, gradient sign)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dataflywheel.train.pref_losses import LOSSES, REFERENCE_FREE, Knobs, Pairs, log1mexp, preference_loss

LN2 = math.log(2)
SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}  # read label_smoothing (sigmoid too, beyond TRL)
ELSEWHERE = {"dpop", "simpo", "orpo", "kto"}  # not DPOTrainer loss types: checked against their own trainers below


def batch(pairs: int = 6, width: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token policy and reference log-probs [2P, width-1] (chosen rows, then rejected) and the
    completion mask [2P, width] (a prompt, then a completion of varying length)."""
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * pairs, width - 1, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2 * pairs, width - 1, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row in range(2 * pairs):
        start = 2 + row % 3
        mask[row, start:start + 2 + (row * 5) % (width - start - 1)] = 1
    return per_token, ref, mask


def ours(per_token, ref, mask, types, weights, knobs: Knobs) -> torch.Tensor:
    m = mask[:, 1:].to(per_token)
    logps, ref_logps, lens = (per_token * m).sum(1), (ref * m).sum(1), m.sum(1)
    (pc, pr), (rc, rr), (lc, lr) = logps.chunk(2), ref_logps.chunk(2), lens.chunk(2)
    return preference_loss(Pairs(pc, pr, rc, rr, lc, lr), knobs, types, weights).mean()


def trl_loss(per_token, ref, mask, types, weights, knobs: Knobs) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss run on a stub trainer whose model returns these log-probs."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    m = mask[:, 1:].to(per_token)
    ref_logps = (ref * m).sum(1)
    n = per_token.shape[0]
    outputs = SimpleNamespace(log_probs=per_token * m, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool), aux_loss=None)
    model = lambda **kw: outputs  # noqa: E731
    accel = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x,
                            unwrap_model=lambda x: x)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=types, loss_weights=weights,
        beta=knobs.beta, label_smoothing=knobs.label_smoothing, use_weighting=False,
        args=SimpleNamespace(discopop_tau=knobs.discopop_tau), _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    rc, rr = ref_logps.chunk(2)
    inputs = {"input_ids": torch.zeros(n, mask.shape[1], dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return trl_dpo.DPOTrainer._compute_loss(stub, model, inputs, False)


CASES = [([t], [1.0]) for t in LOSSES if t not in ELSEWHERE] + [(["sigmoid", "sft"], [1.0, 0.5]), (["sigmoid", "bco_pair", "sft"],
                                                                            [0.8, 0.2, 1.0])]


@pytest.mark.parametrize(("types", "weights"), CASES, ids=["+".join(t) for t, _ in CASES])
def test_equals_trl_on_the_same_log_probs(types, weights):
    per_token, ref, mask = batch()
    eps = 0.1 if SMOOTHED & set(types) else 0.0
    knobs = Knobs(beta=0.3, label_smoothing=eps)
    want = trl_loss(per_token, ref, mask, types, weights, knobs)
    got = ours(per_token, ref, mask, types, weights, knobs)
    assert float(got) == pytest.approx(float(want), abs=1e-6)


def at_start(types: list[str], eps: float = 0.0) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Loss and d loss / d π_c, d π_r when the policy is the reference (step 0)."""
    pol = torch.tensor([[-12.0, -15.0]], requires_grad=True)
    p = Pairs(pol[:, 0], pol[:, 1], torch.tensor([-12.0]), torch.tensor([-15.0]), torch.tensor([4.0]),
              torch.tensor([5.0]))
    loss = preference_loss(p, Knobs(beta=0.1, label_smoothing=eps), types).sum()
    loss.backward()
    return float(loss), pol.grad[0, 0], pol.grad[0, 1]


@pytest.mark.parametrize(("name", "value"), [
    ("sigmoid", LN2), ("robust", LN2), ("hinge", 1.0), ("ipo", (1 / 0.2) ** 2), ("nca_pair", 2 * LN2),
    ("bco_pair", 2 * LN2), ("sppo_hard", 2 * 25.0), ("aot", LN2), ("aot_unpaired", LN2), ("apo_zero", 1.0),
    ("apo_down", 1.0), ("discopop", 0.5 * LN2 + 0.5), ("sigmoid_norm", LN2)])
def test_step_zero_value_and_it_raises_chosen_over_rejected(name, value):
    eps = 0.1 if name in {"robust"} else 0.0
    loss, d_chosen, d_rejected = at_start([name], eps)
    assert loss == pytest.approx(value, rel=1e-6)
    if name == "discopop":
        # at h = 0 the mixing weight's slope (1/τ = 20) dominates: DiscoPOP's first step pushes h down,
        # a property of the discovered loss (its value is the check here)
        assert d_chosen - d_rejected > 0
        return
    assert d_chosen - d_rejected < 0  # descending raises chosen relative to rejected
    if name in {"sigmoid", "hinge", "ipo", "sppo_hard", "apo_zero", "robust", "bco_pair", "nca_pair"}:
        assert d_chosen < 0 and d_rejected > 0  # each moves its own way
    if name == "apo_down":  # APO-down: at the reference, chosen's two terms cancel and rejected goes down
        assert float(d_chosen) == pytest.approx(0.0, abs=1e-9) and d_rejected > 0


def test_cdpo_label_smoothing_and_exo_closed_forms():
    # cDPO at step 0 with ε: −(1−ε) log ½ − ε log ½ = ln 2; its gradient shrinks by (1 − 2ε)
    loss, d_c, _ = at_start(["sigmoid"], 0.2)
    _, d_c0, _ = at_start(["sigmoid"])
    assert loss == pytest.approx(LN2) and float(d_c) == pytest.approx(0.6 * float(d_c0))
    # EXO at step 0: ½(log ½ − log(1−ε)) + ½(log ½ − log ε)
    eps = 0.1
    assert at_start(["exo_pair"], eps)[0] == pytest.approx(0.5 * (-LN2 - math.log(1 - eps)) + 0.5 * (-LN2 - math.log(eps)))


def test_sft_term_is_the_token_mean_nll_of_chosen():
    p = Pairs(torch.tensor([-8.0, -2.0]), torch.tensor([-1.0, -1.0]), torch.zeros(2), torch.zeros(2),
              torch.tensor([4.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert preference_loss(p, Knobs(beta=0.1), ["sft"]).mean() == pytest.approx(10 / 5)


def test_unknown_type_and_weight_count_are_errors():
    p = Pairs(*(torch.zeros(1) for _ in range(4)), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="unknown DPO loss type 'dpo_p'"):
        preference_loss(p, Knobs(beta=0.1), ["dpo_p"])
    with pytest.raises(ValueError, match="2 loss types but 1 weights"):
        preference_loss(p, Knobs(beta=0.1), ["sigmoid", "sft"], [1.0])


def test_dpo_config_takes_a_weighted_list_and_names_what_is_wrong():
    from pydantic import ValidationError

    from dataflywheel.train.dpo import DpoConfig

    base = {"model": "m", "data": ["d"], "output": "o"}
    cfg = DpoConfig(**base, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
    assert cfg.loss_type == ["sigmoid", "sft"]
    with pytest.raises(ValidationError, match="unknown loss_type 'simpo_typo'"):
        DpoConfig(**base, loss_type="simpo_typo")
    with pytest.raises(ValidationError, match="loss_weights has 1 values for 2 loss types"):
        DpoConfig(**base, loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValidationError, match="exo_pair needs label_smoothing"):
        DpoConfig(**base, loss_type="exo_pair")


def sums(per_token, ref, mask):
    """Summed policy and reference log-probs and lengths, chunked into (chosen, rejected)."""
    m = mask[:, 1:].to(per_token)
    return [t.chunk(2) for t in ((per_token * m).sum(1), (ref * m).sum(1), m.sum(1))]


def trl_nll(per_token, mask):
    """TRL CPO/ORPO ``cross_entropy_loss`` on the chosen half: the token mean over the batch."""
    m = mask[:, 1:].to(per_token)
    half = per_token.shape[0] // 2
    return -(per_token[:half] * m[:half]).sum() / m[:half].sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_equals_trl_cpo_trainer(eps):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    per_token, ref, mask = batch()
    (pc, pr), (rc, rr), (lc, lr) = sums(per_token, ref, mask)
    knobs = Knobs(beta=2.0, label_smoothing=eps, simpo_gamma=0.7)
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=eps,
                           accelerator=SimpleNamespace(device="cpu"))
    want = cpo.CPOTrainer.cpo_loss(stub, pc / lc, pr / lr)[0].mean()  # TRL averages log-probs for simpo
    assert float(preference_loss(Pairs(pc, pr, rc, rr, lc, lr), knobs, ["simpo"]).mean()) == pytest.approx(
        float(want), abs=1e-6)
    # CPO = SimPO's loss + cpo_alpha · NLL of chosen: the list [simpo, sft] with weights [1, α]
    got = preference_loss(Pairs(pc, pr, rc, rr, lc, lr), knobs, ["simpo", "sft"], [1.0, 0.5]).mean()
    assert float(got) == pytest.approx(float(want + 0.5 * trl_nll(per_token, mask)), abs=1e-6)


def test_orpo_equals_trl_orpo_trainer():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    per_token, ref, mask = batch(seed=3)
    (pc, pr), (rc, rr), (lc, lr) = sums(per_token, ref, mask)
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    ratio = orpo.ORPOTrainer.odds_ratio_loss(stub, pc / lc, pr / lr)[0]
    want = trl_nll(per_token, mask) - ratio.mean()  # ORPOTrainer.get_batch_loss_metrics
    got = preference_loss(Pairs(pc, pr, rc, rr, lc, lr), Knobs(beta=0.25), ["orpo"]).mean()
    assert float(got) == pytest.approx(float(want), abs=1e-6)
    x = torch.linspace(-20, -1e-6, 50, dtype=torch.float64)
    assert torch.allclose(log1mexp(x), orpo.log1mexp(x)) and torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)))


@pytest.mark.parametrize(("kl_shift", "weights"), [(0.8, (1.0, 1.0)), (-5.0, (1.0, 1.0)), (0.3, (1.33, 0.7))])
def test_kto_equals_trl_kto_trainer(kl_shift, weights):
    """TRL's KTOTrainer._compute_loss on the pairs unpaired into desirable and undesirable rows, each
    row's mismatched (KL) row given the same log-probs as ours (ours keeps one per pair)."""
    kto_mod = pytest.importorskip("trl.trainer.kto_trainer")
    per_token, ref, mask = batch(seed=5)
    (pc, pr), (rc, rr), (lc, lr) = sums(per_token, ref, mask)
    g = torch.Generator().manual_seed(9)
    pol_kl = -torch.rand(pc.shape[0], generator=g, dtype=torch.float64) * 9
    ref_kl = pol_kl - kl_shift - torch.rand(pc.shape[0], generator=g, dtype=torch.float64)  # z0 > 0 or clamped to 0
    n, width = per_token.shape[0], mask.shape[1]

    def outputs(log_probs):
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                               mean_logits=torch.zeros_like(log_probs), aux_loss=None)

    kl_ids = torch.zeros(n, 2, dtype=torch.long)
    kl_rows = torch.zeros(n, 1, dtype=torch.float64)
    kl_rows[:, 0] = torch.cat([pol_kl, pol_kl])
    main = outputs(per_token * mask[:, 1:].to(per_token))

    def model(**kw):
        return outputs(kl_rows) if kw["input_ids"] is kl_ids else main

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
        beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1], aux_loss_enabled=False,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x), _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, _compute_kl_logps=None)
    stub._compute_kl_logps = lambda m, b: kto_mod.KTOTrainer._compute_kl_logps(stub, m, b)
    inputs = {"input_ids": torch.zeros(n, width, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "label": torch.tensor([True] * (n // 2) + [False] * (n // 2)),
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": torch.ones_like(kl_ids), "ref_logps": torch.cat([rc, rr]),
              "ref_KL_logps": torch.cat([ref_kl, ref_kl])}
    want = kto_mod.KTOTrainer._compute_loss(stub, model, inputs, False)
    knobs = Knobs(beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1])
    got = preference_loss(Pairs(pc, pr, rc, rr, lc, lr, pol_kl - ref_kl), knobs, ["kto"]).mean()
    assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_dpop_penalises_chosen_falling_below_the_reference_only():
    def loss_and_grad(pol_c: float) -> tuple[float, float]:
        pol = torch.tensor([pol_c, -20.0], dtype=torch.float64, requires_grad=True)
        p = Pairs(pol[:1], pol[1:], torch.tensor([-10.0]), torch.tensor([-15.0]), torch.ones(1), torch.ones(1))
        loss = preference_loss(p, Knobs(beta=0.1, dpop_lambda=50.0), ["dpop"]).sum()
        loss.backward()
        return float(loss), float(pol.grad[0])

    # chosen above its reference: DPOP is DPO (h = 1 + 5)
    above, d_above = loss_and_grad(-9.0)
    assert above == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * 6))))
    # chosen 1 nat below: h = −1 + 5 = 4, penalty λ·1 = 50 -> −log σ(0.1·(4 − 50))
    below, d_below = loss_and_grad(-11.0)
    assert below == pytest.approx(-math.log(1 / (1 + math.exp(0.1 * 46))))
    # below the reference the gradient on chosen is (1 + λ) times DPO's at the same h: it pushes chosen back up hard
    assert d_below < 0 and abs(d_below) > 40 * abs(d_above)
    # at the reference (step 0) DPOP equals DPO: ln 2
    assert at_start(["dpop"])[0] == pytest.approx(LN2)


def test_simpo_orpo_closed_forms_and_no_reference():
    # SimPO at equal per-token log-likelihoods: −log σ(−γ); the gradient raises chosen, lowers rejected
    pol = torch.tensor([-8.0, -10.0], requires_grad=True)  # per-token -2 for both (lengths 4 and 5)
    p = Pairs(pol[:1], pol[1:], torch.tensor([123.0]), torch.tensor([-456.0]), torch.tensor([4.0]), torch.tensor([5.0]))
    loss = preference_loss(p, Knobs(beta=2.0, simpo_gamma=0.5), ["simpo"]).sum()
    loss.backward()
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(0.5))), rel=1e-6)
    assert pol.grad[0] < 0 < pol.grad[1]
    # the reference values above are absurd on purpose: neither loss reads them
    moved = Pairs(p.pol_c, p.pol_r, torch.zeros(1), torch.zeros(1), p.len_c, p.len_r)
    for name in ("simpo", "orpo"):
        assert float(preference_loss(p, Knobs(beta=2.0), [name]).sum()) == pytest.approx(
            float(preference_loss(moved, Knobs(beta=2.0), [name]).sum()))
    assert REFERENCE_FREE == {"simpo", "orpo", "sft"}
    # ORPO with equal per-token log-likelihoods: odds ratio 1, so NLL (2.0) − β log σ(0) = 2 + β ln 2
    assert float(preference_loss(p, Knobs(beta=0.1), ["orpo"]).sum()) == pytest.approx(2.0 + 0.1 * LN2, rel=1e-6)


def test_kto_reference_point_is_clamped_detached_and_needed():
    pol = torch.tensor([-10.0, -15.0], requires_grad=True)
    kl = torch.tensor([2.0, -6.0], requires_grad=True)  # mean −2: z0 = 0
    p = Pairs(pol[:1], pol[1:], torch.tensor([-10.0]), torch.tensor([-15.0]), torch.ones(1), torch.ones(1), kl)
    loss = preference_loss(p, Knobs(beta=0.1), ["kto"]).sum()
    loss.backward()
    assert float(loss) == pytest.approx(0.5, rel=1e-6)  # at the reference with z0 = 0: ½(½ + ½)
    assert pol.grad[0] < 0 < pol.grad[1] and kl.grad is None
    z = Pairs(p.pol_c, p.pol_r, p.ref_c, p.ref_r, p.len_c, p.len_r, torch.tensor([3.0, 1.0]))  # z0 = 2
    want = 0.5 * (1 - 1 / (1 + math.exp(0.2))) + 0.5 * (1 - 1 / (1 + math.exp(-0.2)))
    assert float(preference_loss(z, Knobs(beta=0.1), ["kto"]).sum()) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="kto needs the log-ratios of mismatched rows"):
        preference_loss(Pairs(*(torch.zeros(1) for _ in range(4)), torch.ones(1), torch.ones(1)), Knobs(beta=0.1), ["kto"])


def test_kto_on_unpaired_rows_equals_trl_with_more_desirable_than_undesirable():
    """Unpaired rows (4 desirable, 2 undesirable) as our masked pairs: the loss over the count
    dpo_loss returns equals TRL's KTOTrainer mean over the 6 rows (its formula lines replicated
    through its own _compute_loss on a stub)."""
    from dataflywheel.train.losses import dpo_loss

    kto_mod = pytest.importorskip("trl.trainer.kto_trainer")
    g = torch.Generator().manual_seed(11)
    pol = -torch.rand(6, generator=g, dtype=torch.float64) * 20
    ref = pol + torch.randn(6, generator=g, dtype=torch.float64)
    label = torch.tensor([True, False, True, True, False, True])
    kl_pol = -torch.rand(6, generator=g, dtype=torch.float64) * 9
    kl_ref = kl_pol - 0.4
    good, bad = torch.nonzero(label).view(-1), torch.nonzero(~label).view(-1)
    # ours: (good0, bad0), (good1, bad1), then good2 and good3 alone, each with its kl row
    c = torch.cat([good[:2], good[2:]])
    r = torch.cat([bad, good[2:]])  # the masked copies
    sides = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    knobs = Knobs(beta=0.3, desirable_weight=1.0, undesirable_weight=1.33)
    total, count, metrics = dpo_loss(pol[c], pol[r], ref[c], ref[r], knobs, "kto", torch.ones(4), torch.ones(4),
                                     kl=kl_pol[:4] - kl_ref[:4], sides=sides)
    assert count == 3.0 and metrics["logps/chosen"][1] == 4 and metrics["logps/rejected"][1] == 2

    def outputs(log_probs):
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                               mean_logits=torch.zeros_like(log_probs), aux_loss=None)

    kl_ids = torch.zeros(6, 2, dtype=torch.long)
    main = outputs(pol.view(-1, 1))
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
        beta=0.3, desirable_weight=1.0, undesirable_weight=1.33, aux_loss_enabled=False,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x), _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = lambda m, b: kto_mod.KTOTrainer._compute_kl_logps(stub, m, b)
    ones = torch.ones(6, 2, dtype=torch.long)
    inputs = {"input_ids": torch.zeros(6, 2, dtype=torch.long), "attention_mask": ones, "completion_mask": ones,
              "label": label, "KL_input_ids": kl_ids, "KL_attention_mask": ones, "KL_completion_mask": ones,
              "ref_logps": ref, "ref_KL_logps": torch.cat([kl_ref[:4], kl_ref[:2]])}
    # TRL's KL rows: our 4 rows' values and 2 repeats of the first two, so both means are the same
    kl_pol_trl = torch.cat([kl_pol[:4], kl_pol[:2]])
    model = lambda **kw: outputs(kl_pol_trl.view(-1, 1)) if kw["input_ids"] is kl_ids else main  # noqa: E731
    kl_ours = (kl_pol[:4] - kl_ref[:4]).mean()
    assert float((kl_pol_trl - torch.cat([kl_ref[:4], kl_ref[:2]])).mean()) == pytest.approx(float(kl_ours))
    want = kto_mod.KTOTrainer._compute_loss(stub, model, inputs, False)
    assert float(total / count) == pytest.approx(float(want), abs=1e-6)
