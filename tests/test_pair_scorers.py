"""Completion scorers (synth/score.py, synth/judge.py): a real tiny reward model trained here, rule
verifiers, the LLM judge's parsing, rubric averaging and position-swap cancellation (a scripted judge
backend), provenance, the RunInference handler, and a Beam FnApiRunner run that reconciles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataflywheel.errors import UserError
from dataflywheel.io import read
from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.registry import load_builtins
from dataflywheel.stages import process_batch
from dataflywheel.synth.backends.base import Backend, Sample, Unit
from dataflywheel.synth.judge import Judge, parse_pairwise_verdict, parse_rubric_score
from dataflywheel.synth.score import RewardModelScore, Verify

REPO = Path(__file__).resolve().parents[1]
PREFS = REPO / "dataflywheel" / "data" / "demo" / "prefs.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def completion(i: int, text: str, rejected: str | None = None) -> dict:
    """A completion as the generate stage writes it."""
    return {"index": i, "text": text, "finish_reason": "stop", "tokens": len(text.split()), "seed": i,
            "cached": False, "logprobs": None, "error": None, "rejected": rejected}


def prompt_row(rid: str, question: str, answers: list[str], answer=None, **extra) -> dict:
    row = {"id": rid, "prompt": [{"role": "user", "content": question}],
           "completions": [completion(i, t) for i, t in enumerate(answers)], **extra}
    if answer is not None:
        row["answer"] = answer
    return row


ROWS = [
    prompt_row("q1", "What is 12 + 30?", ["12 + 30 = 42.", "I think it is 40.", "42, maybe."], answer=42),
    prompt_row("q2", "Compute 7 * 6.", ["7 * 6 = 42, so the answer is 42.", "The answer is probably 45."], answer="42"),
    prompt_row("q3", "How much is 90 - 15?", ["90 - 15 = 75.", "75", "I think it is 70.", "70, maybe."], answer=75),
]


# -- reward model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory) -> str:
    """A tiny reward model trained for a few steps by the training stage on the demo pairs."""
    from dataflywheel.train.rm import RmConfig, RmLoop, run

    tmp = tmp_path_factory.mktemp("rm")
    rows = [json.loads(line) for line in PREFS.read_text().splitlines()]
    texts = [m["content"] for r in rows for k in ("prompt", "chosen", "rejected") for m in r[k]]
    base = build_tiny_causal_lm(tmp / "base", texts=texts, hidden=32, layers=2, heads=2, vocab_size=400)
    cfg = RmConfig(model=str(base), data=[str(PREFS)], output=str(tmp / "out"), eval_fraction=0.0, max_length=128,
                   loop=RmLoop(lr=1e-3, batch_size=8, max_steps=6, warmup_ratio=0.0, progress=False))
    return run(cfg)["final"]


def test_rm_scorer_equals_reward_model_score_and_is_batch_invariant(rm_path):
    from dataflywheel.models.reward_model import RewardModel

    stage = RewardModelScore(model=rm_path, device="cpu", forward_batch_size=16)
    scored = stage.score(ROWS)
    direct = RewardModel(rm_path, device="cpu").score(
        [{"prompt": r["prompt"], "completion": c["text"]} for r in ROWS for c in r["completions"]])
    got = [c["scores"]["reward_model"] for r in scored for c in r["completions"]]
    assert got == pytest.approx(direct, abs=1e-6)
    assert len(set(round(g, 6) for g in got)) == len(got)  # a real model, not a constant
    assert all(c["scores"]["reward"] == c["scores"]["reward_model"] for r in scored for c in r["completions"])
    # one row per call and one sequence per forward give the same rewards
    alone = RewardModelScore(model=rm_path, device="cpu", forward_batch_size=1)
    one_by_one = [c["scores"]["reward_model"] for r in ROWS for c in alone.score([r])[0]["completions"]]
    assert one_by_one == pytest.approx(got, abs=1e-5)
    assert ROWS[0]["completions"][0].get("scores") is None  # inputs untouched
    prov = scored[0]["meta"]["scorers"]
    assert prov == [{"name": "reward_model", "kind": "reward_model",
                     "model": {"id": rm_path, "fingerprint": prov[0]["model"]["fingerprint"]},
                     "settings": {"chat_template": None, "score_rejected": False}}]
    assert prov[0]["model"]["fingerprint"].startswith("local-")


def test_rm_scorer_skips_rejected_samples_and_reads_conversation_rows(rm_path):
    row = prompt_row("q", "What is 2 + 2?", ["2 + 2 = 4.", "As an AI I cannot."])
    row["completions"][1]["rejected"] = "refusal"
    conv = {"id": "c", "messages": [{"role": "user", "content": "What is 2 + 2?"},
                                    {"role": "assistant", "content": "2 + 2 = 4."}],
            "completions": [completion(0, "2 + 2 = 4.")]}  # generate with n=1: the prompt became messages
    stage = RewardModelScore(model=rm_path, device="cpu", set_reward=False, field="rm2")
    out = process_batch(stage, [row, conv])
    a, b = out.kept
    assert a["completions"][1]["scores"] == {"rm2": None} and "reward" not in a["completions"][0]["scores"]
    assert a["completions"][0]["scores"]["rm2"] == pytest.approx(b["completions"][0]["scores"]["rm2"], abs=1e-6)
    assert out.stats == {"scored": 2, "skipped_rejected": 1}


def test_rm_runinference_handler_matches_the_stage(rm_path):
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that

    from dataflywheel.pipelines.reward_handler import RewardModelHandler
    from dataflywheel.synth.score import RewardModelConfig

    expected = {r["id"]: r for r in RewardModelScore(model=rm_path, device="cpu").score(ROWS)}

    def check(rows):
        assert sorted(r["id"] for r in rows) == sorted(expected)
        for r in rows:
            assert r["meta"] == expected[r["id"]]["meta"]
            assert [c["scores"]["reward"] for c in r["completions"]] == pytest.approx(
                [c["scores"]["reward"] for c in expected[r["id"]]["completions"]], abs=1e-5)

    handler = RewardModelHandler(RewardModelConfig(model=rm_path, device="cpu"), min_batch_size=2, max_batch_size=2)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        assert_that(p | beam.Create(ROWS) | RunInference(handler), check)


# -- rule verifiers ---------------------------------------------------------------------------------


def test_verify_scores_against_the_answer_field():
    rows = [*ROWS, prompt_row("none", "Say hi.", ["hi"])]  # no answer: unscorable, not wrong
    out = process_batch(Verify(verifier="numeric_match"), rows)
    got = {r["id"]: [c["scores"]["verifier"] for c in r["completions"]] for r in out.kept}
    assert got == {"q1": [1.0, 0.0, 1.0], "q2": [1.0, 0.0], "q3": [1.0, 1.0, 0.0, 0.0], "none": [None]}
    assert out.stats == {"scored": 9, "unscorable": 1}
    prov = out.kept[0]["meta"]["scorers"][0]
    assert prov["kind"] == "verifier" and prov["model"]["id"] == "numeric_match"
    assert prov["model"]["fingerprint"].startswith("src-")
    fmt = Verify(verifier="regex_match", options={"pattern": r"^\d+ [-+*] \d+ = \d+"}, field="format", set_reward=False)
    marks = [c["scores"] for c in fmt.score(ROWS)[2]["completions"]]
    assert marks == [{"format": 1.0}, {"format": 0.0}, {"format": 0.0}, {"format": 0.0}]


def test_verify_user_function_and_bad_names(tmp_path):
    (tmp_path / "my_check.py").write_text("def short(completion, answer, max_words=3):\n"
                                          "    return float(len(completion.split()) <= max_words)\n")
    stage = Verify(verifier=f"{tmp_path / 'my_check.py'}:short", options={"max_words": 2}, answer_field="id")
    assert [c["scores"]["reward"] for c in stage.score(ROWS)[0]["completions"]] == [0.0, 0.0, 1.0]
    bad = prompt_row("bad", "What is 1 + 1?", ["2"], answer="two or three")  # a reference that is not a number
    for batch in ([ROWS[0], bad], [bad]):  # the same outcome whatever else shares the batch
        out = process_batch(Verify(verifier="numeric_match"), batch)
        got = out.kept[-1]["completions"][0]
        assert got["scores"]["verifier"] is None and "holds 0 numbers" in got["verifier_error"]
        assert out.stats["verifier_errors"] == 1 and not out.dead
    with pytest.raises(UserError, match="unknown verifier"):
        Verify(verifier="nope")
    with pytest.raises(UserError, match="bad options"):
        Verify(verifier="numeric_match", options={"tolerance": 1})


# -- judge parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, score", [
    ("The response is relevant and correct.\nScore: 4", 4),
    ("Score: 5", 5),
    ("score:3", 3),
    ("**Score: 4**", 4),
    ("**Score:** 2", 2),
    ("Justification...\n\nScore: 4/5", 4),
    ("Score: 3 out of 5", 3),
    ("Total score: 1 point", 1),
    ("Final Score - 4", 4),
    ("### Score: 0", 0),
    ("Score: 4.0", 4),
    ("Score: four", 4),
    ("Score\uff1a 3", 3),  # a fullwidth colon
    ("It earns the first point (score 1) and the second.\nScore: 2", 2),  # the concluding line wins
    ("Score: 3\n(One could argue the score is 2.)", 3),  # an aside after it does not
    ("I would say the score is 3.", 3),  # no concluding line: the last mention
    ("Conclude with the score using the format: \"Score: <total points>\"", None),  # the template echoed
    ("Score: 7", None),
    ("Score: 8/10", None),
    ("Score: 3.5", None),
    ("Score: -1", None),
    ("This answer deserves 4 points.", None),
    ("", None),
    ("Score: <total points>\nScore: 5", 5),
])
def test_parse_rubric_score(reply, score):
    assert parse_rubric_score(reply) == score


@pytest.mark.parametrize("reply, verdict", [
    ("Assistant A explains the steps. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equally good. [[C]]", "tie"),
    ("[[tie]]", "tie"),
    ("[[ b ]]", "B"),
    ('Output "[[A]]" if A is better... After comparing: [[B]]', "B"),  # the last verdict closes the reply
    ("A is better.", None),
    ("[A]", None),
    ("[[D]]", None),
])
def test_parse_pairwise_verdict(reply, verdict):
    assert parse_pairwise_verdict(reply) == verdict


# -- judge through a scripted backend ---------------------------------------------------------------


class ScriptedJudgeBackendForTests(Backend):
    """Stands in for an LLM judge that cannot run here: ``reply(unit)`` makes each sample's text from
    the rendered judge prompt and the sample's seed. Records every unit it was asked for."""

    name = "scripted"

    def __init__(self, reply, cache=None):
        super().__init__("scripted-judge", revision="v1", cache=cache)
        self.reply = reply
        self.seen: list[Unit] = []

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        self.seen.extend(todo)
        return [Sample(self.reply(u), "stop", tokens=3) for u in todo]


def answers_in(unit: Unit) -> tuple[str, str]:
    text = unit.request.messages[-1]["content"]
    a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
    b = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
    return a, b


def judge(reply, cache=None, **kw) -> Judge:
    stage = Judge(backend={"model": "unused"}, **kw)
    stage.backend = ScriptedJudgeBackendForTests(reply, cache)
    return stage


def test_position_swap_cancels_a_judge_that_always_prefers_the_first_answer():
    stage = judge(lambda u: "A reads better. [[A]]", mode="pairwise", samples=2)
    out = process_batch(stage, ROWS)
    for row in out.kept:
        assert [c["scores"]["judge"] for c in row["completions"]] == [0.5] * len(row["completions"])
    n_ordered = sum(len(r["completions"]) * (len(r["completions"]) - 1) for r in ROWS)
    assert len(stage.backend.seen) == 2 * n_ordered  # every ordered pair, both orders, 2 samples each
    assert out.stats["judge_samples"] == 2 * n_ordered and "judge_unparsable" not in out.stats
    first = out.kept[0]["completions"][0]["judge"]
    assert first["mode"] == "pairwise" and first["games"] == 8 and first["wins"] == 4.0
    assert [g["vs"] for g in first["comparisons"]] == [1, 2] and first["comparisons"][0]["parsed"] == ["A", "A"]


def test_pairwise_ranks_by_content_whatever_the_position():
    def longer(u):  # prefers the longer answer, wherever it is shown
        a, b = answers_in(u)
        return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"

    for pairing in ("round_robin", "pivot"):
        row = judge(longer, mode="pairwise", samples=1, pairing=pairing).score([ROWS[2]])[0]
        scores = [c["scores"]["reward"] for c in row["completions"]]
        lengths = [len(c["text"]) for c in row["completions"]]
        assert sorted(range(4), key=lambda k: scores[k]) == sorted(range(4), key=lambda k: lengths[k])
    stage = judge(longer, mode="pairwise", samples=1, pairing="pivot")
    stage.score([ROWS[2]])
    assert len(stage.backend.seen) == 2 * 3  # each vs the pivot, both orders
    lone = prompt_row("lone", "Say hi.", ["hi", "hello"])
    lone["completions"][1]["rejected"] = "empty_output"  # one usable completion: no one to play
    out = process_batch(judge(longer, mode="pairwise"), [lone])
    assert [c["scores"]["judge"] for c in out.kept[0]["completions"]] == [None, None]
    assert out.stats == {"unscorable": 1, "skipped_rejected": 1}


def test_rubric_averages_judge_samples_and_counts_unparsable():
    replies = iter(["Relevant.\nScore: 4", "Score: 5", "Score: 3",  # q1 #0 -> 4.0
                    "Score: 2", "no idea", "Score: 9",  # q1 #1 -> 2.0, two unparsable
                    "nothing", "nothing", "nothing"])  # q1 #2 -> None
    stage = judge(lambda u: next(replies), samples=3)
    out = process_batch(stage, ROWS[:1])
    row = out.kept[0]
    assert [c["scores"]["judge"] for c in row["completions"]] == [4.0, 2.0, None]
    assert row["completions"][1]["judge"]["parsed"] == [2, None, None]
    assert out.stats == {"scored": 2, "unscorable": 1, "judge_samples": 9, "judge_unparsable": 5,
                         "judge_cache_misses": 9}
    seeds = [u.seed for u in stage.backend.seen]
    assert len(set(seeds)) == 9  # a seed per judge sample
    prompt = stage.backend.seen[0].request.messages[0]["content"]
    assert prompt.startswith("Review the user's question") and "User: What is 12 + 30?" in prompt
    assert "<response>12 + 30 = 42.</response>" in prompt and prompt.rstrip().endswith("outlined criteria.")
    prov = row["meta"]["scorers"][0]
    assert prov["kind"] == "judge" and prov["model"] == {"id": "scripted-judge", "fingerprint": "v1"}
    assert prov["settings"]["samples"] == 3 and prov["settings"]["template"] == "self_rewarding_judge.jinja"


def test_judge_rerun_replays_from_the_generation_cache(tmp_path):
    from dataflywheel.synth.cache import GenerationCache

    cache = GenerationCache(tmp_path / "judge.sqlite")
    first = process_batch(judge(lambda u: f"Score: {u.seed % 6}", cache=cache), ROWS)
    again_stage = judge(lambda u: "Score: 0", cache=cache)  # would score differently if it were asked
    again = process_batch(again_stage, ROWS)
    assert again_stage.backend.seen == []
    assert again.stats["judge_cache_hits"] == first.stats["judge_cache_misses"] == 27
    assert [c["scores"] for r in again.kept for c in r["completions"]] == \
        [c["scores"] for r in first.kept for c in r["completions"]]


def test_judge_sampling_overrides_keep_the_other_defaults():
    with pytest.raises(ValueError, match="samples"):
        Judge(backend={"model": "m"}, sampling={"n": 3})
    sampling = Judge(backend={"model": "m"}, sampling={"max_tokens": 64}).config.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (64, 0.7, 0.9, 0)


# -- provenance and the Beam run --------------------------------------------------------------------


def test_scorers_are_registered_and_stack_provenance(rm_path):
    stages = load_builtins()
    assert {"reward_model", "judge", "verify"} <= set(stages)
    rows = RewardModelScore(model=rm_path, device="cpu").score(ROWS)
    rows = Verify(verifier="numeric_match", set_reward=False).score(rows)
    rows = Verify(verifier="numeric_match", set_reward=False).score(rows)  # a re-run replaces its entry
    assert [s["name"] for s in rows[0]["meta"]["scorers"]] == ["reward_model", "verify"]
    c = rows[0]["completions"][0]
    assert set(c["scores"]) == {"reward_model", "verifier", "reward"} and c["scores"]["reward"] == c["scores"][
        "reward_model"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    # 2,048 positions: the rubric prompt is several hundred tokens with this tokenizer
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "lm", max_positions=2048))


def test_beam_run_generate_then_score_reconciles_and_equals_plain(tmp_path, rm_path, tiny_lm):
    inputs = tmp_path / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"What is {i} + {i}?", "answer": 2 * i}) + "\n"
                              for i in range(4)))
    stages = [
        {"stage": "generate", "batch_size": 3, "reject_overlong": False,
         "backend": {"model": tiny_lm, "options": {"device": "cpu"}},
         "sampling": {"n": 3, "temperature": 1.0, "max_tokens": 6, "seed": 1}},
        {"stage": "reward_model", "model": rm_path, "device": "cpu", "batch_size": 2},
        {"stage": "verify", "verifier": "numeric_match", "set_reward": False},
        {"stage": "judge", "batch_size": 2, "samples": 2, "set_reward": False,
         "backend": {"model": tiny_lm, "options": {"device": "cpu"}}, "sampling": {"max_tokens": 4, "seed": 5}},
    ]
    results = {}
    for engine in ("local", "plain"):
        cfg = {"name": "score", "runner": {"engine": engine}, "input": {"paths": str(inputs), "kind": "prompt"},
               "stages": stages, "output": {"path": str(tmp_path / engine), "format": "jsonl"}}
        parsed = parse_config(cfg, "<test>")
        report = run_job(parsed.jobs[0], parsed.runner)
        report.check()
        by = {s.stage: s for s in report.stages}
        assert by["reward_model"].rows_in == by["judge"].rows_in == by["judge"].kept == 4
        judged = by["judge"].stats
        assert judged["judge_samples"] == 2 * (judged.get("scored", 0) + judged.get("unscorable", 0))
        assert judged["judge_samples"] == 2 * by["reward_model"].stats["scored"] > 0
        results[engine] = {r["id"]: r for r in read(str(tmp_path / engine))}
    beam, plain = results["local"], results["plain"]
    assert sorted(beam) == [f"p{i}" for i in range(4)]
    for rid, row in beam.items():
        assert [s["name"] for s in row["meta"]["scorers"]] == ["reward_model", "verify", "judge"]
        for c, p in zip(row["completions"], plain[rid]["completions"]):
            assert c["text"] == p["text"] and c["judge"]["texts"] == p["judge"]["texts"]
            assert c["scores"]["reward"] == pytest.approx(p["scores"]["reward"], abs=1e-5)
            assert c["scores"]["reward"] == c["scores"]["reward_model"]
            assert c["scores"]["verifier"] == p["scores"]["verifier"]
