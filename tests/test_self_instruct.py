"""Self-Instruct over a scripted backend: prompts and demo composition, parsing, post-filters,
novelty rejection, classification, instances and their filters, rows; one smoke run on a real
in-process transformers model."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from dataflywheel.records import check_messages, validate
from dataflywheel.synth.backends.base import Backend, Sample, Unit
from dataflywheel.synth.self_instruct import (
    BOOTSTRAP_STOP,
    MachineTask,
    SelfInstruct,
    SelfInstructConfig,
    encode_prompt,
    filter_instances,
    load_seed_tasks,
    parse_classification_instances,
    parse_generation_instances,
    split_instructions,
)

DEMO_SEEDS = Path(__file__).resolve().parents[1] / "dataflywheel" / "data" / "demo" / "seed_tasks.jsonl"
# Rejected at the candidate level (the rest are whole responses or instances).
CANDIDATE_REASONS = {"empty", "too_short", "too_long", "blacklisted_word", "write_a_program",
                     "starts_with_punctuation", "starts_with_non_ascii", "too_similar"}


class ScriptedBackendForTests(Backend):
    """Answers each unit with ``script(unit)``: a text, or (text, finish_reason); records prompts."""

    name = "scripted"

    def __init__(self, script: Callable[[Unit], str | tuple[str, str]]):
        super().__init__("scripted-model")
        self.script = script
        self.seen: list[Unit] = []

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        out = []
        for unit in todo:
            self.seen.append(unit)
            got = self.script(unit)
            text, reason = got if isinstance(got, tuple) else (got, "stop")
            out.append(Sample(text=text, finish_reason=reason, tokens=len(text.split()),
                              error="scripted failure" if reason == "error" else None))
        return out


def prompt_of(unit: Unit) -> str:
    r = unit.request
    return r.prompt if r.prompt is not None else r.messages[-1]["content"]


def kind(unit: Unit) -> str:
    return unit.request.id.split("/")[1]  # self_instruct/<bootstrap|classify|instances>/...


def numbered(prompt: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", prompt, flags=re.MULTILINE)


@pytest.fixture
def seeds() -> list[dict]:
    return load_seed_tasks(DEMO_SEEDS)


def test_demo_seed_file_is_in_the_reference_format(seeds):
    assert len(seeds) >= 8
    assert {True, False} <= {t["is_classification"] for t in seeds}
    for t in seeds:
        assert {"id", "name", "instruction", "instances", "is_classification"} <= t.keys()
        assert t["instances"] and all({"input", "output"} <= i.keys() for i in t["instances"])


def test_shared_seed_tasks_load(shared_data):
    tasks = load_seed_tasks(shared_data / "self_instruct_seed" / "seed_tasks.jsonl")
    assert len(tasks) == 175 and sum(t["is_classification"] for t in tasks) > 0


def test_encode_prompt_is_the_reference_format():
    assert encode_prompt(["Do  this:", "Then\nthat"]) == "Come up with a series of tasks:\n1. Do this\n2. Then that\n3."
    assert encode_prompt(["A b c d"], classification=True).startswith("Come up with a series of classification tasks.")


def test_split_follows_the_reference():
    text = " make a list of fruits.\n10. write a program to add numbers\n11 . Give me tips for sleeping\n12. "
    assert split_instructions(text) == ["Make a list of fruits.", "Write a program to add numbers",
                                        "Give me tips for sleeping", ""]
    assert split_instructions("9. Name a fruit that is red.\n10. Other one", chat=True)[0] == "Name a fruit that is red."


GOOD = ["Suggest a name for a new coffee shop near a university campus.",
        "Tell me three facts about the moon that children would enjoy.",
        "Explain how a bicycle gear system works in simple terms.",
        "Give an example of a healthy breakfast for a busy morning.",
        "Describe the smell of rain to someone who has never experienced it."]


def bootstrap_text(items: list[str]) -> str:
    """What a completion model writes after the open "9.": item 9's text, then items 10, 11, ..."""
    return " " + "\n".join(f"{n}. {t}" if n > 9 else t for n, t in enumerate(items, 9))


def test_post_filters_and_reasons(seeds):
    bad = ["Short one here",  # 3 words: too short
           "Tell " + "very " * 150 + "long",  # > 150 words
           "Draw a cat sitting on a warm windowsill.",  # blacklist "draw"
           "Describe the picture of the village in the input.",  # blacklist "picture"
           "Go to the website and find the opening hours.",  # blacklist "go to"
           "write a program that adds two numbers together",  # capitalized, then "Write a program"
           "(Optional) Summarize the article in three sentences.",  # punctuation
           "Érivez une phrase sur la mer et le soleil.",  # non-ASCII
           "Decide whether the restaurant review is positive or negative.",  # a seed verbatim: ROUGE-L 1
           GOOD[0]]  # a copy of an earlier candidate of the same response: too similar
    responses = iter([(bootstrap_text(GOOD[:2] + bad), "stop"), ("9. cut off in the midd", "length"),
                      ("", "error"), (bootstrap_text(GOOD[2:]), "stop")])
    backend = ScriptedBackendForTests(lambda u: next(responses, (bootstrap_text(["Name it"]), "stop")))
    cfg = SelfInstructConfig(num_instructions=5, request_batch_size=4, max_requests=4)
    si = SelfInstruct(backend, seeds, cfg)
    tasks = si.bootstrap()
    assert [t.instruction for t in tasks] == [g[0] + g[1:].lower() for g in GOOD]  # .capitalize()
    r = si.rejections
    assert r["too_short"] == 1 and r["too_long"] == 1 and r["blacklisted_word"] == 3
    assert r["write_a_program"] == 1 and r["starts_with_punctuation"] == 1 and r["starts_with_non_ascii"] == 1
    assert r["too_similar"] == 2 and r["truncated"] == 1 and r["backend_error"] == 1
    assert {d["detail"] for d in si.rejected if d["reason"] == "blacklisted_word"} == {"draw", "picture", "go to"}
    c = si.counts
    assert c["requests"] == 4 and c["accepted"] == 5
    assert c["candidates"] == c["accepted"] + sum(v for k, v in r.items() if k in CANDIDATE_REASONS)
    # the sampling the reference uses, one seed per request
    s = backend.seen[0].request.sampling
    assert (s.temperature, s.top_p, s.presence_penalty, s.max_tokens, s.stop) == (0.7, 0.5, 2.0, 1024, BOOTSTRAP_STOP)
    assert len({u.request.sampling.seed for u in backend.seen}) == 4
    # the nearest entries and mean similarity stored with each task
    assert len(tasks[0].most_similar) == 10 and 0 < tasks[0].avg_similarity_score < 1


def test_demo_composition_six_plus_two(seeds):
    seed_set = {t["instruction"] for t in seeds}
    rng = random.Random(0)
    words = "river candle orbit pepper violin glacier harbor lantern meadow puzzle tunnel falcon".split()

    def novel(_unit: Unit) -> str:  # two instructions of random words: far from each other and the seeds
        return bootstrap_text([" ".join(["Describe"] + rng.sample(words, 5)) for _ in range(2)])

    backend = ScriptedBackendForTests(novel)
    si = SelfInstruct(backend, seeds, SelfInstructConfig(num_instructions=12, request_batch_size=2))
    si.bootstrap()
    prompts = [prompt_of(u) for u in backend.seen]
    first = numbered(prompts[0])
    assert len(first) == 8 and set(first) <= seed_set and prompts[0].endswith("\n9.")  # empty pool: 8 seeds
    later = numbered(prompts[-1])
    machine = [d for d in later if d not in seed_set]
    assert len(later) == 8 and len(machine) == 2 and len(set(later) - set(machine)) == 6
    assert {t.instruction for t in si.tasks} >= set(machine)


def test_classification_only_variant(seeds):
    backend = ScriptedBackendForTests(lambda u: bootstrap_text(GOOD))
    si = SelfInstruct(backend, seeds, SelfInstructConfig(num_instructions=1, request_batch_size=1,
                                                         classification_only=True))
    si.bootstrap()
    prompt = prompt_of(backend.seen[0])
    clf = {t["instruction"] for t in seeds if t["is_classification"]}
    assert prompt.startswith("Come up with a series of classification tasks.")
    assert set(numbered(prompt)) == clf  # fewer clf seeds than 8: all of them


def test_instance_parsing_follows_prepare_for_finetuning():
    raw = "Example 1\nInput: 2, 7, 1\nOutput: 1, 2, 7\nExample 2\nList: 9, 3\nOutput 2: 3, 9\nInput: extra"
    assert parse_generation_instances(raw) == [("2, 7, 1", "1, 2, 7"), ("List: 9, 3", "3, 9")]
    assert parse_generation_instances("Output: Paris is the capital.") == [("", "Paris is the capital.")]
    assert parse_generation_instances("no structure at all") == []
    clf = "Class label: Positive\nReview: Great food.\nClass label: Negative\nReview: Cold soup.\nClass label: Maybe"
    assert parse_classification_instances(clf) == [("Review: Great food.", "Positive"),
                                                   ("Review: Cold soup.", "Negative"), ("", "Maybe")]
    assert parse_classification_instances("Label: x") == []


def test_finetuning_filters():
    kept, dropped = filter_instances([("a", "a"), ("b", ""), ("c:", "x"), ("d", "y:"), ("e", "1"), ("e", "1"),
                                      ("", "z"), ("f", "cut")], truncated=True)
    assert kept == [("e", "1"), ("", "z")]
    assert [r for r, _ in dropped] == ["instance_truncated", "instance_input_equals_output", "instance_empty_output",
                                       "instance_ends_with_colon", "instance_ends_with_colon", "instance_duplicate"]
    kept, dropped = filter_instances([("q", "1"), ("q", "2"), ("r", "3")], truncated=False)
    assert kept == [] and [r for r, _ in dropped] == ["instance_conflicting_outputs"] * 3
    kept, _ = filter_instances([("", "1"), ("", "2")], truncated=False)  # empty inputs never conflict
    assert kept == [("", "1"), ("", "2")]


def full_script(unit: Unit) -> str | tuple[str, str]:
    prompt = prompt_of(unit)
    if kind(unit) == "bootstrap":
        return bootstrap_text(["Decide if the tweet is sarcastic or sincere.", "Give three tips for saving water at home.",
                               "Explain what a leap year is to a child."])
    instruction = re.findall(r"Task: (.*)\n", prompt)[-1] if kind(unit) == "instances" else prompt
    if kind(unit) == "classify":
        return " Yes" if "sarcastic" in instruction else " No"
    if "sarcastic" in instruction:
        return "Class label: Sarcastic\nTweet: Great, another Monday.\nClass label: Sincere\nTweet: Thanks for the help!"
    if "water" in instruction:
        return "Output:\n- Fix leaking taps\n- Take shorter showers\n- Water plants in the evening"
    examples = "".join(f"Example {i}\nQuestion: year {2000 + i}?\nOutput: answer {i}\n" for i in range(1, 8))
    return examples, "length"  # 7 examples, truncated: the last dropped, then 5 of 6 kept


def test_run_end_to_end_rows(seeds):
    backend = ScriptedBackendForTests(full_script)
    result = SelfInstruct(backend, seeds, SelfInstructConfig(num_instructions=3, request_batch_size=1)).run()
    by_instruction = {t.instruction: t for t in result.tasks}
    assert len(result.tasks) == 3
    assert by_instruction["Decide if the tweet is sarcastic or sincere."].is_classification is True
    clf_prompt = next(prompt_of(u) for u in backend.seen if kind(u) == "instances" and "sarcastic" in prompt_of(u))
    assert clf_prompt.startswith("Given the classification task definition") and clf_prompt.endswith("sincere.\n")
    clf_unit = next(u for u in backend.seen if kind(u) == "classify")
    assert prompt_of(clf_unit).endswith("\nIs it classification?") and clf_unit.request.sampling.max_tokens == 3
    inst_units = [u for u in backend.seen if kind(u) == "instances"]
    assert {u.request.sampling.max_tokens for u in inst_units} == {300, 350}
    assert all(u.request.sampling.stop == ("Example 6", "Task:") for u in inst_units)
    assert result.rejections["instance_truncated"] == 1 and result.rejections["instance_over_limit"] == 1
    assert len(result.prompt_rows) == 3 and len(result.instance_rows) == 2 + 1 + 5
    for row in result.prompt_rows:
        check_messages(row["messages"], final_assistant=False)
        assert row["meta"]["synth"] == {"method": "self_instruct", "round": 1, "parent_id": None, "operation": "bootstrap"}
    for row in result.instance_rows:
        validate("conversation", row)
        assert row["meta"]["synth"]["operation"] == "instances" and row["meta"]["synth"]["parent_id"] is None
    sarcastic = [r for r in result.instance_rows if "sarcastic" in r["messages"][0]["content"]]
    assert sarcastic[0]["messages"][0]["content"] == "Decide if the tweet is sarcastic or sincere.\n\nTweet: Great, another Monday."
    assert sarcastic[0]["messages"][1]["content"] == "Sarcastic"
    # deterministic: the same config sends the same requests, so a cache replays every one of them
    again = ScriptedBackendForTests(full_script)
    SelfInstruct(again, seeds, SelfInstructConfig(num_instructions=3, request_batch_size=1)).run()
    assert [(u.request, u.seed) for u in again.seen] == [(u.request, u.seed) for u in backend.seen]


class DictCache:
    """The SampleCache protocol of backends/base.py, in memory."""

    def __init__(self):
        self.store: dict = {}

    def get_many(self, keys):
        return {k: self.store[k] for k in keys if k in self.store}

    def put_many(self, items):
        self.store.update(items)


def test_rerun_with_a_cache_generates_nothing(seeds):
    cache = DictCache()
    first = ScriptedBackendForTests(full_script)
    first.cache = cache
    rows = SelfInstruct(first, seeds, SelfInstructConfig(num_instructions=3, request_batch_size=1)).run().instance_rows
    second = ScriptedBackendForTests(full_script)
    second.cache = cache
    again = SelfInstruct(second, seeds, SelfInstructConfig(num_instructions=3, request_batch_size=1)).run().instance_rows
    assert second.seen == [] and second.counts["cache_misses"] == 0 and second.counts["cache_hits"] > 0
    assert again == rows


def test_unusable_model_stops_at_max_requests(seeds):
    backend = ScriptedBackendForTests(lambda u: " ok\n10. !!\n11. Draw a map of the town")
    si = SelfInstruct(backend, seeds, SelfInstructConfig(num_instructions=3, max_requests=7, request_batch_size=5))
    result = si.run()
    assert len(backend.seen) == 7 and result.tasks == [] and result.instance_rows == []
    assert result.rejections == {"too_short": 14, "blacklisted_word": 7}


def test_chat_mode_sends_messages(seeds):
    backend = ScriptedBackendForTests(lambda u: "9. " + GOOD[0])
    si = SelfInstruct(backend, seeds, SelfInstructConfig(num_instructions=1, request_batch_size=1, chat=True))
    assert [t.instruction for t in si.bootstrap()] == [GOOD[0][0] + GOOD[0][1:].lower()]
    assert backend.seen[0].request.messages[0]["role"] == "user"


def test_smoke_with_in_process_transformers(tmp_path, seeds, monkeypatch):
    pytest.importorskip("dataflywheel.synth.backends.transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm
    from dataflywheel.synth.backends.transformers import TransformersBackend
    from dataflywheel.synth.self_instruct import render

    corpus = [render("self_instruct_is_classification.jinja", instruction="x"),
              render("self_instruct_instances_gen.jinja", instruction="x"),
              render("self_instruct_instances_clf.jinja", instruction="x")] + [t["instruction"] for t in seeds]
    folder = build_tiny_causal_lm(tmp_path / "lm", texts=corpus, max_positions=2048)
    backend = TransformersBackend(folder, device="cpu")
    cfg = SelfInstructConfig(num_instructions=1, max_requests=2, request_batch_size=2, rouge_threshold=0.99,
                             min_words=0, blacklist=(),
                             bootstrap_sampling={"temperature": 1.0, "max_tokens": 24, "stop": BOOTSTRAP_STOP},
                             instance_sampling={"temperature": 0.0, "max_tokens": 16})
    si = SelfInstruct(backend, seeds, cfg)
    tasks = si.bootstrap()
    c = si.counts
    assert c["requests"] == 2 and backend.counts["samples"] == 2
    assert c["candidates"] == c["accepted"] + sum(v for k, v in si.rejections.items() if k in CANDIDATE_REASONS)
    # A random tiny model rarely ends a list item: classify and instances run on seed-made tasks too,
    # so every prompt kind goes through the real backend.
    tasks = tasks + [MachineTask(t["instruction"], 1, "seed", {}, 0.0) for t in seeds[:2]]
    si.classify(tasks)
    si.generate_instances(tasks)
    rows = si.instance_rows(tasks)
    assert backend.counts["samples"] == 2 + 2 * len(tasks) and backend.counts["errors"] == 0
    assert all(t.is_classification is not None and t.raw_instances is not None for t in tasks)
    for row in rows:
        validate("conversation", row)
