"""DPO (train/dpo.py): ln 2 at step 0, the loss against a plain per-token computation, and the
precomputed, cached reference (equal to a live one, never recomputed, not in memory while training)."""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch

from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.train import dpo
from dataflywheel.train.config import load_train_config
from dataflywheel.train.data import Lint, pair_examples, with_kl_rows
from dataflywheel.train.dpo import DpoConfig, DpoLoop, pair_batch, pair_loss, run
from dataflywheel.train.losses import IGNORE
from dataflywheel.train.model import load_for_training

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dataflywheel" / "data" / "demo" / "prefs.jsonl"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models with one tokenizer (same text): the policy, and a differently seeded reference."""
    tmp = tmp_path_factory.mktemp("dpo")
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    texts = [m["content"] for r in rows for k in ("prompt", "chosen", "rejected") for m in r[k]]
    kw = {"texts": texts, "hidden": 32, "layers": 2, "heads": 2, "vocab_size": 400}
    return build_tiny_causal_lm(tmp / "policy", seed=0, **kw), build_tiny_causal_lm(tmp / "ref", seed=1, **kw), rows


def config(policy: Path, out: Path, **kw) -> DpoConfig:
    loop = DpoLoop(lr=1e-3, batch_size=4, grad_accum=2, max_steps=kw.pop("steps", 2), progress=False)
    return DpoConfig(model=str(policy), data=[str(DEMO)], output=str(out), eval_fraction=0.2, max_length=128,
                     loop=loop, **kw)


def plain_logps(model, ex) -> tuple[float, int]:
    """Summed completion log-prob of one unpadded sequence, token by token."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ex.input_ids])).logits[0].double(), -1)
    total, n = 0.0, 0
    for t in range(1, len(ex.input_ids)):
        if ex.labels[t] != IGNORE:
            total += float(logp[t - 1, ex.input_ids[t]])
            n += 1
    return total, n


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_equals_a_plain_computation(models, tmp_path, loss_type):
    policy_dir, ref_dir, rows = models
    policy, tok = load_for_training(str(policy_dir))
    ref, _ = load_for_training(str(ref_dir))
    pairs = pair_examples(rows[:6], tok, 128, Lint())
    beta = 0.5
    cfg = config(policy_dir, tmp_path, beta=beta, loss_type=loss_type)
    out = pair_loss(policy, pair_batch(pairs, tok.pad_token_id), cfg, ref_model=ref)
    expected, right = 0.0, 0
    for p in pairs:
        (pc, nc), (pr, nr) = plain_logps(policy, p.chosen), plain_logps(policy, p.rejected)
        (rc, _), (rr, _) = plain_logps(ref, p.chosen), plain_logps(ref, p.rejected)
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            expected += math.log1p(math.exp(-beta * h))
        elif loss_type == "hinge":
            expected += max(0.0, 1 - beta * h)
        else:  # TRL: each log-ratio divided by its completion length
            expected += ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
        right += beta * (pc - rc) > beta * (pr - rr)
    assert out.count == len(pairs) == 6
    assert float(out.loss_sum.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    s, c = out.metrics["rewards/accuracies"]
    assert (s, c) == (right, 6)
    s, _ = out.metrics["rewards/margins"]
    margins = sum(beta * ((plain_logps(policy, p.chosen)[0] - plain_logps(ref, p.chosen)[0])
                          - (plain_logps(policy, p.rejected)[0] - plain_logps(ref, p.rejected)[0])) for p in pairs)
    assert s == pytest.approx(margins, abs=1e-4)


@pytest.mark.parametrize("loss_type", ["dpop", "simpo", "orpo", "kto"])
def test_more_losses_equal_a_plain_computation(models, tmp_path, loss_type):
    """The losses beyond DPO's through pair_loss (batched, padded, chunked) against per-row log-probs."""
    policy_dir, ref_dir, rows = models
    policy, tok = load_for_training(str(policy_dir))
    ref, _ = load_for_training(str(ref_dir))
    pairs = with_kl_rows(pair_examples(rows[:6], tok, 128, Lint()), 128)
    beta = 0.5
    cfg = config(policy_dir, tmp_path, beta=beta, loss_type=loss_type, dpop_lambda=5.0, simpo_gamma=0.3)
    batch = pair_batch(pairs, tok.pad_token_id) if loss_type == "kto" else pair_batch(
        [p.__class__(p.id, p.chosen, p.rejected) for p in pairs], tok.pad_token_id)
    out = pair_loss(policy, batch, cfg, ref_model=ref)
    side = [[plain_logps(m, ex) for m in (policy, ref)] for p in pairs for ex in (p.chosen, p.rejected, p.kl)]
    kls = [s[0][0] - s[1][0] for s in side[2::3]]
    z0 = max(0.0, sum(kls) / len(kls))
    nll = -sum(s[0][0] for s in side[0::3]) / sum(s[0][1] for s in side[0::3])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = 0.0
    for c, r in zip(side[0::3], side[1::3]):
        (pc, nc), (rc, _) = c
        (pr, nr), (rr, _) = r
        h = (pc - rc) - (pr - rr)
        if loss_type == "dpop":
            expected += -math.log(sig(beta * (h - 5.0 * max(0.0, rc - pc))))
        elif loss_type == "simpo":
            expected += -math.log(sig(beta * (pc / nc - pr / nr) - 0.3))
        elif loss_type == "orpo":
            odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
            expected += nll - beta * math.log(sig(odds(pc / nc) - odds(pr / nr)))
        else:
            expected += 0.5 * (1 - sig(beta * (pc - rc - z0))) + 0.5 * (1 - sig(beta * (z0 - (pr - rr))))
    assert out.count == 6
    assert float(out.loss_sum.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert ("logratio/chosen" in out.metrics) == (loss_type not in ("simpo", "orpo"))
    assert ("kl" in out.metrics) == (loss_type == "kto")


def test_reference_free_losses_build_no_reference(models, tmp_path, monkeypatch):
    policy_dir, ref_dir, _ = models
    loaded: list[str] = []
    real_load = dpo.load_for_training
    monkeypatch.setattr(dpo, "load_for_training", lambda name, **kw: (loaded.append(str(name)), real_load(name, **kw))[1])
    summary = run(config(policy_dir, tmp_path / "simpo", loss_type=["simpo", "sft"], loss_weights=[1.0, 0.1],
                         ref_model=str(ref_dir), beta=2.0))
    assert loaded == [str(policy_dir)] and summary["ref_forwards"] == 0 and summary["reference"] == "none"
    assert not (tmp_path / "simpo" / "ref_logps.sqlite").exists()
    assert "logratio/chosen" not in step_metrics(tmp_path / "simpo")[0]


def test_kto_precomputed_reference_equals_live(models, tmp_path):
    """KTO's mismatched rows go through the reference cache ([P, 3]) and give the live reference's training."""
    policy_dir, ref_dir, _ = models
    pre = run(config(policy_dir, tmp_path / "pre", loss_type="kto", ref_model=str(ref_dir), steps=3))
    live = run(config(policy_dir, tmp_path / "live", loss_type="kto", ref_model=str(ref_dir), steps=3,
                      reference="live"))
    a, b = step_metrics(tmp_path / "pre"), step_metrics(tmp_path / "live")
    assert pre["ref_forwards"] > 0 and live["ref_forwards"] == 0
    for x, y in zip(a, b):
        for key in ("loss", "kl", "logratio/chosen"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key
    assert any(x["kl"] > 0 for x in a)  # another model as reference: z0 is not trivially 0
    assert pre["eval_loss"] == pytest.approx(live["eval_loss"], rel=1e-5)


def step_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_step0_is_ln2_and_a_rerun_hits_the_cache(models, tmp_path):
    policy_dir, _, _ = models
    cache = tmp_path / "ref.sqlite"
    first = run(config(policy_dir, tmp_path / "a", ref_cache=str(cache)))
    m = step_metrics(tmp_path / "a")[0]
    assert abs(m["loss"] - math.log(2)) < 1e-6  # reference == policy at step 0 (trl#1962 / PR #5563 guard)
    assert abs(m["rewards/chosen"]) < 1e-6 and abs(m["rewards/margins"]) < 1e-6
    assert first["ref_forwards"] > 0
    second = run(config(policy_dir, tmp_path / "b", ref_cache=str(cache)))
    assert second["ref_forwards"] == 0
    assert [x["loss"] for x in step_metrics(tmp_path / "b")] == [x["loss"] for x in step_metrics(tmp_path / "a")]


def test_precomputed_reference_equals_live_and_is_freed(models, tmp_path, monkeypatch):
    """Another model as reference: precompute and live give the same training; with precompute the
    reference model is dead (weakref) when training starts; with ref == policy none is built."""
    policy_dir, ref_dir, _ = models
    loaded: list[weakref.ref] = []
    alive_at_train: list[int] = []
    real_load, real_loop = dpo.load_for_training, dpo.train_loop

    def load(*a, **kw):
        model, tok = real_load(*a, **kw)
        loaded.append(weakref.ref(model))
        return model, tok

    def loop(*a, **kw):
        gc.collect()
        alive_at_train.append(sum(r() is not None for r in loaded))
        return real_loop(*a, **kw)

    monkeypatch.setattr(dpo, "load_for_training", load)
    monkeypatch.setattr(dpo, "train_loop", loop)
    pre = run(config(policy_dir, tmp_path / "pre", ref_model=str(ref_dir), steps=3))
    assert len(loaded) == 2 and alive_at_train == [1]  # the policy only
    live = run(config(policy_dir, tmp_path / "live", ref_model=str(ref_dir), reference="live", steps=3))
    assert live["ref_forwards"] == 0 and alive_at_train[-1] == 2
    a, b = step_metrics(tmp_path / "pre"), step_metrics(tmp_path / "live")
    assert abs(a[0]["rewards/margins"]) > 1e-3  # a different reference: the test is not trivially 0 == 0
    for x, y in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key
    assert pre["eval_loss"] == pytest.approx(live["eval_loss"], rel=1e-5)
    loaded.clear()
    run(config(policy_dir, tmp_path / "self", steps=1))
    assert len(loaded) == 1  # ref_model: null precomputes on the policy itself, before its first update


def test_train_dpo_config_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config's data path is relative to the repository
    cfg = load_train_config(REPO / "configs" / "train_dpo.yaml", DpoConfig, {"output": str(tmp_path / "dpo")})
    cfg.loop.max_steps, cfg.loop.progress = 2, False
    summary = run(cfg)
    assert summary["steps"] == 2 and summary["pairs"] + summary["eval_pairs"] == 100
    assert abs(step_metrics(tmp_path / "dpo")[0]["loss"] - math.log(2)) < 1e-6
    assert (tmp_path / "dpo" / "ref_logps.sqlite").is_file() and (tmp_path / "dpo" / "final").is_dir()


def test_kto_on_unpaired_rows_trains_as_on_the_pairs_they_came_from(models, tmp_path):
    """The pairs written as unpaired rows (chosen: label true, rejected: label false, in order) give
    the same KTO training as the pairs; with rows missing on one side the leftovers train alone."""
    policy_dir, ref_dir, rows = models
    unpaired = tmp_path / "unpaired.jsonl"
    lines = [json.dumps({"id": f"{r['id']}-{side}", "prompt": r["prompt"], "completion": r[side],
                         "label": side == "chosen"}) for r in rows for side in ("chosen", "rejected")]
    unpaired.write_text("\n".join(lines) + "\n")
    common = {"loss_type": "kto", "ref_model": str(ref_dir)}
    loop = DpoLoop(lr=1e-3, batch_size=4, grad_accum=2, max_steps=3, progress=False)
    paired = run(DpoConfig(model=str(policy_dir), data=[str(DEMO)], output=str(tmp_path / "paired"), max_length=128,
                           loop=loop, eval_fraction=0.0, **common))
    flat = run(DpoConfig(model=str(policy_dir), data=[str(unpaired)], output=str(tmp_path / "flat"), max_length=128,
                         loop=loop, unpaired=True, eval_fraction=0.0, **common))
    assert flat["rows"] == {"desirable": paired["pairs"], "undesirable": paired["pairs"]}
    for x, y in zip(step_metrics(tmp_path / "paired"), step_metrics(tmp_path / "flat")):
        for key in ("loss", "kl", "rewards/chosen", "logps/rejected"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    # unbalanced: every third undesirable row dropped; the leftover desirable rows train with no partner
    unpaired.write_text("\n".join(line for i, line in enumerate(lines) if i % 6 != 1) + "\n")
    lopsided = run(DpoConfig(model=str(policy_dir), data=[str(unpaired)], output=str(tmp_path / "lop"), max_length=128,
                             loop=loop, unpaired=True, eval_fraction=0.0, loss_type="kto"))
    assert lopsided["rows"]["desirable"] == paired["pairs"] > lopsided["rows"]["undesirable"]
    assert all(math.isfinite(m["loss"]) for m in step_metrics(tmp_path / "lop"))


def test_unpaired_rows_are_checked_and_kto_only():
    from dataflywheel.records import RecordError, validate

    row = validate("unpaired", {"prompt": "hi", "completion": "hello", "label": True})
    assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    with pytest.raises(RecordError, match="label"):
        validate("unpaired", {"prompt": "hi", "completion": "hello", "label": "yes"})
    with pytest.raises(RecordError, match="completion"):
        validate("unpaired", {"prompt": "hi", "label": False})
    with pytest.raises(ValueError, match="unpaired data trains only with loss_type kto"):
        DpoConfig(model="m", data=["d"], output="o", unpaired=True, loss_type="sigmoid")


def test_unpaired_rows_reconcile_with_bad_and_over_long_rows(models, tmp_path):
    """Every unpaired row in is trained (desirable or undesirable) or dropped with its reason:
    in == desirable + undesirable + rows_dropped."""
    policy_dir, _, rows = models
    good = [{"id": f"{r['id']}-{side}", "prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in rows[:10] for side in ("chosen", "rejected")]
    bad = [{"id": "no-label", "prompt": "hi", "completion": "hello"},
           {"id": "long", "prompt": "hi", "completion": "word " * 400, "label": True}]
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "not json\n")
    loop = DpoLoop(lr=1e-3, batch_size=4, max_steps=1, progress=False)
    summary = run(DpoConfig(model=str(policy_dir), data=[str(data)], output=str(tmp_path / "out"), max_length=128,
                            loop=loop, unpaired=True, loss_type="kto", eval_fraction=0.0, lint="drop"))
    kept = summary["rows"]["desirable"] + summary["rows"]["undesirable"]
    assert kept == len(good) and summary["rows_dropped"] == 3  # a row without label, an over-long one, a bad line
    assert kept + summary["rows_dropped"] == len(good) + len(bad) + 1
    assert summary["lint"]["pair_too_long"] == 1 and summary["lint"]["unreadable"] == 2
