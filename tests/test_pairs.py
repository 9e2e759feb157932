"""Pair builders (exact picks on hand-made candidates), RSO's acceptance law, the checks' reasons,
the ``pairs`` / ``best_of_n`` stages' rows and provenance, and ``pair_quantile`` on the real Beam
runner (FnApiRunner) against the plain loop."""

from __future__ import annotations

import json
import math
import random

import pytest

from dataflywheel.io import read
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.records import validate
from dataflywheel.stages import process_batch
from dataflywheel.synth.pair_builders import (
    Candidate,
    PairRules,
    all_pairs,
    check_pair,
    max_min,
    rso,
    rso_sample,
    rso_seed,
    west_of_n,
)
from dataflywheel.synth.pairs import BestOfN, Pairs, explode_pairs

TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "birds fly south in the winter months",
         "fish swim in the deep blue sea", "green trees grow tall near rivers", "stars shine at night"]
LOOSE = PairRules(max_length_ratio=None, near_identical=None)  # only identical / tie / margin


def cands(rewards, tokens=None) -> list[Candidate]:
    tokens = tokens or [10] * len(rewards)
    return [Candidate(i, TEXTS[i], r, t) for i, (r, t) in enumerate(zip(rewards, tokens))]


def picks(result):
    pairs, reason = result
    return [(c.index, r.index) for c, r in pairs], reason


def test_west_of_n_best_vs_worst_and_margin():
    assert picks(west_of_n(cands([0.2, 1.5, -0.3, 0.9]), LOOSE)) == ([(1, 2)], None)
    # Equal rewards: the lowest index is best, the highest index among the worst is worst.
    assert picks(west_of_n(cands([1.0, 0.0, 1.0, 0.0]), LOOSE)) == ([(0, 3)], None)
    assert picks(west_of_n(cands([0.2, 0.5]), PairRules(min_margin=0.5, max_length_ratio=None))) == ([], "below_margin")
    assert picks(west_of_n(cands([0.7, 0.7, 0.7]), LOOSE)) == ([], "tie")
    # Length control on West-of-N refuses, it does not re-pick.
    assert picks(west_of_n(cands([2.0, 1.0, 0.0], [40, 12, 10]), PairRules()))[1] == "length_ratio"


def test_missing_scores():
    assert picks(west_of_n(cands([None, None, None]), LOOSE)) == ([], "no_scores")
    assert picks(max_min(cands([None, 1.0, float("nan")]), LOOSE)) == ([], "too_few_scored")
    assert picks(west_of_n(cands([None, 1.0, 0.0]), LOOSE)) == ([(1, 2)], None)  # unscored sample skipped


def test_max_min_length_penalty_and_length_control():
    tokens = [100, 20, 22, 30, 10]
    rewards = [3.0, 2.0, 0.5, 0.0, -1.0]
    # Plain max-min: best vs worst whatever the lengths.
    assert picks(max_min(cands(rewards, tokens), LOOSE)) == ([(0, 4)], None)
    # max_min_p: reward - 0.05 * tokens = [-2.0, 1.0, -0.6, -1.5, -1.5]; worst of the equals is index 4.
    penalized = PairRules(max_length_ratio=None, near_identical=None, length_penalty=0.05)
    assert picks(max_min(cands(rewards, tokens), penalized)) == ([(1, 0)], None)
    # Length-controlled (ratio 1.5): the best-margin pair within the ratio, not best/worst:
    # (1,3): 20 vs 30 tokens, margin 2.0, beats (1,2) margin 1.5 and (2,3) margin 0.5.
    assert picks(max_min(cands(rewards, tokens), PairRules(near_identical=None))) == ([(1, 3)], None)
    # Tighter ratio 1.2: (1,3) is out (1.5), (1,2) is in (1.1).
    assert picks(max_min(cands(rewards, tokens), PairRules(max_length_ratio=1.2, near_identical=None))) == ([(1, 2)], None)
    # No pair within the ratio at all.
    assert picks(max_min(cands([1.0, 0.0, -1.0], [10, 30, 90]), PairRules())) == ([], "length_ratio")


def test_all_pairs_is_k_choose_2_in_rank_order():
    got, reason = picks(all_pairs(cands([0.1, 0.9, 0.5, -0.2]), LOOSE))
    assert reason is None and got == [(1, 2), (1, 0), (1, 3), (2, 0), (2, 3), (0, 3)]
    got, _ = picks(all_pairs(cands([0.1, 0.9, 0.1, -0.2]), LOOSE))  # the tie (0, 2) is dropped
    assert len(got) == 5 and (0, 2) not in got and (2, 0) not in got
    assert picks(all_pairs(cands([0.3, 0.3]), LOOSE)) == ([], "tie")


def test_check_pair_reasons():
    a = Candidate(0, "The quick brown fox jumps over the lazy dog near the river bank today", 2.0, 14)
    same = Candidate(1, "  the QUICK brown fox jumps over the lazy dog near the river bank today ", 1.0, 14)
    near = Candidate(2, "The quick brown fox jumps over the lazy dog near the river bank now", 1.0, 14)
    other = Candidate(3, "Completely different words here about cooking pasta at home", 1.0, 10)
    rules = PairRules()
    assert check_pair(a, same, rules) == "identical"
    assert check_pair(a, near, rules) == "near_identical"
    assert check_pair(a, other, rules) is None
    assert check_pair(a, other._replace(reward=2.0), rules) == "tie"
    assert check_pair(a, other._replace(reward=1.95), PairRules(tie_eps=0.1)) == "tie"
    assert check_pair(a, other._replace(tokens=5), rules) == "length_ratio"
    assert check_pair(a, near, PairRules(near_identical=None)) is None


def test_rso_acceptance_frequencies_follow_exp_law():
    """With k = N nothing stops the first pass early, so each candidate is accepted in pass 1
    independently with probability exp((r - r_max) / beta). 3000 seeds: the binomial standard
    error is at most 0.0092; we allow 4.5 of them (a false alarm about once in 10^5 runs)."""
    rewards, beta, n = [1.0, 0.4, 0.0, -0.5, 0.8, -2.0], 0.7, 3000
    hits = [0] * len(rewards)
    for seed in range(n):
        for i, pass_no in rso_sample(rewards, len(rewards), beta, random.Random(rso_seed(f"p{seed}"))):
            hits[i] += pass_no == 1
    for i, r in enumerate(rewards):
        p = math.exp((r - max(rewards)) / beta)
        tol = 4.5 * math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(hits[i] / n - p) <= max(tol, 1e-9), (i, hits[i] / n, p)


def test_rso_limits_and_reproducibility():
    rewards = [0.1, 0.9, 0.5, 0.3]
    # beta -> 0: only the best is ever accepted first, then the next best: a top-k by reward.
    for seed in range(50):
        got = rso_sample(rewards, 2, 1e-6, random.Random(seed))
        assert [i for i, _ in got] == [1, 2]
    # Candidates run out before k: all accepted, once each.
    assert sorted(i for i, _ in rso_sample(rewards, 10, 1.0, random.Random(0))) == [0, 1, 2, 3]
    # Seeded by prompt id: same id, same pairs; RSO pairs are labelled by reward.
    c = cands([0.1, 0.9, 0.5, 0.3, 1.2, -0.4])
    a = picks(rso(c, LOOSE, k=4, beta=0.5, seed=rso_seed("q1")))
    assert a == picks(rso(c, LOOSE, k=4, beta=0.5, seed=rso_seed("q1")))
    assert len(a[0]) == 2 and all(c[i].reward > c[j].reward for i, j in a[0])
    top = picks(rso(c, LOOSE, k=2, beta=1e-6, seed=1))
    assert top == ([(4, 1)], None)
    assert len(picks(rso(c, LOOSE, k=4, beta=0.5, seed=3, pairing="all"))[0]) == 6


def prompt_row(pid: str, rewards, tokens=None, **meta) -> dict:
    tokens = tokens or [10] * len(rewards)
    comps = [{"index": i, "text": TEXTS[i], "tokens": t, "finish_reason": "stop", "rejected": None,
              "scores": {"reward_model": r, "reward": r}} for i, (r, t) in enumerate(zip(rewards, tokens))]
    return {"id": pid, "prompt": [{"role": "user", "content": f"question {pid}?"}], "completions": comps,
            "meta": {"source": "t", "generation": {"model": "tiny-policy", "backend": "transformers",
                                                   "sampling": {"n": len(rewards), "temperature": 1.0}},
                     "scorers": [{"name": "reward_model", "kind": "reward_model", "model": "rm@abc"}], **meta}}


def test_pairs_stage_rows_provenance_and_reasons():
    rows = [prompt_row("a", [0.1, 2.0, -1.0], round=2), prompt_row("b", [0.5, 0.5]),
            prompt_row("c", [None, None]), {**prompt_row("d", [3.0, 1.0, 0.0])}]
    rows[3]["completions"][0]["rejected"] = "refusal"  # generate refused it: never a candidate
    out = process_batch(Pairs(method="west_of_n", round=7), rows)
    assert sorted(r["rejected"]["reason"] for r in out.rejected) == ["no_scores", "tie"]
    assert out.stats == {"pairs_built": 2, "candidates": 10}
    a, d = sorted(out.kept, key=lambda r: r["id"])
    validate("preference", a)  # TRL conversational explicit form
    assert a["chosen"] == [{"role": "assistant", "content": TEXTS[1]}]
    assert a["rejected"][0]["content"] == TEXTS[2]
    assert a["scores"]["margin"] == pytest.approx(3.0)
    assert a["scores"]["confidence"] == pytest.approx(1 / (1 + math.exp(-3.0)))
    m = a["meta"]
    assert (m["prompt_id"], m["method"], m["policy"], m["round"], m["source"]) == ("a", "west_of_n", "tiny-policy", 2, "t")
    assert m["sampling"]["n"] == 3 and m["scorers"][0]["model"] == "rm@abc"
    assert (m["chosen_index"], m["rejected_index"]) == (1, 2)
    assert [c["reward"] for c in m["candidates"]] == [0.1, 2.0, -1.0] and "pairing" not in m
    assert (d["meta"]["round"], d["meta"]["chosen_index"], d["meta"]["rejected_index"]) == (7, 1, 2)
    rej = next(r for r in out.rejected if r["id"] == "c")
    assert rej["completions"] and rej["meta"]["pairing"] == {"method": "west_of_n", "reason": "no_scores"}


def test_pairs_stage_multi_pair_rows_explode():
    rows = [prompt_row("a", [0.1, 2.0, -1.0, 0.7])]
    out = process_batch(Pairs(method="all_pairs", max_length_ratio=None), rows)
    (row,) = out.kept
    prefs = explode_pairs(row)
    assert len(prefs) == 6 and len({p["id"] for p in prefs}) == 6
    assert all(p["meta"]["prompt_id"] == "a" and p["scores"]["margin"] > 0 for p in prefs)
    for p in prefs:
        validate("preference", p)
    rso_out = process_batch(Pairs(method="rso", rso_k=4), rows)
    assert rso_out.kept[0]["meta"]["pairs"] == len(rso_out.kept[0]["pairs"]) == 2
    again = process_batch(Pairs(method="rso", rso_k=4), rows)
    assert again.kept == rso_out.kept  # seeded by prompt id


def test_best_of_n_stage():
    rows = [prompt_row("a", [0.1, 2.0, -1.0]), prompt_row("b", [0.2, 0.3]), prompt_row("c", [None])]
    out = process_batch(BestOfN(min_score=1.0, round=3), rows)
    assert sorted(r["rejected"]["reason"] for r in out.rejected) == ["below_threshold", "no_scores"]
    (a,) = out.kept
    validate("conversation", a)
    assert a["messages"][-1] == {"role": "assistant", "content": TEXTS[1]}
    assert a["scores"]["reward"] == 2.0 and a["meta"]["chosen_index"] == 1 and a["meta"]["round"] == 3
    verified = prompt_row("v", [0.0, 0.0])
    for c, ok in zip(verified["completions"], (0.0, 1.0)):
        c["scores"]["verifier"] = ok
    (v,) = process_batch(BestOfN(field="verifier", min_score=1.0), [verified]).kept
    assert v["meta"]["chosen_index"] == 1


def quantile_config(inputs: str, out, engine: str, q: float) -> dict:
    return {"name": "q", "runner": {"engine": engine},
            "input": {"paths": inputs, "kind": "preference", "batch_rows": 7},
            "stages": [{"stage": "pair_quantile", "quantile": q}],
            "output": {"path": str(out), "format": "jsonl", "rows_per_shard": 10}}


def test_pair_quantile_on_beam_equals_plain(tmp_path):
    rng = random.Random(5)
    lines = []
    for i in range(40):
        margin = rng.uniform(-0.5, 3.0)
        scores = {"margin": margin, "confidence": 1 / (1 + math.exp(-margin))} if i != 13 else {}
        lines.append(json.dumps({"id": f"p{i:02d}", "prompt": [{"role": "user", "content": f"q{i}"}],
                                 "chosen": [{"role": "assistant", "content": f"good {i}"}],
                                 "rejected": [{"role": "assistant", "content": f"bad {i}"}], "scores": scores}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    inputs = str(tmp_path / "in.jsonl")
    reports = {}
    for engine in ("plain", "local"):
        parsed = parse_config(quantile_config(inputs, tmp_path / engine, engine, 0.75), "<test>")
        reports[engine] = run_job(parsed.jobs[0], parsed.runner)
        reports[engine].check()
    kept = {e: sorted(r["id"] for r in read(str(tmp_path / e))) for e in reports}
    assert kept["plain"] == kept["local"]
    conf = sorted(json.loads(x)["scores"]["confidence"] for x in lines if json.loads(x)["scores"])
    expected = sum(c >= _np_quantile(conf, 0.75) for c in conf)
    assert len(kept["local"]) == expected == 10
    stage = {s.stage: s for s in reports["local"].stages}["pair_quantile"]
    assert stage.rejected == {"below_quantile": 29, "no_scores": 1}
    row = next(iter(read(str(tmp_path / "local"))))
    assert row["meta"]["pair_quantile"]["threshold"] == pytest.approx(_np_quantile(conf, 0.75))


def _np_quantile(values, q):
    """Linear-interpolation quantile written out, to check numpy's (the stage's) threshold."""
    pos = (len(values) - 1) * q
    lo = math.floor(pos)
    return values[lo] + (values[min(lo + 1, len(values) - 1)] - values[lo]) * (pos - lo)


def test_pairs_stage_on_beam_equals_plain(tmp_path):
    rng = random.Random(9)
    rows = [prompt_row(f"r{i:02d}", [round(rng.uniform(-2, 2), 3) for _ in range(4)],
                       [rng.choice([8, 10, 12, 25]) for _ in range(4)]) for i in range(24)]
    rows[3] = prompt_row("r03", [None, None, None, None])
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = {}
    for engine in ("plain", "local"):
        cfg = {"name": "p", "runner": {"engine": engine},
               "input": {"paths": str(tmp_path / "in.jsonl"), "kind": "prompt", "batch_rows": 5},
               "stages": [{"stage": "pairs", "method": "max_min", "batch_size": 4}],
               "output": {"path": str(tmp_path / engine), "format": "jsonl", "rows_per_shard": 8}}
        parsed = parse_config(cfg, "<test>")
        report = run_job(parsed.jobs[0], parsed.runner)
        report.check()
        stage = {s.stage: s for s in report.stages}["pairs"]
        assert stage.rows_in == 24 and stage.rejected.get("no_scores") == 1
        kept[engine] = sorted(read(str(tmp_path / engine)), key=lambda r: r["id"])
    assert kept["plain"] == kept["local"] and len(kept["local"]) >= 12
    for row in kept["local"]:
        validate("preference", row)
        assert row["scores"]["tokens_chosen"] / row["scores"]["tokens_rejected"] <= 1.5
        assert 1 / 1.5 <= row["scores"]["tokens_chosen"] / row["scores"]["tokens_rejected"]
