"""The flywheel on a prompt pool without answers (flywheel/prompts.py, evaluate.py): rounds sampled,
scored by a reward model, paired and trained with any DPO-family loss; evaluated by a fixed reward
model and against round 0's answers (win rate, length-controlled win rate, length); resumable, with
every pool row accounted for. Real parts: tiny models built here, the real pairs pipeline, real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import untrained_reward_model

from dataflywheel.flywheel.config import FlywheelConfig
from dataflywheel.flywheel.evaluate import judge_wins, lc_win_rate
from dataflywheel.flywheel.rounds import run_rounds
from dataflywheel.synth.backends.base import Backend, Sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFS = Path(__file__).resolve().parents[1] / "dataflywheel" / "data" / "demo" / "prefs.jsonl"


def test_lc_win_rate_reads_the_win_rate_at_equal_length():
    # wins explained by length alone: longer always wins, shorter always loses -> about 0.5 at equal length
    diffs = [5, 8, 3, 12, -5, -8, -3, -12] * 4
    wins = [1.0 if d > 0 else 0.0 for d in diffs]
    assert sum(wins) / len(wins) == 0.5
    assert lc_win_rate(wins, diffs) == pytest.approx(0.5, abs=1e-6)
    # a length-independent edge: wins at 0.75 whatever the length -> LC ≈ 0.75 too
    diffs = [d for d in range(-6, 7) for _ in range(4)]
    wins = [1.0, 1.0, 1.0, 0.0] * 13
    assert lc_win_rate(wins, diffs) == pytest.approx(0.75, abs=0.005)
    # a policy that wins mostly when it writes more: its LC win rate is below its raw win rate
    # (even odds at equal length, mostly longer answers): its LC win rate is the even odds, not the raw rate
    games = [(d, float(k < round(4 / (1 + math.exp(-d / 3))))) for d in range(-4, 13) for k in range(4)]
    raw = sum(w for _, w in games) / len(games)
    lc = lc_win_rate([w for _, w in games], [d for d, _ in games])
    assert raw > 0.7 and lc < raw - 0.15 and lc == pytest.approx(0.5, abs=0.1)
    # no length difference at all: LC is the raw win rate (ties count half)
    assert lc_win_rate([1.0, 0.5, 0.0, 1.0], [0, 0, 0, 0]) == pytest.approx(0.625, abs=3e-3)  # the ridge shrinks a little
    assert lc_win_rate([None], [3]) is None
    # every game won: finite, near 1 (the ridge keeps a separable round finite)
    assert 0.9 < lc_win_rate([1.0] * 20, list(range(20))) < 1.0


class AlwaysAForTests(Backend):
    """Stands in for an LLM judge with full position bias: it always prefers the answer shown first."""

    name = "always-a"

    def __init__(self):
        super().__init__("always-a", revision="v1")
        self.asked = 0

    def _complete(self, todo):
        self.asked += len(todo)
        return [Sample("[[A]]", "stop", tokens=1) for _ in todo]


def test_judge_win_rate_asks_both_orders_so_position_bias_cancels(monkeypatch):
    import dataflywheel.synth.judge as judge_mod

    backend = AlwaysAForTests()
    monkeypatch.setattr(judge_mod, "build_backend", lambda cfg: backend)
    cfg = FlywheelConfig.model_validate({
        "output": "unused", "task": None, "prompts": {"paths": ["p"], "eval_paths": ["e"], "verifier": None},
        "policy": {"model": "m", "steps": 0}, "eval": {"judge": {"model": "judge"}}})
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(5)]
    wins = judge_wins(cfg, rows, [f"ours {i}" for i in range(5)], [f"base {i}" for i in range(5)])
    assert wins == [0.5] * 5 and backend.asked == 10  # each prompt judged A-vs-B and B-vs-A


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny reward model (a tiny LM with a 1-logit head, saved once so every load scores the same)."""
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    tmp = tmp_path_factory.mktemp("pool-models")
    rows = [json.loads(line) for line in PREFS.read_text().splitlines()]
    texts = [m["content"] for r in rows for k in ("prompt", "chosen", "rejected") for m in r[k]]
    base = build_tiny_causal_lm(tmp / "lm", texts=texts, hidden=32, layers=1, heads=2, vocab_size=400)
    return untrained_reward_model(base, tmp / "rm"), tmp


def pool_config(rm: Path, out: Path, **over) -> FlywheelConfig:
    cfg = {
        "name": "pool", "seed": 0, "rounds": 2, "output": str(out), "task": None,
        "prompts": {"paths": [str(PREFS)], "eval_paths": [str(PREFS)], "seed_paths": [str(PREFS)], "kind": "preference",
                    "eval_rows": 6, "per_round": 8, "verifier": None, "max_prompt_chars": 400},
        "policy": {"tiny": {"hidden": 32, "layers": 1, "heads": 2, "vocab_size": 400}, "steps": 20},
        "sampling": {"n": 3, "temperature": 1.0, "max_tokens": 12},
        "scorers": [{"stage": "reward_model", "model": str(rm), "device": "cpu"}],
        "pool": {"field": "reward", "min_score": -1e9},
        "train": {"algorithm": "dpo", "dpo_steps": 2, "dpo_loop": {"lr": 1e-3, "batch_size": 4, "progress": False},
                  "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, "dpo_reference": "fixed",
                  "max_length": 128},
        "eval": {"reward_model": str(rm)},
        "batch_size": 16,
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return FlywheelConfig.model_validate(cfg)


def test_rounds_on_a_pool_without_answers(models, tmp_path):
    rm, _ = models
    log: list[str] = []
    manifest = run_rounds(pool_config(rm, tmp_path / "run"), log=log.append)
    r0, r1, r2 = manifest["rounds"]
    # evaluation: the fixed RM's mean reward and answer length every round; against round 0 from round 1
    for r in (r0, r1, r2):
        m = r["stages"]["eval"]["metrics"]
        assert r["headline"][0] == "mean_reward" and m["mean_reward"] is not None and m["mean_tokens"] > 0
        assert "accuracy" not in m and m["n"] == 6
    assert "win_rate" not in r0["stages"]["eval"]["metrics"]
    for r in (r1, r2):
        m = r["stages"]["eval"]["metrics"]
        assert 0 <= m["win_rate"] <= 1 and 0 < m["lc_win_rate"] < 1 and m["judged"] == 6
    assert any("mean_reward" in line and "win_rate" in line for line in log)
    # the pool accounts for every row: held-out prompts are not in it, and round slices are disjoint
    held = {json.loads(line)["id"] for part in (tmp_path / "run" / "round-000" / "eval").glob("part-*")
            for line in part.read_text().splitlines()}
    slices = []
    for k, r in ((1, r1), (2, r2)):
        c = r["stages"]["prompts"]["counts"]
        pool = c["pool"]
        assert pool["read"] == pool["usable"] + pool["heldout_overlap"] + pool.get("too_long", 0) + pool.get(
            "duplicate", 0) + pool.get("dead_letter", 0)
        assert pool["heldout_overlap"] == 6 and c["rows"] == 8
        ids = {json.loads(line)["id"] for part in (tmp_path / "run" / f"round-{k:03d}" / "prompts").glob("part-*")
               for line in part.read_text().splitlines()}
        assert not ids & held and len(ids) == 8
        slices.append(ids)
        samples = r["stages"]["samples"]["counts"]
        assert samples["sample"]["in"] == 8 and samples["pairs"]["in"] == 8  # every prompt of the slice
    assert not slices[0] & slices[1]
    # lineage: DPO from round k-1's policy, against round 0's policy (dpo_reference: fixed), with the loss list
    for k in (1, 2):
        summary = json.loads((tmp_path / "run" / f"round-{k:03d}" / "train" / "dpo" / "summary.json").read_text())
        assert summary["ref_model"].endswith("round-000/train/sft/final")
        assert summary["model"].endswith(f"round-{k - 1:03d}/train/{'sft' if k == 1 else 'dpo'}/final")
        assert summary["loss_type"] == ["sigmoid", "sft"]
        steps = [json.loads(x) for x in (tmp_path / "run" / f"round-{k:03d}" / "train" / "dpo" / "metrics.jsonl")
                 .read_text().splitlines()]
        assert all(math.isfinite(s["logps/chosen"]) and "logratio/chosen" in s for s in steps if "loss" in s)
    assert r2["stages"]["train"]["metrics"]["dpo"]["reference"] == "precompute"
    # resume: a second call redoes nothing and changes nothing
    again = run_rounds(pool_config(rm, tmp_path / "run"), log=lambda _: None)
    assert [r["stages"]["eval"]["output"] for r in again["rounds"]] == [r["stages"]["eval"]["output"]
                                                                         for r in manifest["rounds"]]
    assert all(m.get("skipped") for r in again["rounds"] for m in r["stages"].values())


def test_a_pool_run_resumed_round_by_round_equals_one_run(models, tmp_path):
    """Also: the round's pairs as configured (max-min with a length penalty here)."""
    rm, _ = models
    pairs = {"method": "max_min", "length_penalty": 0.01}
    whole = run_rounds(pool_config(rm, tmp_path / "whole", rounds=1, pairs=pairs), log=lambda _: None)
    run_rounds(pool_config(rm, tmp_path / "parts", rounds=1, pairs=pairs), rounds=0, log=lambda _: None)
    parts = run_rounds(pool_config(rm, tmp_path / "parts", rounds=1, pairs=pairs), log=lambda _: None)
    for a, b in zip(whole["rounds"], parts["rounds"]):
        assert {s: m["output"] for s, m in a["stages"].items()} == {s: m["output"] for s, m in b["stages"].items()}
    rows = [json.loads(line) for part in (tmp_path / "whole" / "round-001" / "samples" / "pairs").glob("part-*")
            for line in part.read_text().splitlines()]
    assert rows and all(r["meta"]["method"] == "max_min" for r in rows)
    assert all("margin_penalized" in r["scores"] for r in rows)


def test_pool_config_errors_say_what_is_missing(models, tmp_path):
    rm, _ = models
    with pytest.raises(ValueError, match="need eval.reward_model or eval.judge"):
        pool_config(rm, tmp_path, eval={"reward_model": None})
    with pytest.raises(ValueError, match="needs prompts.seed_paths"):
        pool_config(rm, tmp_path, prompts={"seed_paths": []})


def test_report_shows_the_preference_metrics_and_log_prob_trajectories(models, tmp_path):
    from dataflywheel.flywheel.report import render_html, table_rows

    rm, _ = models
    manifest = run_rounds(pool_config(rm, tmp_path / "run", rounds=1), log=lambda _: None)
    rows = dict(table_rows(manifest))
    assert rows["win rate vs round 0"][0] == "-" and rows["win rate vs round 0"][1] != "-"
    assert rows["held-out mean reward (eval RM)"][1] == f"{manifest['rounds'][1]['headline'][1]:.3f}"
    html = render_html(str(tmp_path / "run"), manifest)
    assert "Held-out reward and win rate per round" in html and "DPO chosen / rejected log-probs" in html
    assert 'data-name="dpo_logps"' in html or "dpo_logps" in html


def test_hh_demo_configs_run_on_hh_rlhf(shared_data, tmp_path, monkeypatch):
    """configs/train_rm_hh.yaml through `dataflywheel train rm` (cut to a few steps), then
    configs/flywheel_hh.yaml on the HH-RLHF prompts with that model, cut to one small round."""
    from dataflywheel.cli import main
    from dataflywheel.flywheel.config import load_flywheel_config

    hh = shared_data / "hh_rlhf"
    if not hh.is_dir():
        pytest.skip(f"no HH-RLHF files under {shared_data}")
    repo = PREFS.parents[3]
    monkeypatch.setenv("HH_RLHF", str(hh))
    assert main(["train", "rm", str(repo / "configs" / "train_rm_hh.yaml"), "--output", str(tmp_path / "rm"),
                 "--max-steps", "3"]) == 0
    rm = tmp_path / "rm" / "final"
    monkeypatch.setenv("HH_RM", str(rm))
    monkeypatch.setenv("HH_RM_EVAL", str(rm))
    cfg = load_flywheel_config(repo / "configs" / "flywheel_hh.yaml", {"output": str(tmp_path / "run"), "rounds": 1})
    cfg = cfg.model_copy(update={  # one small round
        "prompts": cfg.prompts.model_copy(update={"per_round": 6, "eval_rows": 5}),
        "policy": cfg.policy.model_copy(update={"steps": 8}),
        "sampling": cfg.sampling.model_copy(update={"n": 2, "max_tokens": 8}),
        "train": cfg.train.model_copy(update={"dpo_steps": 2})})
    manifest = run_rounds(cfg, log=lambda _: None)
    r1 = manifest["rounds"][1]
    pool = r1["stages"]["prompts"]["counts"]["pool"]
    assert pool["read"] == 2749  # helpful-rejection-sampled test: every pair accounted for
    assert pool["read"] == sum(pool[k] for k in ("usable", "heldout_overlap", "too_long", "duplicate")) + pool.get(
        "dead_letter", 0)
    assert r1["stages"]["samples"]["counts"]["sample"]["in"] == 6
    m = r1["stages"]["eval"]["metrics"]
    assert m["n"] == 5 and m["judged"] == 5 and m["mean_reward"] is not None
    assert r1["policy"] == "round-001/train/dpo/final"
