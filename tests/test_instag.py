"""InsTag (Lu et al. 2024, docs/sources.md#instag): reply parsing, the tagger's retry-once through real backends, the four
normalization steps on hand-checked examples (the semantic one on the real MiniLM), Algorithm 1
against a hand-worked example and a literal transcription, and the three stages on Beam's
FnApiRunner, where every row must reconcile."""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from dataflywheel.io import read
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.selectors import instag as instag_module
from dataflywheel.selectors.instag import InsTagTag, parse_tags
from dataflywheel.selectors.tag_normalize import (
    InsTagNormalize,
    association_aggregate,
    frequency_filter,
    normalize_tags,
    rule_aggregate,
    semantic_aggregate,
)
from dataflywheel.selectors.tag_sample import InsTagSample, coverage, mean_tags, sample
from dataflywheel.stages import process_batch, process_group
from dataflywheel.synth.backends.base import Backend, Sample, Unit

# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, tags, how", [
    ('[{"tag": "Math", "explanation": "arithmetic"}, {"tag": "Word Problem", "explanation": "story"}]',
     ["Math", "Word Problem"], "json"),
    ('Sure! Here are the tags:\n```json\n[{"tag": "Coding", "explanation": "x"}, {"tag": "Python"}]\n```\nHope it helps.',
     ["Coding", "Python"], "fenced"),
    ('The tags are [{"tag": "Poetry", "explanation": "a poem"}] as requested.', ["Poetry"], "embedded"),
    ("[{'tag': 'Translation', 'explanation': \"it's French\"}]", ["Translation"], "literal"),
    # cut at max_tokens: no complete list, the regex over "tag" fields rescues both tags
    ('[{"tag": "Cooking", "explanation": "a recipe"}, {"tag": "Bak\\u00e9ry", "expla', ["Cooking", "Bakéry"], "regex"),
    ('{"tag": "Solo", "explanation": "one object"}', ["Solo"], "json"),
    ('[{"tag": "Dup"}, {"tag": " Dup "}, {"tag": ""}, {"tag": 3}]', ["Dup"], "json"),
    ("colours colours blue the and of", [], "none"),
    ("[]", [], "none"),
    ("", [], "none"),
])
def test_parse_tags(reply, tags, how):
    parsed = parse_tags(reply)
    assert (parsed.tags, parsed.how) == (tags, how)


# -- the tagger, through a backend -----------------------------------------------------------------


def query_of(unit: Unit) -> str:
    return re.search(r"\[begin\]\n(.*)\n\[end\]", unit.request.messages[-1]["content"], re.DOTALL).group(1)


class ScriptedTaggerBackendForTests(Backend):
    """Stands in for a capable LLM tagger (ChatGPT in the paper, or a local instruction model) that
    cannot run here: replays canned replies by (instruction, attempt). ``replies[query]`` is a list,
    one reply per call for that query; a reply of None is a failed generation. Records every unit."""

    name = "scripted"

    def __init__(self, replies: dict[str, list[str | None]]):
        super().__init__("scripted-tagger")
        self.replies = replies
        self.calls: dict[str, int] = {}
        self.seen: list[Unit] = []

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        out = []
        for unit in todo:
            self.seen.append(unit)
            q = query_of(unit)
            k = self.calls.get(q, 0)
            self.calls[q] = k + 1
            text = self.replies[q][min(k, len(self.replies[q]) - 1)]
            out.append(Sample("", "error", error="scripted failure") if text is None
                       else Sample(text, "stop", tokens=len(text.split())))
        return out


def tags_reply(*tags: str) -> str:
    return json.dumps([{"tag": t, "explanation": f"about {t}"} for t in tags])


def conv(rid: str, question: str) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "ok"}]}


def tagger(backend: Backend, **kw) -> InsTagTag:
    stage = InsTagTag(backend={"model": "unused"}, **kw)
    stage.backend = backend
    return stage


def test_bad_replies_are_retried_once_with_another_seed_then_reported():
    backend = ScriptedTaggerBackendForTests({
        "Add 2 and 3.": [tags_reply("Math", "Arithmetic")],
        "Write a haiku.": ["I think this is poetry.", 'Here: [{"tag": "Poetry", "explanation": "haiku"}]'],
        "Say something.": ["blah", "still blah"],
        "Translate 'cat'.": [None, tags_reply("Translation")],
    })
    rows = [conv("a", "Add 2 and 3."), conv("b", "Write a haiku."), conv("c", "Say something."),
            conv("d", "Translate 'cat'.")]
    out = process_batch(tagger(backend), rows)
    got = {r["id"]: r for r in out.kept}
    assert [r["id"] for r in out.kept] == ["a", "b", "c", "d"] and not out.rejected
    assert got["a"]["meta"]["instag_raw"] == ["Math", "Arithmetic"] and got["a"]["scores"]["instag_raw_count"] == 2
    assert got["b"]["meta"]["instag_raw"] == ["Poetry"]
    assert got["b"]["meta"]["instag_tagging"]["attempts"][1]["parsed_by"] == "embedded"
    assert got["c"]["meta"]["instag_raw"] == [] and got["c"]["meta"]["instag_tagging"]["error"] == "tag_parse_failed"
    assert got["d"]["meta"]["instag_raw"] == ["Translation"] and got["d"]["meta"]["instag_tagging"]["error"] is None
    # one request per row, then one retry for each of b, c, d, and never a third
    assert backend.calls == {"Add 2 and 3.": 1, "Write a haiku.": 2, "Say something.": 2, "Translate 'cat'.": 2}
    first, retries = backend.seen[:4], backend.seen[4:]
    assert {u.request.sampling.seed for u in first} == {0} and {u.request.sampling.temperature for u in first} == {0.0}
    assert {u.request.sampling.seed for u in retries} == {1} and {u.request.sampling.temperature for u in retries} == {0.7}
    assert out.stats["tag_requests"] == 7 and out.stats["tag_retries"] == 3
    assert out.stats["tag_parse_failures"] == 3 and out.stats["tag_generation_errors"] == 1
    assert out.stats["tag_failed_rows"] == 1 and out.stats["raw_tags"] == 4


def test_reject_failed_names_the_reason():
    backend = ScriptedTaggerBackendForTests({"Hi.": ["??"], "Sum 1 and 1.": [tags_reply("Math")]})
    out = process_batch(tagger(backend, reject_failed=True), [conv("x", "Hi."), conv("y", "Sum 1 and 1.")])
    assert [r["id"] for r in out.kept] == ["y"]
    assert [r["rejected"]["reason"] for r in out.rejected] == ["tag_parse_failed"]


# -- normalization, step by step -------------------------------------------------------------------


def test_frequency_filter_drops_rare_exact_strings():
    rows = [["Math", "Writing"], ["Math", "writing"], ["Math"], ["Code", "Code"]]
    # "Math" is on 3 rows, "Code" on 1 (listed twice), "Writing"/"writing" on 1 each: the paper
    # filters before lowercasing, so the two spellings are counted apart
    assert frequency_filter(rows, 2) == [["Math"], ["Math"], ["Math"], []]
    assert frequency_filter(rows, 1) == [["Math", "Writing"], ["Math", "writing"], ["Math"], ["Code"]]


def test_rule_aggregation_lowercases_cleans_and_stems():
    rows = [["Writing"], ["writes"], ["Writing", "Code-Review"], ["code  review!"], ["WRITE"]]
    out, mapping = rule_aggregate(rows)
    # "writing" (2 rows) is the most frequent cleaned spelling of the stem "write"
    assert mapping["writes"] == mapping["WRITE"] == mapping["Writing"] == "writing"
    assert mapping["Code-Review"] == mapping["code  review!"] == "code review"
    assert out == [["writing"], ["writing"], ["writing", "code review"], ["code review"], ["writing"]]


def test_semantic_aggregation_merges_chains_within_eps_to_the_most_frequent():
    vectors = {"a": [1.0, 0.0], "b": [0.9995, 0.0316], "c": [0.998, 0.0632], "z": [0.0, 1.0]}  # a~b~c, z apart

    def embed(texts):
        v = np.array([vectors[t] for t in texts])
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    rows = [["a"], ["b"], ["b", "z"], ["c"]]
    out, mapping = semantic_aggregate(rows, embed, eps=0.0012)  # a-b, b-c within; a-c (0.002) not
    assert mapping == {"a": "b", "b": "b", "c": "b", "z": "z"}  # one chain; "b" is on most rows
    assert out == [["b"], ["b"], ["b", "z"], ["b"]]
    _, apart = semantic_aggregate(rows, embed, eps=0.0001)
    assert apart == {t: t for t in "abcz"}


@pytest.fixture(scope="module")
def minilm():
    from dataflywheel.models.embedder import embed, load_embedder

    try:
        model = load_embedder(None)
    except Exception as err:  # noqa: BLE001 - the wheel is part of the venv; say why if it is not
        pytest.skip(f"MiniLM not available: {err}")
    return lambda texts: embed(model, texts)


def test_semantic_aggregation_with_minilm_at_the_papers_eps(minilm):
    tags = ["number sorting", "sorting numbers", "math", "mathematics", "poetry"]
    v = minilm(tags)
    cos = v @ v.T
    # what MiniLM says, so the expectations below follow from it: a close pair and a looser one
    assert cos[0, 1] > 0.96 and 0.85 < cos[2, 3] < 0.94 and cos[2, 4] < 0.5
    rows = [["number sorting"], ["sorting numbers"], ["sorting numbers", "poetry"], ["math"], ["mathematics"]]
    out, mapping = semantic_aggregate(rows, minilm, eps=0.05)
    assert mapping["number sorting"] == mapping["sorting numbers"] == "sorting numbers"
    assert mapping["math"] == "math" and mapping["mathematics"] == "mathematics" and mapping["poetry"] == "poetry"
    _, loose = semantic_aggregate(rows, minilm, eps=0.12)  # cos >= 0.88: now math/mathematics merge
    assert loose["mathematics"] == loose["math"] == "math" and loose["poetry"] == "poetry"


def test_association_absorbs_implied_tags_and_merges_mutual_ones():
    rows = ([["python", "programming"]] * 3 + [["programming"]] * 2 + [["json", "parsing"]] * 2
            + [["parsing", "python", "programming"]])
    # rules at support >= 2, confidence >= 0.99: python => programming (4/4); json => parsing (2/2);
    # programming => python is 4/6, parsing => json 2/3: no
    out, rules = association_aggregate(rows, min_support=2, min_confidence=0.99)
    assert {(r.antecedent, r.consequent, r.support) for r in rules} == {("python", "programming", 4),
                                                                         ("json", "parsing", 2)}
    assert out == [["python"]] * 3 + [["programming"]] * 2 + [["json"]] * 2 + [["parsing", "python"]]
    mutual = [["a", "b"]] * 3 + [["b", "a", "c"]]  # a <=> b: one tag, named by the more frequent (tie: "a")
    out, rules = association_aggregate(mutual, min_support=3, min_confidence=0.99)
    assert len(rules) == 2 and out == [["a"]] * 3 + [["a", "c"]]
    none, no_rules = association_aggregate(mutual, min_support=5)
    assert no_rules == [] and none == [list(r) for r in mutual]


def test_normalize_counts_after_each_step_in_the_papers_order():
    rows = [["Writing", "Python"], ["Writing", "Python"], ["writes", "Python"], ["Rare"]]
    norm = normalize_tags(rows, embed=None, min_frequency=1, min_support=2, steps=["frequency", "rules", "association"])
    # frequency keeps everything at alpha 1; rules fold writes -> writing, Python -> python;
    # association: writing <=> python on 3/3 rows, merged into one tag ("python" wins the tie)
    assert norm.counts == {"raw": 4, "frequency": 4, "rules": 3, "association": 2}
    assert norm.tags == [["python"], ["python"], ["python"], ["rare"]]
    norm2 = normalize_tags(rows, embed=None, min_frequency=2, steps=["frequency", "rules"])
    assert norm2.counts == {"raw": 4, "frequency": 2, "rules": 2} and norm2.tags[2] == ["python"]


def fake_embedder(monkeypatch, calls: list):
    import dataflywheel.models.embedder as emb

    def fake_embed(model, texts, batch_size=64):
        calls.extend(texts)  # a random direction per text (32 dims): distinct tags stay far apart
        v = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=32) for t in texts])
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(emb, "load_embedder", lambda name=None, device="cpu": object())
    monkeypatch.setattr(emb, "embed", fake_embed)


def test_normalize_stage_writes_tags_and_counts_and_caches_embeddings(tmp_path, monkeypatch):
    calls: list = []
    fake_embedder(monkeypatch, calls)
    rows = [{"id": str(i), "meta": {"instag_raw": tags}, "scores": {"ifd": 0.5}}
            for i, tags in enumerate([["Math", "Poetry"], ["math"], ["Poetry"], [], ["Cooking"]])]
    stage = InsTagNormalize(min_frequency=1, min_support=100, cache=str(tmp_path / "emb.sqlite"))
    out = process_group(stage, rows)
    assert [r["meta"]["instag"] for r in out.kept] == [["math", "poetry"], ["math"], ["poetry"], [], ["cooking"]]
    assert [r["scores"]["instag_count"] for r in out.kept] == [2, 1, 1, 0, 1]
    assert all(r["scores"]["ifd"] == 0.5 for r in out.kept)
    assert out.stats["tags_raw"] == 4 and out.stats["tags_rules"] == 3 and out.stats["rows_without_tags"] == 1
    assert sorted(calls) == ["cooking", "math", "poetry"]
    calls.clear()
    process_group(InsTagNormalize(min_frequency=1, min_support=100, cache=str(tmp_path / "emb.sqlite")), rows)
    assert calls == []  # a re-run embeds nothing


# -- sampling --------------------------------------------------------------------------------------

HAND = {"r1": "abc", "r2": "ab", "r3": "cd", "r4": "d", "r5": "e", "r6": "a", "r7": ""}


def test_sample_matches_the_hand_worked_example():
    ids = list(HAND)
    tags = [list(HAND[i]) for i in ids]
    # sorted: r1(3) r2(2) r3(2) r4 r5 r6 (1) r7(0); pass 1 takes r1, r3 (adds d), r5 (adds e);
    # pass 2 takes r2, r4; pass 3 takes r6; then only r7 (no tags) is left: padding
    got = [(ids[i], k) for i, k in sample(tags, ids, 7)]
    assert got == [("r1", 1), ("r3", 1), ("r5", 1), ("r2", 2), ("r4", 2), ("r6", 3), ("r7", 0)]
    assert [ids[i] for i, _ in sample(tags, ids, 4)] == ["r1", "r3", "r5", "r2"]
    assert sample(tags, ids, 0) == [] and sample([], [], 3) == []


def naive_sample(tags, ids, budget):
    """Algorithm 1 as written: sort, passes with a reset T over what is left, pad when a pass adds nothing."""
    pool = sorted(range(len(tags)), key=lambda i: (-len(set(tags[i])), str(ids[i])))
    chosen, k = [], 0
    while len(chosen) < budget and pool:
        k += 1
        seen, rest = set(), []
        for i in pool:
            if len(chosen) < budget and set(tags[i]) - seen:
                chosen.append((i, k))
                seen |= set(tags[i])
            else:
                rest.append(i)
        if len(rest) == len(pool):
            chosen += [(i, 0) for i in rest[:budget - len(chosen)]]
            break
        pool = rest
    return chosen


def test_sample_equals_the_literal_algorithm_on_random_pools():
    rng = random.Random(5)
    for trial in range(150):
        n, vocab = rng.randint(0, 60), rng.randint(1, 12)
        tags = [rng.sample(range(vocab), rng.randint(0, min(vocab, 5))) for _ in range(n)]
        tags = [[f"t{t}" for t in row] for row in tags]
        ids = [f"id{rng.randint(0, 999):03d}" for _ in range(n)]  # repeated ids too: ties stay stable
        for budget in (0, 1, n // 3, n, n + 5):
            assert sample(tags, ids, budget) == naive_sample(tags, ids, budget), (trial, budget)


def test_coverage_and_mean_tags():
    pool = [["a", "b"], ["b", "c"], ["d"], []]
    assert coverage([["a", "b"]], pool) == 0.5 and coverage(pool, pool) == 1.0 and coverage([], [[]]) == 1.0
    assert mean_tags([["a", "b"], ["c"]]) == 1.5 and mean_tags([]) == 0.0


def test_sample_stage_budget_fraction_missing_tags_and_report():
    rows = [{"id": i, "meta": {"instag": list(t), "instag_pass": 9}} for i, t in HAND.items()]
    rows.append({"id": "r8", "messages": []})  # never normalized: not a candidate
    out = process_group(InsTagSample(fraction=0.5), rows)  # half of the 7 candidates, rounded: 4
    assert [r["id"] for r in out.kept] == ["r1", "r2", "r3", "r5"]
    assert [r["meta"]["instag_pass"] for r in out.kept] == [1, 2, 1, 1]
    reasons = {r["id"]: r["rejected"]["reason"] for r in out.rejected}
    assert reasons == {"r4": "not_selected", "r6": "not_selected", "r7": "not_selected", "r8": "missing_tags"}
    assert all("instag_pass" not in r["meta"] for r in out.rejected)  # stale marks removed
    assert out.stats["selected"] == 4 and out.stats["padded"] == 0
    assert out.stats["coverage_permille"] == 1000  # a, b, c, d, e all covered
    assert out.stats["mean_tags_selected_milli"] == 2000 and out.stats["mean_tags_pool_milli"] == 1429
    with pytest.raises(ValueError, match="exactly one of budget or fraction"):
        InsTagSample(budget=3, fraction=0.5)


def test_configs_reject_what_cannot_work():
    with pytest.raises(ValueError, match="n must be 1"):
        InsTagTag(backend={"model": "m"}, sampling={"n": 2})
    with pytest.raises(ValueError, match="steps"):
        InsTagNormalize(steps=["frequncy"])
    with pytest.raises(ValueError, match="backend"):
        InsTagTag()


# -- on Beam ---------------------------------------------------------------------------------------

QUESTIONS = {
    "q1": ("Sort these numbers and explain the algorithm: 5, 2, 9.", ["Sorting", "Algorithm Explanation", "Math"]),
    "q2": ("What is 12 times 7?", ["Math", "Arithmetic"]),
    "q3": ("Write a poem about the sea.", ["Poetry", "Creative Writing"]),
    "q4": ("Explain bubble sort in Python.", ["sorting", "Programming", "Algorithm explanation"]),
    "q5": ("Add 3 and 4.", ["math", "arithmetic"]),
    "q6": ("Write a limerick about a cat.", ["Poetry", "Humor"]),
}


def write_rows(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(conv(k, q)) + "\n" for k, (q, _) in QUESTIONS.items()))
    return str(path)


def job(inputs: str, out: Path, engine: str, tag_stage: dict) -> dict:
    stages = [tag_stage,
              {"stage": "instag_normalize", "min_frequency": 1, "min_support": 2,
               "steps": ["frequency", "rules", "association"]},
              {"stage": "instag_sample", "budget": 3}]
    return {"name": "instag", "runner": {"engine": engine}, "input": {"paths": inputs, "kind": "conversation"},
            "stages": stages, "output": {"path": str(out), "format": "jsonl"}}


def run(cfg: dict):
    parsed = parse_config(cfg, "<test>")
    return run_job(parsed.jobs[0], parsed.runner)


def test_scripted_tagger_chain_on_beam_equals_plain(tmp_path, monkeypatch):
    replies = {q: ["no json here", tags_reply(*tags)] if k == "q2" else [tags_reply(*tags)]
               for k, (q, tags) in QUESTIONS.items()}
    monkeypatch.setattr(instag_module, "build_backend", lambda cfg: ScriptedTaggerBackendForTests(replies))
    inputs = write_rows(tmp_path / "in")
    stage = {"stage": "instag_tag", "backend": {"model": "scripted"}}
    beam = run(job(inputs, tmp_path / "beam", "local", stage))
    assert all(s.balanced for s in beam.stages)
    tag, norm, samp = (s.stats for s in beam.stages[-3:])
    assert tag["tag_retries"] == 1 and tag["tag_parse_failures"] == 1 and tag.get("tag_failed_rows", 0) == 0
    # 12 raw spellings -> 8 after lowercasing; association: sorting <=> algorithm explanation (2/2
    # both ways) merge, arithmetic => math (2/2; math => arithmetic is 2/3) absorbs math where both
    assert (norm["tags_raw"], norm["tags_rules"], norm["tags_association"], norm["association_rules"]) == (12, 8, 7, 3)
    kept = {r["id"]: r for r in read(str(tmp_path / "beam"))}
    assert kept["q1"]["meta"]["instag"] == ["algorithm explanation", "math"]
    # counts q1 q3 q4 q6: 2, q2 q5: 1; pass 1 takes q1, q3, then q4 (adds programming): the budget
    assert set(kept) == {"q1", "q3", "q4"} and samp["selected"] == 3
    assert samp["coverage_permille"] == round(1000 * 5 / 7)  # not humor, not arithmetic
    plain = run(job(inputs, tmp_path / "plain", "plain", stage))
    assert {r["id"]: r["meta"]["instag"] for r in read(str(tmp_path / "plain"))} == {
        k: r["meta"]["instag"] for k, r in kept.items()}
    for ours, theirs in zip(plain.stages[-3:], (tag, norm, samp)):
        assert {k: v for k, v in ours.stats.items() if v} == {k: v for k, v in theirs.items() if v}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    pytest.importorskip("torch")
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", max_positions=1024))


def test_tiny_model_writes_noise_every_row_retried_once_and_the_run_reconciles(tmp_path, tiny_model):
    inputs = write_rows(tmp_path / "in")
    stage = {"stage": "instag_tag", "batch_size": 3,
             "backend": {"kind": "transformers", "model": tiny_model, "cache": str(tmp_path / "gen.sqlite"),
                         "options": {"device": "cpu"}},
             "sampling": {"temperature": 0.0, "max_tokens": 8, "seed": 0}}
    report = run(job(inputs, tmp_path / "out", "local", stage))
    assert all(s.balanced for s in report.stages)
    tag, norm, samp = (s.stats for s in report.stages[-3:])
    n = len(QUESTIONS)
    assert tag["tag_requests"] == 2 * n and tag["tag_retries"] == n and tag["tag_parse_failures"] == 2 * n
    assert tag["tag_failed_rows"] == n and tag["cache_misses"] == 2 * n
    assert norm["tags_raw"] == 0 and norm["rows_without_tags"] == n
    assert samp["selected"] == 3 and samp["padded"] == 3  # nothing tagged: Algorithm 1 only pads
    rows = list(read(str(tmp_path / "out")))
    assert len(rows) == 3 and all(r["meta"]["instag_tagging"]["error"] == "tag_parse_failed" for r in rows)
    again = run(job(inputs, tmp_path / "again", "local", stage))
    assert again.stages[-3].stats["cache_hits"] == 2 * n and "cache_misses" not in again.stages[-3].stats
