"""GRPO (train/grpo.py, the GRPO part of train/losses.py) on a tiny model, CPU: the gradient is REINFORCE
with a group baseline when the ratio is 1, unanimous groups train nothing, the normalisations, clipping
and k3 KL match hand computations, and the config runs end to end, resumes exactly and syncs weights."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from dataflywheel.errors import UserError
from dataflywheel.flywheel.tasks.arithmetic import make_prompts
from dataflywheel.synth.backends.base import Request, Sampling
from dataflywheel.synth.backends.transformers import TransformersBackend, chat_prompt_ids
from dataflywheel.train import grpo
from dataflywheel.train.config import load_train_config
from dataflywheel.train.data import Lint, read_rows
from dataflywheel.train.distributed import Calls
from dataflywheel.train.grpo import GrpoConfig, grpo_loss_fn, make_rollout, rollout_seed
from dataflywheel.train.losses import group_advantages, grpo_loss, k3_kl
from dataflywheel.train.model import load_for_training

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "train_grpo.yaml"


def prompt_rows(n: int, seed: int = 1) -> list[dict]:
    return [{"id": r["id"], "prompt": r["messages"], "answer": r["answer"]} for r in make_prompts(n, (1, 1), seed)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    texts = [m["content"] for r in prompt_rows(40) for m in r["prompt"]]
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("grpo") / "m", texts=texts, hidden=32, layers=2,
                                    heads=2, vocab_size=300, seed=3))


def config(tmp_path: Path, **kw) -> GrpoConfig:
    base = {"model": "unused", "data": ["unused"], "output": str(tmp_path / "out"), "max_length": 64,
            "verifier": "dataflywheel.flywheel.tasks.arithmetic:reward", "num_generations": 4,
            "max_completion_length": 6, "loop": {"batch_size": 3, "progress": False}}
    return GrpoConfig.model_validate({**base, **kw})


def varied(rows: list[dict], completions: list[str]) -> list[float]:
    return [float(sum(map(ord, c)) % 5) for c in completions]  # a deterministic, spread-out reward


def our_grads(model, cfg: GrpoConfig, rollout) -> tuple[dict[str, torch.Tensor], list]:
    """The loop's arithmetic: backprop each micro-batch's sum, divide by the step's total count."""
    model.zero_grad()
    fn, count, outs = grpo_loss_fn(cfg, "cpu"), 0.0, []
    for batch in rollout.batches:
        out = fn(model, batch)
        out.loss_sum.backward()
        count += out.count
        outs.append(out)
    return {n: p.grad.detach() / count for n, p in model.named_parameters() if p.grad is not None}, outs


def hand_advantages(rewards: list[list[float]], lengths: list[list[int]], estimator: str) -> list[list[float]]:
    """Per group of G rewards, by the papers' formulas with the statistics module."""
    if estimator == "grpo":
        return [[(r - statistics.mean(grp)) / (statistics.stdev(grp) + 1e-4) for r in grp] for grp in rewards]
    if estimator == "rloo":  # r_i − mean of the other G − 1
        return [[r - (sum(grp) - r) / (len(grp) - 1) for r in grp] for grp in rewards]
    # reinforce_pp: r − group mean, whitened over every completion token of the rollout
    xs = [[r - statistics.mean(grp) for r in grp] for grp in rewards]
    tokens = [x for grp, lens in zip(xs, lengths) for x, n in zip(grp, lens) for _ in range(n)]
    mu, sd = statistics.mean(tokens), statistics.pstdev(tokens)
    return [[(x - mu) / sd for x in grp] for grp in xs]


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_gradient_equals_reinforce_with_the_estimators_baseline(tiny, tmp_path, estimator):
    model, tok = load_for_training(tiny)
    cfg = config(tmp_path, advantage=estimator)
    backend = grpo.make_backend(cfg, model, tok, "policy")
    rows = prompt_rows(2)
    rollout = make_rollout(Calls(model), tok, backend, rows, varied, cfg, index=7)
    ours, outs = our_grads(model, cfg, rollout)
    assert [len(b["input_ids"]) for b in rollout.batches] == [3, 3, 2]  # uneven micro-batches
    assert sum(o.metrics["clip_ratio"][0] for o in outs) == 0  # μ = 1: the ratio is exactly 1

    # Independently: regenerate the same samples (same seeds), score, A_i by hand, and
    # -Σ_i A_i Σ_t log π(y_i,t | x, y_<t) / Σ_i |y_i| (dapo) with one unpadded forward per sample.
    g = cfg.num_generations
    groups = []
    for j, row in enumerate(rows):
        sampling = Sampling(n=g, seed=rollout_seed(cfg.loop.seed, 7, j), logprobs=True, max_tokens=6)
        samples = backend.generate([Request("x", messages=tuple(row["prompt"]), sampling=sampling)])[0].samples
        groups.append((row, samples, varied([row] * g, [s.text for s in samples])))
    advs = hand_advantages([r for _, _, r in groups], [[len(s.token_ids) for s in ss] for _, ss, _ in groups],
                           estimator)
    model.zero_grad()
    total, tokens = 0.0, 0
    for (row, samples, _), adv in zip(groups, advs):
        for s, a in zip(samples, adv):
            ids = chat_prompt_ids(tok, row["prompt"]) + s.token_ids
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            start = len(ids) - len(s.token_ids)
            total = total - a * sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))
            tokens += len(s.token_ids)
    (total / tokens).backward()
    theirs = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(theirs)
    assert max(float(v.abs().max()) for v in ours.values()) > 1e-3  # a real gradient, not 0 == 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5)


def test_gspo_at_ratio_one_trains_what_token_level_does(tiny, tmp_path):
    """μ = 1: every log-ratio is 0, so GSPO's sequence ratio is 1 like every token's, and the gradients
    agree for each normalisation (tests/test_grpo_losses.py covers ratios away from 1)."""
    model, tok = load_for_training(tiny)
    rollout = make_rollout(Calls(model), tok, grpo.make_backend(config(tmp_path), model, tok, "policy"),
                           prompt_rows(2), varied, config(tmp_path), index=3)
    for loss_type in ("dapo", "bnpo", "grpo"):
        token, _ = our_grads(model, config(tmp_path, loss_type=loss_type), rollout)
        seq, _ = our_grads(model, config(tmp_path, loss_type=loss_type, importance_sampling_level="sequence"), rollout)
        for name in token:
            torch.testing.assert_close(seq[name], token[name], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_two_ranks_see_the_whole_rollouts_statistics(tiny, tmp_path, monkeypatch, estimator):
    """Rank r of 2 makes its half of the rollout; with every rank's (reward, length) rows gathered its
    advantages and metrics are those one process computes for the whole rollout (REINFORCE++'s batch
    whitening and the length metrics span both halves)."""
    model, tok = load_for_training(tiny)
    cfg = config(tmp_path, advantage=estimator, **({"scale_rewards": "batch"} if estimator == "grpo" else {}))
    backend = grpo.make_backend(cfg, model, tok, "policy")
    rows = prompt_rows(4)
    whole = make_rollout(Calls(model), tok, backend, rows, varied, cfg, index=2)
    halves = {0: (rows[:2], [0, 1]), 1: (rows[2:], [2, 3])}
    shared: dict[int, torch.Tensor] = {}
    for rank, (part, slots) in halves.items():  # what each rank contributes to the gather
        monkeypatch.setattr(grpo.dist, "gather", lambda x, rank=rank: shared.__setitem__(rank, x) or [x])
        make_rollout(Calls(model), tok, backend, part, varied, cfg, index=2, slots=slots)
    advs = []
    for rank, (part, slots) in halves.items():
        monkeypatch.setattr(grpo.dist, "gather", lambda x: [shared[0], shared[1]])
        monkeypatch.setattr(grpo.dist, "shard", lambda rank=rank: (rank, 2))
        mine = make_rollout(Calls(model), tok, backend, part, varied, cfg, index=2, slots=slots)
        advs.append(torch.cat([b["advantages"] for b in mine.batches]))
        assert mine.metrics == pytest.approx(whole.metrics)
    torch.testing.assert_close(torch.cat(advs), torch.cat([b["advantages"] for b in whole.batches]))
    assert whole.metrics["completions/min_length"] <= whole.metrics["completions/mean_length"] \
        <= whole.metrics["completions/max_length"]


def test_a_unanimous_group_contributes_no_gradient(tiny, tmp_path):
    model, tok = load_for_training(tiny)
    cfg = config(tmp_path)
    backend = grpo.make_backend(cfg, model, tok, "policy")

    def first_unanimous(rows, completions):  # group 0 all 1.0, group 1 varied
        return [1.0 if r["id"] == rows[0]["id"] else v for r, v in zip(rows, varied(rows, completions))]

    rollout = make_rollout(Calls(model), tok, backend, prompt_rows(2), first_unanimous, cfg, index=0)
    adv = torch.cat([b["advantages"] for b in rollout.batches])
    assert adv[:4].abs().max() == 0 and adv[4:].abs().max() > 0.1
    assert rollout.metrics["frac_reward_zero_std"] == 0.5
    rollout = make_rollout(Calls(model), tok, backend, prompt_rows(2), lambda r, c: [0.5] * len(c), cfg, index=0)
    grads, outs = our_grads(model, cfg, rollout)
    assert all(float(v.abs().max()) == 0.0 for v in grads.values())
    assert sum(float(o.loss_sum.detach()) for o in outs) == 0.0


def test_normalisations_match_hand_computed_values():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 3.0])
    old = torch.zeros(2, 3)
    logps = torch.full((2, 3), math.log(1.1))  # ratio 1.1, inside the clip range
    # per token ℓ = -1.1 A: row 0 -1.1, -1.1 (third masked); row 1 -3.3
    s, c, _ = grpo_loss(logps, old, adv, mask, loss_type="dapo")
    assert (float(s), c) == pytest.approx((-5.5, 3.0))
    s, c, _ = grpo_loss(logps, old, adv, mask, loss_type="grpo")
    assert (float(s), c) == pytest.approx((-1.1 - 3.3, 2.0))  # per-sequence means, summed
    s, c, _ = grpo_loss(logps, old, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    assert (float(s), c) == pytest.approx((-5.5, 8.0))
    w = torch.tensor([[2.0, 0.5, 9.0], [1.0, 1.0, 1.0]])  # IS weights multiply the per-token loss
    s, c, m = grpo_loss(logps, old, adv, mask, loss_type="dapo", is_weights=w)
    assert float(s) == pytest.approx(-1.1 * 2 - 1.1 * 0.5 - 3.3)
    assert m["is_weight"] == pytest.approx((3.5, 3.0))
    with pytest.raises(ValueError):
        grpo_loss(logps, old, adv, mask, loss_type="dr_grpo")


def test_clipping_engages_outside_the_trust_region():
    old = torch.zeros(4, 1)
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.25]])
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    mask = torch.ones(4, 1)
    logps = ratios.log().requires_grad_()
    s, c, m = grpo_loss(logps, old, adv, mask, epsilon=0.2)
    s.backward()
    # clipped (gradient 0): ratio 1.5 with A > 0, ratio 0.5 with A < 0, ratio 1.25 > 1.2 with A > 0;
    # not clipped: ratio 0.5 with A > 0 (the min picks the unclipped, pessimistic term)
    assert logps.grad.flatten().tolist() == pytest.approx([0.0, 0.0, -0.5, 0.0])
    assert float(s.detach()) == pytest.approx(-(1.2 * 1) - (0.8 * -1) - 0.5 - 1.2)
    assert m["clip_ratio/high"] == (2.0, 4.0) and m["clip_ratio/low"] == (1.0, 4.0) and m["clip_ratio"] == (3.0, 4.0)
    logps.grad = None
    s, _, m = grpo_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.28)  # DAPO's clip-higher
    s.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([0.0, 0.0, -0.5, -1.25])
    assert m["clip_ratio/high"] == (1.0, 4.0)


def test_k3_kl_is_nonnegative_and_zero_at_the_reference():
    gen = torch.Generator().manual_seed(0)
    logps, ref = -torch.rand(64, 5, generator=gen) * 4, -torch.rand(64, 5, generator=gen) * 4
    assert float(k3_kl(logps, ref).min()) >= 0 and float(k3_kl(logps, ref).max()) > 0.1
    assert float(k3_kl(logps, logps).abs().max()) == 0.0
    mask, adv, old = torch.ones(64, 5), torch.randn(64, generator=gen), logps.clone()
    plain, _, _ = grpo_loss(logps, old, adv, mask)
    same, _, m = grpo_loss(logps, old, adv, mask, beta=0.1, ref_logps=logps)
    assert float(same) == float(plain) and m["kl"][0] == 0.0
    far, _, m = grpo_loss(logps, old, adv, mask, beta=0.1, ref_logps=ref)
    assert float(far) - float(plain) == pytest.approx(0.1 * float(k3_kl(logps, ref).sum()), rel=1e-5)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, math.nan])
    sd = statistics.stdev([1, 0, 1, 0])
    expected = [0.5 / (sd + 1e-4), -0.5 / (sd + 1e-4)] * 2 + [0.0] * 4  # NaN: out of the stats, advantage 0
    assert group_advantages(r, 4).tolist() == pytest.approx(expected)
    assert group_advantages(r, 4, scale="none").tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0])
    batch_sd = statistics.stdev([1, 0, 1, 0, 2, 2, 2])
    assert group_advantages(r, 4, scale="batch")[0] == pytest.approx(0.5 / (batch_sd + 1e-4))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_config_defaults_and_checks(tmp_path):
    cfg = config(tmp_path, loop={"batch_size": 4})
    assert cfg.loop.lr == 1e-6 and cfg.beta == 0.0 and cfg.loss_type == "dapo" and cfg.epsilon_high is None
    assert config(tmp_path, loop={"lr": 0.01}).loop.lr == 0.01
    with pytest.raises(ValueError, match="exactly one"):
        config(tmp_path, reward_model="rm")
    with pytest.raises(ValueError, match="grad_accum"):
        config(tmp_path, loop={"grad_accum": 2})


def test_prompt_rows_from_prompt_and_conversation_files(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "a", "prompt": "1+1=", "answer": "2"},
            {"id": "b", "messages": [{"role": "user", "content": "2+2="}], "answer": "4"},
            {"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lint = Lint()
    got = read_rows([str(path)], "prompt", lint)  # what grpo.run reads its prompts with
    assert [(r["id"], r["prompt"][-1]["content"], r["answer"]) for r in got] == [("a", "1+1=", "2"), ("b", "2+2=", "4")]
    assert lint.counts["unreadable"] == 1


def test_reward_model_rewards(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dataflywheel.models.reward_model import RewardModel

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "rm")
    fn = grpo.reward_function(config(tmp_path, verifier=None, reward_model=str(tmp_path / "rm")))
    rows = prompt_rows(2)
    got = fn(rows, ["7", "12"])
    want = RewardModel(tmp_path / "rm").score([{"messages": [*r["prompt"], {"role": "assistant", "content": c}]}
                                               for r, c in zip(rows, ["7", "12"])])
    assert got == want and got[0] != got[1]


def run_config(tmp_path: Path, name: str, fields: dict | None = None, **loop) -> tuple[dict, GrpoConfig]:
    cfg = load_train_config(CONFIG, GrpoConfig, {"output": str(tmp_path / name), **(fields or {})})
    cfg.loop = cfg.loop.model_copy(update={"max_steps": 4, "save_every": 2, "progress": False, **loop})
    return grpo.run(cfg), cfg


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_config_runs_logs_rewards_and_resumes_exactly(tmp_path):
    full, cfg = run_config(tmp_path, "full")
    lines = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(0.0 <= x["reward"] <= 1.0 and "frac_reward_zero_std" in x and "clip_ratio" in x for x in lines)
    assert full["steps"] == 4 and full["final"] and full["eval_reward"] is not None
    half, cfg2 = run_config(tmp_path, "split", stop_after=2)
    assert half["steps"] == 2 and "final" not in half
    rest, _ = run_config(tmp_path, "split")
    assert rest["resumed_from"] == 2 and rest["steps"] == 4
    a, b = weights(cfg.out / "final"), weights(cfg2.out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["reward"] for x in (cfg2.out / "metrics.jsonl").read_text().splitlines()] == \
        [x["reward"] for x in lines]


def test_resume_inside_a_rollout_reuses_it(tmp_path, monkeypatch):
    """μ = 2: a checkpoint after step 3 falls inside rollout 1 (steps 2, 3); the resumed run must train
    step 3 on that rollout's π_old, which the checkpoint keeps, to reach the same weights."""
    mu = {"num_iterations": 2}
    full, cfg = run_config(tmp_path, "full", mu, save_every=None)
    lines = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["reward"] == lines[1]["reward"] and lines[2]["reward"] == lines[3]["reward"]  # reused
    run_config(tmp_path, "split", mu, stop_after=3, save_every=None)
    made = []
    real = grpo.make_rollout
    monkeypatch.setattr(grpo, "make_rollout", lambda *a, **k: made.append(a[7]) or real(*a, **k))
    rest, cfg2 = run_config(tmp_path, "split", mu, save_every=None)
    assert rest["resumed_from"] == 3 and made == []  # step 3 trained on the saved rollout 1
    a, b = weights(cfg.out / "final"), weights(cfg2.out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


class SyncRecorder:
    """Stands in for the vLLM backend (no vLLM here): generates with the live policy and records
    every ``sync_weights`` call with the weights it was given."""

    name = "vllm"

    def __init__(self, model, tok, name):
        self.live = TransformersBackend.from_model(model, tok, name)
        self.synced: list[float] = []

    def generate(self, requests):
        return self.live.generate(requests)

    def sync_weights(self, model):
        self.synced.append(float(sum(p.detach().double().sum() for p in model.parameters())))


def test_vllm_backend_gets_weights_before_each_later_rollout(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(grpo, "make_backend", lambda cfg, m, t, n: made.append(SyncRecorder(m, t, n)) or made[-1])
    summary, cfg = run_config(tmp_path, "v", {"backend": "vllm"}, max_steps=3)
    synced = made[0].synced
    assert summary["weight_syncs"] == 3 and len(synced) == 3  # before rollouts 1 and 2, and before the final eval
    final = weights(cfg.out / "final")
    assert synced[-1] == pytest.approx(float(sum(t.double().sum() for t in final.values())), rel=1e-12)
    lines = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    # importance correction is on for vllm: weights ≈ 1 here, since the stand-in samples with the policy
    assert all(abs(x["is_weight"] - 1) < 1e-3 and x["is_ratio/max"] < 1.01 for x in lines)


def test_bad_reward_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        grpo.reward_function(config(tmp_path, verifier="no_such_module_xyz:reward"))


def test_prompts_without_room_for_a_completion_are_linted(tmp_path):
    cfg = load_train_config(CONFIG, GrpoConfig, {"output": str(tmp_path / "o"), "max_length": 12})
    with pytest.raises(UserError, match="prompt_too_long"):
        grpo.run(cfg)


OPTIONS = {"rloo": {"advantage": "rloo", "normalize_advantages": True}, "reinforce_pp": {"advantage": "reinforce_pp"},
           "bnpo": {"loss_type": "bnpo"},
           # GSPO as its paper runs it: per-sequence loss, tiny clip range; μ = 2 so step 2 has ratios ≠ 1
           "gspo": {"importance_sampling_level": "sequence", "loss_type": "grpo", "epsilon": 3e-4,
                    "epsilon_high": 4e-4, "num_iterations": 2}}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_trains_end_to_end(tmp_path, arithmetic_prompts, name):
    data, model = arithmetic_prompts
    cfg = GrpoConfig.model_validate({
        "model": str(model), "data": [str(data)], "output": str(tmp_path / "out"), "max_length": 64,
        "verifier": "test_train_grpo:varied", "num_generations": 4, "max_completion_length": 6,  # every group varies
        "prompts_per_step": 2, **OPTIONS[name], "loop": {"lr": 1e-2, "batch_size": 4, "max_steps": 2, "progress": False}})
    summary = grpo.run(cfg)
    steps = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and summary["final"] and all(math.isfinite(s["loss"]) for s in steps)
    for s in steps:  # TRL's names, and the earlier one
        assert s["completions/min_length"] <= s["completions/mean_length"] == s["completion_length"] \
            <= s["completions/max_length"] <= 6 and 0 <= s["completions/clipped_ratio"] <= 1
    if name == "gspo":  # one step at lr 1e-2 moves the sequence ratios past 1 ± 4e-4
        assert steps[0]["clip_ratio"] == 0 and steps[1]["clip_ratio"] > 0


def test_options_that_belong_to_another_estimator_are_refused(tmp_path):
    with pytest.raises(ValueError, match="scale_rewards is GRPO's"):
        config(tmp_path, advantage="rloo", scale_rewards="none")
    with pytest.raises(ValueError, match="normalize_advantages is RLOO's"):
        config(tmp_path, normalize_advantages=True)
    cfg = config(tmp_path)
    assert (cfg.advantage, cfg.importance_sampling_level, cfg.normalize_advantages) == ("grpo", "token", False)
