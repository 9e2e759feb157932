"""The perplexity stage, the score_band step, and the RunInference handler, on a real tiny Llama built
locally (nothing downloads), in the plain loop and on Beam's FnApiRunner."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from pydantic import ValidationError

pytest.importorskip("torch")

from dataflywheel.errors import UserError  # noqa: E402
from dataflywheel.filters.perplexity import Perplexity, ScoreBand  # noqa: E402
from dataflywheel.models.lm_score import token_nll  # noqa: E402
from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_causal_lm  # noqa: E402
from dataflywheel.registry import stage_class  # noqa: E402
from dataflywheel.stages import process_batch, process_group  # noqa: E402

MAX_LEN = 40
DOCS = [
    {"id": "a", "text": "Water boils at 100 degrees Celsius at sea level."},
    {"id": "b", "text": "The quick brown fox jumps over the lazy dog. " * 6},  # over MAX_LEN tokens
    {"id": "c", "text": ""},
    {"id": "d", "text": "Explain why the sky looks blue during the day."},
    {"id": "e", "text": "zq xv 9 ;; ## ~~ kw"},
    {"id": "f", "messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("llama"), arch="llama", max_positions=64))


def stage(model_dir, **kw) -> Perplexity:
    s = Perplexity(model=model_dir, max_length=MAX_LEN, device="cpu", **kw)
    s.setup()
    return s


def test_registered_and_model_required(model_dir):
    assert stage_class("perplexity") is Perplexity and stage_class("score_band") is ScoreBand
    with pytest.raises(ValidationError, match="model"):
        Perplexity()
    with pytest.raises(ValidationError):
        Perplexity(model=model_dir, devic="cpu")  # unknown keys are errors


def test_scores_match_the_core_and_empty_text_is_rejected(model_dir):
    out = process_batch(stage(model_dir), DOCS)
    assert [r["id"] for r in out.rejected] == ["c"] and out.rejected[0]["rejected"]["reason"] == "no_tokens"
    assert [r["id"] for r in out.kept] == ["a", "b", "d", "e", "f"]
    assert out.stats == {"truncated": 1}
    model, tok = load_causal_lm(model_dir)
    texts = [d["text"] if "text" in d else "Say hello.\nHello!" for d in DOCS if d["id"] != "c"]
    for row, ref in zip(out.kept, token_nll(model, tok, texts, max_length=MAX_LEN), strict=True):
        s = row["scores"]
        assert s["ppl_tokens"] == ref.tokens and s["ppl_truncated"] == int(ref.truncated)
        assert s["nll"] == pytest.approx(ref.mean, abs=1e-5) and s["ppl"] == pytest.approx(math.exp(s["nll"]))
    assert next(r for r in out.kept if r["id"] == "b")["scores"]["ppl_truncated"] == 1
    empty = out.rejected[0]["scores"]
    assert empty == {"ppl_tokens": 0, "ppl_truncated": 0}  # no ppl at all rather than NaN
    assert all(math.isfinite(v) for r in out.kept for v in r["scores"].values())


def test_thresholds_reapply_to_stored_scores_without_the_model(model_dir):
    scored = process_batch(stage(model_dir), DOCS).kept
    ppls = sorted(r["scores"]["ppl"] for r in scored)
    low, high = (ppls[0] + ppls[1]) / 2, (ppls[-2] + ppls[-1]) / 2
    # a fresh stage that never ran setup(): keep() reads stored scores only
    rethreshold = Perplexity(model="unused", min_ppl=low, max_ppl=high, reject_truncated=True)
    decisions = {r["id"]: rethreshold.keep(r) for r in scored}
    reasons = sorted(reason for ok, reason in decisions.values() if not ok)
    by_ppl = {r["id"]: r["scores"]["ppl"] for r in scored}
    expected = sorted(
        "truncated" if rid == "b" else "ppl_low" if p < low else "ppl_high" for rid, p in by_ppl.items()
        if rid == "b" or not low <= p <= high
    )
    assert reasons == expected and len(reasons) >= 2


def test_conversation_parts_and_prefixed_score_names(model_dir):
    chat = DOCS[-1]
    [resp] = process_batch(stage(model_dir, part="response", scores_prefix="response_"), [chat]).kept
    [prompt] = process_batch(stage(model_dir, part="prompt", scores_prefix="prompt_"), [resp]).kept
    model, tok = load_causal_lm(model_dir)
    ref_resp, ref_prompt = token_nll(model, tok, ["Hello!", "Say hello."], max_length=MAX_LEN)
    assert prompt["scores"]["response_nll"] == pytest.approx(ref_resp.mean, abs=1e-5)
    assert prompt["scores"]["prompt_nll"] == pytest.approx(ref_prompt.mean, abs=1e-5)
    out = process_batch(stage(model_dir, part="response"), [DOCS[0], chat])  # a document has no response
    assert [r["id"] for r in out.kept] == ["f"]
    assert out.dead[0]["record"]["id"] == "a" and "assistant turn" in out.dead[0]["detail"]


def test_window_mode_scores_all_tokens(model_dir):
    [row] = process_batch(stage(model_dir, long_text="window", stride=16), [DOCS[1]]).kept
    _, tok = load_causal_lm(model_dir)
    assert row["scores"]["ppl_truncated"] == 0
    assert row["scores"]["ppl_tokens"] == len(tok(DOCS[1]["text"], add_special_tokens=False)["input_ids"])


def test_max_length_beyond_the_model_context_is_refused(model_dir):
    with pytest.raises(UserError, match="exceeds the context"):
        Perplexity(model=model_dir, max_length=65, device="cpu").setup()


# --- score_band ------------------------------------------------------------------------------


def band_rows(values):
    return [{"id": f"r{i}", "scores": {"ppl": v}} for i, v in enumerate(values)]


def decide(step: ScoreBand, rows):
    out = process_group(step, rows)
    assert out.rows_in == len(rows) and not out.dead
    return {r["id"] for r in out.kept}, {r["id"]: r["rejected"]["reason"] for r in out.rejected}


def test_band_keeps_exact_numpy_percentiles_in_any_order():
    rng = random.Random(3)
    values = [rng.uniform(1, 500) for _ in range(101)]
    rows = band_rows(values)
    step = ScoreBand(field="ppl", lower_pct=25, upper_pct=75)
    lo, hi = np.percentile(values, [25, 75])
    kept, rejected = decide(step, rows)
    assert kept == {r["id"] for r, v in zip(rows, values) if lo <= v <= hi} and len(kept) == 51
    assert set(rejected.values()) == {"below_band", "above_band"}
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert decide(step, shuffled) == (kept, rejected)


def test_band_ties_missing_scores_and_absolute_bounds():
    rows = band_rows([1.0, 2.0, 2.0, 2.0, 3.0]) + [{"id": "none"}, {"id": "nan", "scores": {"ppl": float("nan")}},
                                                   {"id": "str", "scores": {"ppl": "high"}}]
    kept, rejected = decide(ScoreBand(field="ppl", lower_pct=40, upper_pct=60), rows)
    assert kept == {"r1", "r2", "r3"}  # the 40th..60th percentiles are all 2.0: every tie is kept
    assert rejected == {"r0": "below_band", "r4": "above_band", "none": "missing_score",
                        "nan": "missing_score", "str": "missing_score"}
    kept, _ = decide(ScoreBand(field="ppl", upper_pct=100, min_value=1.5, max_value=2.5), rows)
    assert kept == {"r1", "r2", "r3"}
    kept, rejected = decide(ScoreBand(field="ppl", lower_pct=10), [{"id": "x"}])
    assert not kept and rejected == {"x": "missing_score"}


def test_band_config_is_checked():
    with pytest.raises(ValidationError, match="at least one"):
        ScoreBand(field="ppl")
    with pytest.raises(ValidationError, match="lower_pct"):
        ScoreBand(field="ppl", lower_pct=80, upper_pct=20)
    with pytest.raises(ValidationError):
        ScoreBand(field="ppl", upper_pct=101)


# --- Beam --------------------------------------------------------------------------------------


@pytest.mark.parametrize("large_model", [False, True])
def test_run_inference_handler_equals_the_stage(model_dir, large_model):
    """The real RunInference transform on the FnApiRunner, keyed by row id, against the stage's scores.
    large_model: Beam holds the model in a shared process and the handler reaches it through a proxy."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.testing.util import assert_that

    from dataflywheel.pipelines.inference import CausalLMScoreHandler
    from dataflywheel.runner import RunnerConfig, make_pipeline

    docs = [d for d in DOCS if "text" in d]
    expected = {r["id"]: r["scores"] for r in process_batch(stage(model_dir), docs).kept}
    expected["c"] = {"ppl_tokens": 0, "ppl_truncated": 0}
    handler = CausalLMScoreHandler(model_dir, max_length=MAX_LEN, forward_batch_size=2, device="cpu",
                                   min_batch_size=2, max_batch_size=3, large_model=large_model)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 3}
    assert handler.share_model_across_processes() == large_model
    with pytest.raises(ValueError, match="inference_args"):
        handler.validate_inference_args({"temperature": 1.0})

    def check(results):
        got = {rid: pred.inference for rid, pred in results}
        assert set(got) == set(expected)
        for rid, scores in got.items():
            assert {k: scores[k] for k in ("ppl_tokens", "ppl_truncated")} == \
                {k: expected[rid][k] for k in ("ppl_tokens", "ppl_truncated")}, rid
            for key in ("nll", "ppl"):
                assert (key in scores) == (key in expected[rid])
                if key in scores:
                    assert scores[key] == pytest.approx(expected[rid][key], rel=1e-5), rid

    with make_pipeline(RunnerConfig(engine="local")) as p:
        results = (p | beam.Create([(d["id"], d["text"]) for d in docs])
                   | RunInference(KeyedModelHandler(handler)))
        assert_that(results, check)


def test_perplexity_and_band_as_a_beam_job_equal_the_plain_loop(model_dir, tmp_path):
    from dataflywheel.io import read
    from dataflywheel.pipelines.config import parse_config
    from dataflywheel.pipelines.job import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    texts = [d["text"] for d in DOCS if d.get("text")] + [f"Row {i}: the train left the station at {i}." for i in range(10)]
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": f"t{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts)))
    stages = [{"stage": "perplexity", "model": model_dir, "max_length": MAX_LEN, "device": "cpu", "batch_size": 4},
              {"stage": "score_band", "field": "ppl", "lower_pct": 10, "upper_pct": 90}]
    kept = {}
    for engine in ("plain", "local"):
        cfg = {"name": "ppl", "runner": {"engine": engine}, "stages": stages,
               "input": {"paths": str(folder / "*.jsonl"), "kind": "document", "batch_rows": 5},
               "output": {"path": str(tmp_path / engine), "format": "jsonl"}}
        parsed = parse_config(cfg, "<test>")
        report = run_job(parsed.jobs[0], parsed.runner)
        by = {s.stage: s for s in report.stages}
        assert by["perplexity"].rows_in == 14 and by["perplexity"].kept == 14  # (empty texts stop at read)
        assert by["score_band"].rejected == {"below_band": 2, "above_band": 2}  # 10th / 90th of 14 values
        kept[engine] = sorted(r["id"] for r in read(str(tmp_path / engine)))
    assert kept["plain"] == kept["local"] and len(kept["plain"]) == 10
