"""Synthesis and LLM-judged stages with a real chat model (SmolLM2-135M-Instruct) through the
transformers backend: InsTag tagging, the Self-Rewarding judge rubric, two Self-Instruct bootstrap
rounds from the shared seed tasks and one Evol-Instruct round. A 135M model's replies are often
unparsable; what is asserted is that every row and every request is accounted for, whatever it says."""

from __future__ import annotations

import pytest
from test_self_instruct import CANDIDATE_REASONS

from dataflywheel.io import read
from dataflywheel.records import validate
from dataflywheel.selectors.instag import InsTagTag
from dataflywheel.stages import process_batch
from dataflywheel.synth.backends.transformers import TransformersBackend
from dataflywheel.synth.evol import EvolConfig, EvolInstruct
from dataflywheel.synth.judge import Judge
from dataflywheel.synth.self_instruct import SelfInstruct, SelfInstructConfig, load_seed_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _backend_config(smollm2: str) -> dict:
    return {"kind": "transformers", "model": smollm2, "options": {"device": "cpu", "batch_size": 8}}


def test_instag_tagging_accounts_for_every_row(smollm2, shared_data):
    path = shared_data / "alpaca_subset" / "alpaca_cherry5pct_shared.jsonl"
    rows = [r for _, r in zip(range(4), read(str(path), kind="conversation"))]
    stage = InsTagTag(backend=_backend_config(smollm2), sampling={"temperature": 0.0, "max_tokens": 96, "seed": 0},
                      reject_failed=True)
    stage.setup()
    out = process_batch(stage, rows)
    assert len(out.kept) + len(out.rejected) + len(out.dead) == 4 and not out.dead
    s = out.stats
    failed = s.get("tag_failed_rows", 0)
    assert len(out.rejected) == failed and all(r["rejected"]["reason"] == "tag_parse_failed" for r in out.rejected)
    assert s["tag_requests"] == 4 + s.get("tag_retries", 0)  # one request a row, one retry per unparsable reply
    for row in out.kept:
        assert row["meta"]["instag"] and all(isinstance(t["tag"], str) for t in row["meta"]["instag"])


def test_judge_rubric_scores_or_marks_every_completion(smollm2):
    rows = [{"id": "q", "prompt": [{"role": "user", "content": "What is 12 + 30?"}],
             "completions": [{"index": 0, "text": "12 + 30 = 42."}, {"index": 1, "text": "It is 50."}]}]
    stage = Judge(backend=_backend_config(smollm2), samples=2, sampling={"max_tokens": 48})
    stage.setup()
    out = process_batch(stage, rows)
    (row,) = out.kept
    scores = [c["scores"]["judge"] for c in row["completions"]]
    assert all(v is None or 0 <= v <= 5 for v in scores)
    s = out.stats
    assert s.get("scored", 0) + s.get("unscorable", 0) == 2 and s["judge_samples"] == 4
    assert s.get("judge_unparsable", 0) == sum(p is None for c in row["completions"] for p in c["judge"]["parsed"])


def test_self_instruct_two_bootstrap_rounds_account_for_every_candidate(smollm2, shared_data):
    seeds = load_seed_tasks(shared_data / "self_instruct_seed" / "seed_tasks.jsonl")
    backend = TransformersBackend(smollm2, device="cpu", batch_size=8)
    cfg = SelfInstructConfig(num_instructions=50, max_requests=4, request_batch_size=2, chat=True,
                             bootstrap_sampling={"temperature": 0.7, "max_tokens": 96, "seed": 1},
                             instance_sampling={"temperature": 0.0, "max_tokens": 48})
    si = SelfInstruct(backend, seeds, cfg)
    tasks = si.bootstrap()
    c = si.counts
    assert c["requests"] == 4 and backend.counts["errors"] == 0  # two rounds of two prompts
    rejected = sum(v for k, v in si.rejections.items() if k in CANDIDATE_REASONS)
    assert c["candidates"] == c["accepted"] + rejected and c["accepted"] == len(tasks)
    si.classify(tasks)
    si.generate_instances(tasks)
    for row in si.instance_rows(tasks):
        validate("conversation", row)


def test_evol_instruct_one_round_ends_every_attempt_once(smollm2):
    backend = TransformersBackend(smollm2, device="cpu", batch_size=8)
    cfg = EvolConfig(rounds=1, evolve_sampling={"max_tokens": 64}, response_sampling={"max_tokens": 48},
                     judge_sampling={"temperature": 0.0, "max_tokens": 8})
    seeds = ["Give three tips for staying healthy.", "Explain why the sky looks blue.", "Name a prime number."]
    result = EvolInstruct(backend, cfg).run(seeds)
    assert result.counts["attempts"] == 3 == result.counts["evolved"] + sum(result.reasons.values())
    assert len(result.failures) == sum(result.reasons.values()) and all(f["reason"] for f in result.failures)
    assert len(result.rows) == result.counts["evolved"] and backend.counts["errors"] == 0
    for row in result.rows:
        validate("conversation", row)
