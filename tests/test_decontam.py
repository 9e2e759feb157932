"""Decontamination stage: real eval files (JSONL, Parquet) written here, real xxhash, the plain loop
and the Beam FnApiRunner. A copied 13-gram is caught through case and punctuation changes; a
12-gram overlap is not; counts reconcile on both engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xxhash
from pydantic import ValidationError

from dataflywheel.errors import UserError
from dataflywheel.filters.decontam import Decontaminate, TextNorm, ngram_hashes, normalize, tokens
from dataflywheel.io import read
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.registry import stage_class
from dataflywheel.stages import process_batch

QUESTIONS = [
    "A farmer has seventeen sheep and all but nine of them run away into the hills during a storm. How many sheep does the farmer have left?",
    "Which planet in our solar system has the longest day measured against its own year, and why does its rotation run backwards?",
    "If a train leaves the station at noon travelling at sixty miles per hour, when will it reach a town that lies ninety miles away?",
]
ANSWERS = [
    "The farmer still has nine sheep, because all but nine means that exactly nine of them stayed behind with him.",
    "Venus, whose slow retrograde spin is thought to come from ancient collisions and from tides raised by its thick atmosphere.",
    "It arrives at half past one in the afternoon, since ninety miles at sixty miles per hour takes ninety minutes.",
]
FILLER = "Our bakery opens early on weekdays and sells fresh bread to neighbours from the whole valley."


def words(text: str) -> list[str]:
    return text.split()


def write_eval(folder: Path, name: str = "mini_eval.jsonl", extra: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "question": q, "answer": a} for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    rows.append({"id": "short", "question": "What is two plus two?", "answer": "Four."})
    path = folder / name
    path.write_text("\n".join(json.dumps(r) for r in rows + (extra or [])) + "\n")
    return path


def stage(eval_path: Path, **kwargs) -> Decontaminate:
    kwargs.setdefault("eval_sets", [{"path": str(eval_path), "fields": ["question", "answer"]}])
    s = Decontaminate(**kwargs)
    s.setup()
    return s


def doc(rid: str, middle: str) -> dict:
    return {"id": rid, "text": f"{FILLER} {middle} {FILLER}"}


def score_one(s: Decontaminate, row: dict) -> dict:
    return s.score([row])[0]


def test_normalization_follows_datatrove_steps():
    norm = TextNorm()
    assert normalize("Héllo, WORLD! It's 2024-05-01 in the U.S.", norm) == "hello world its 0 in the us"
    assert normalize("ＦＵＬＬ width\u200bjoined ﬁne Ça", norm) == "full widthjoined fine ca"
    assert tokens("  Many\tspaces\n\nand lines ", norm) == ["many", "spaces", "and", "lines"]
    raw = TextNorm(lowercase=False, strip_punctuation=False, strip_diacritics=False, digits_to_zero=False)
    assert normalize("Héllo, 42!", raw) == "Héllo, 42!"


def test_ngram_hash_is_xxh64_of_the_space_joined_ngram():
    ws = ["a", "bb", "ccc", "dddd", "é"]
    hashes = ngram_hashes(ws, 3)
    assert list(hashes) == [xxhash.xxh64_intdigest(" ".join(ws[i : i + 3]).encode()) for i in range(3)]
    assert len(ngram_hashes(ws, 6)) == 0  # fewer words than n: no n-gram (datatrove, nltk.ngrams)


def test_copied_13gram_rejected_12gram_kept(tmp_path):
    s = stage(write_eval(tmp_path))
    q = words(QUESTIONS[0])
    copied = " ".join(q[3:16]).upper().replace(" ", ", ", 2) + "!"  # 13 words, case and punctuation changed
    hit = score_one(s, doc("hit", copied))
    assert hit["scores"]["contam_ngrams"] == 1
    assert hit["meta"]["contaminated_by"] == "mini_eval"
    assert hit["meta"]["contaminated_ngram"] == normalize(" ".join(q[3:16]), TextNorm())
    assert s.keep(hit) == (False, "contaminated")

    near = score_one(s, doc("near", " ".join(q[3:15])))  # 12 words of the same question
    assert near["scores"]["contam_ngrams"] == 0 and "contaminated_by" not in near.get("meta", {})
    assert s.keep(near) == (True, None)

    longer = score_one(s, doc("longer", " ".join(q[:20])))  # 20 words: 8 distinct 13-grams
    assert longer["scores"]["contam_ngrams"] == 8


def test_question_answer_boundary_and_short_eval_rows(tmp_path):
    s = stage(write_eval(tmp_path))
    q, a = words(QUESTIONS[1]), words(ANSWERS[1])
    across = score_one(s, doc("x", " ".join(q[-6:] + a[:7])))  # 6 question words + 7 answer words
    assert across["scores"]["contam_ngrams"] == 1
    # A 6-word eval row yields no 13-gram, as in datatrove: it is counted, not indexed.
    expected = sum(len(tokens(f"{q} {a}", TextNorm())) - 12 for q, a in zip(QUESTIONS, ANSWERS))
    assert s.index_stats["mini_eval"] == {"rows": 4, "short_rows": 1, "ngrams": expected}
    assert score_one(s, {"id": "s", "text": "What is two plus two? Four."})["scores"]["contam_ngrams"] == 0


def test_min_matches(tmp_path):
    s = stage(write_eval(tmp_path), min_matches=2)
    q = words(QUESTIONS[2])
    one = score_one(s, doc("one", " ".join(q[:13])))
    two = score_one(s, doc("two", " ".join(q[:14])))
    assert (one["scores"]["contam_ngrams"], two["scores"]["contam_ngrams"]) == (1, 2)
    assert s.keep(one) == (True, None) and s.keep(two) == (False, "contaminated")


def chat(rid: str, user: str, assistant: str) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_conversations_by_role(tmp_path):
    path = write_eval(tmp_path)
    leaked_prompt = chat("p", QUESTIONS[0], "Let me think about that for a moment before answering.")
    leaked_answer = chat("a", "Tell me something about farms please.", ANSWERS[0])
    both = stage(path)
    answers_only = stage(path, roles=["assistant"])
    prompts_only = stage(path, roles=["user"])
    for s, expect in ((both, [False, False]), (answers_only, [True, False]), (prompts_only, [False, True])):
        scored = s.score([leaked_prompt, leaked_answer])
        assert [s.keep(r)[0] for r in scored] == expect
    # Preference rows: prompt, chosen and rejected are all checked by default.
    pref = {"id": "pr", "prompt": [{"role": "user", "content": "Question?"}],
            "chosen": [{"role": "assistant", "content": ANSWERS[2]}], "rejected": [{"role": "assistant", "content": "No idea."}]}
    assert score_one(both, pref)["scores"]["contam_ngrams"] > 0


def test_eval_messages_rows_parquet_and_first_set_wins(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(QUESTIONS, ANSWERS)]
    pq.write_table(pa.table({"id": ["m0", "m1", "m2"], "messages": msgs}), tmp_path / "chat_eval.parquet")
    jsonl = write_eval(tmp_path / "j")
    s = stage(jsonl, eval_sets=[str(tmp_path / "chat_eval.parquet"), {"path": str(jsonl), "fields": ["question"]}])
    assert sorted(s.index_stats) == ["chat_eval", "mini_eval"]
    row = score_one(s, doc("d", QUESTIONS[1]))  # in both sets: the first listed is named
    assert row["meta"]["contaminated_by"] == "chat_eval"
    named = stage(jsonl, eval_sets=[{"path": str(jsonl), "name": "gsm", "fields": ["answer"]}])
    assert score_one(named, doc("d", ANSWERS[0]))["meta"]["contaminated_by"] == "gsm"
    assert score_one(named, doc("d", QUESTIONS[0]))["scores"]["contam_ngrams"] == 0  # questions not indexed


def test_bad_eval_sets_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="no input files match") as err:
        stage(tmp_path / "missing.jsonl")
    assert "\n" not in str(err.value) and "decontaminate" in str(err.value)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": QUESTIONS[0]}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"unreadable record: .*broken.jsonl:line 2"):
        stage(broken)
    with pytest.raises(UserError, match="gives no 13-word n-gram"):
        stage(write_eval(tmp_path), eval_sets=[{"path": str(write_eval(tmp_path)), "fields": ["prompt"]}])
    with pytest.raises(ValidationError):
        Decontaminate(eval_sets=[{"path": "x.jsonl", "field": ["q"]}])  # misspelt key
    with pytest.raises(ValidationError):
        Decontaminate(eval_sets=[])


def test_process_batch_reconciles(tmp_path):
    s = stage(write_eval(tmp_path))
    rows = [doc(f"clean{i}", f"Row number {i} talks about gardens and rivers.") for i in range(20)]
    rows += [doc(f"dirty{i}", QUESTIONS[i % 3]) for i in range(5)]
    out = process_batch(s, rows)
    assert len(out.kept) == 20 and len(out.rejected) == 5 and not out.dead
    assert {r["id"] for r in out.rejected} == {f"dirty{i}" for i in range(5)}
    assert all(r["rejected"] == {"stage": "decontaminate", "reason": "contaminated"} for r in out.rejected)


def test_beam_and_plain_jobs_agree(tmp_path):
    assert stage_class("decontaminate") is Decontaminate
    eval_path = write_eval(tmp_path / "eval")
    lines = [{"id": f"d{i:02d}", "text": f"Document {i} is about the weather in spring and autumn."} for i in range(40)]
    for i in range(0, 40, 8):  # 5 contaminated documents, copied answers with changed case
        lines[i]["text"] += " " + ANSWERS[i % 3].lower()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    reports = {}
    for engine in ("plain", "local"):
        cfg = {"name": "decont", "runner": {"engine": engine},
               "input": {"paths": str(tmp_path / "in"), "kind": "document", "batch_rows": 7},
               "stages": [{"stage": "decontaminate", "batch_size": 4,
                           "eval_sets": [{"path": str(eval_path), "fields": ["question", "answer"]}]}],
               "output": {"path": str(tmp_path / engine), "format": "jsonl", "rows_per_shard": 10}}
        parsed = parse_config(cfg, "<test>")
        reports[engine] = run_job(parsed.jobs[0], parsed.runner)
        reports[engine].check()
        by = {r.stage: r for r in reports[engine].stages}
        assert by["decontaminate"].rows_in == 40 and by["decontaminate"].rejected == {"contaminated": 5}
    kept = {e: sorted(r["id"] for r in read(str(tmp_path / e))) for e in ("plain", "local")}
    assert kept["plain"] == kept["local"] and len(kept["local"]) == 35
    rejected = list(read(str(tmp_path / "local" / "_rejected")))
    assert sorted(r["id"] for r in rejected) == [f"d{i:02d}" for i in range(0, 40, 8)]
    assert all(r["meta"]["contaminated_by"] == "mini_eval" for r in rejected)
