"""The mixture step against hand-computed counts: each strategy, shortfall redistribution, replay,
token budgets, determinism; and as a job on the plain loop and Beam's FnApiRunner."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from dataflywheel.registry import stage_class
from dataflywheel.selectors.mixture import Mixture, allocate, describe_mixture, field_path, largest_remainder
from dataflywheel.stages import process_group


def conv(rid: str, source: str, words: int = 3, **extra) -> dict:
    text = " ".join(["word"] * (words - 1))  # user turn words - 1, assistant one word: `words` in all
    return {"id": rid, "source": source, "messages": [{"role": "user", "content": text},
                                                      {"role": "assistant", "content": "ok"}], **extra}


def pool(sizes: dict[str, int], **kw) -> list[dict]:
    return [conv(f"{g}{i:03d}", g, **kw) for g, n in sizes.items() for i in range(n)]


ABC = {"A": 60, "B": 30, "C": 10}


def mix(rows: list[dict], **cfg) -> tuple[Counter, dict[str, str], Mixture]:
    step = Mixture(**{"group_by": "source", **cfg})
    out = process_group(step, rows)
    assert out.rows_in == len(rows) and not out.dead
    kept = Counter(r["source"] for r in out.kept)
    reasons = {r["id"]: r["rejected"]["reason"] for r in out.rejected}
    return kept, reasons, step


def test_proportional_budget_and_fraction():
    kept, reasons, _ = mix(pool(ABC), budget=50)
    assert kept == {"A": 30, "B": 15, "C": 5}
    assert set(reasons.values()) == {"over_budget"} and len(reasons) == 50
    assert mix(pool(ABC), fraction=0.2)[0] == {"A": 12, "B": 6, "C": 2}


def test_weights_with_and_without_redistribution():
    rows = pool({**ABC, "D": 5})
    # 1:1:2 of 40 asks 10 / 10 / 20; C has 10, and its missing 10 go to A and B in their 1:1 ratio
    kept, reasons, _ = mix(rows, strategy="weights", weights={"A": 1, "B": 1, "C": 2}, budget=40)
    assert kept == {"A": 15, "B": 15, "C": 10}
    assert Counter(v for k, v in reasons.items() if k.startswith("D")) == {"excluded_group": 5}
    kept, _, step = mix(rows, strategy="weights", weights={"A": 1, "B": 1, "C": 2}, budget=40, redistribute=False)
    assert kept == {"A": 10, "B": 10, "C": 10}
    stats = step.last_plan.stats()
    assert step.summarize().splitlines()[-1].endswith("ran short, pool below request (the rest went to other groups "
                                                     "if redistribute): C (10 < 20)")
    assert stats["requested/C"] == 20 and stats["mix/C"] == 10 and stats["pool/D"] == 5 and stats["mix/D"] == 0


def test_temperature():
    # T=2: weights sqrt(60)=7.746, sqrt(30)=5.477, sqrt(10)=3.162 -> quotas of 40: 18.91, 13.37, 7.72
    # -> floors 18 + 13 + 7 = 38; the 2 left go to the largest remainders, A (.91) and C (.72)
    assert mix(pool(ABC), strategy="temperature", temperature=2.0, budget=40)[0] == {"A": 19, "B": 13, "C": 8}
    # T=1 is proportional
    assert mix(pool(ABC), strategy="temperature", temperature=1.0, budget=50)[0] == {"A": 30, "B": 15, "C": 5}


def test_capped_water_filling_and_unmet_budget():
    # 50 proportional = 30/15/5; A capped at 20, its 10 split 30:10 over B, C -> B 22.5 hits 20 too,
    # so C takes the last 10 (all it has)
    assert mix(pool(ABC), strategy="capped", cap=20, budget=50)[0] == {"A": 20, "B": 20, "C": 10}
    # only A capped (5): B 30 and C 10 give all they have; 45 < 50 is all there is
    kept, _, step = mix(pool(ABC), strategy="capped", caps={"A": 5}, budget=50)
    assert kept == {"A": 5, "B": 30, "C": 10}
    text = step.summarize()
    assert "budget 50 rows, realized 45" in text and "ran short" not in text  # capped, not short


def test_replay_share_exact_and_replay_shortfall():
    rows = pool({"dom1": 40, "dom2": 20, "general": 100})
    kept, _, step = mix(rows, replay_group="general", replay_share=0.1, budget=50)
    assert kept == {"general": 5, "dom1": 30, "dom2": 15}  # 10% of 50; 45 split 40:20
    stats = step.last_plan.stats()
    assert stats["requested/general"] == 5 and stats["mix/general"] == 5
    # the replay group has 3: its missing 2 go to the domains (47 split 40:20 = 31.33 / 15.67)
    rows = pool({"dom1": 40, "dom2": 20, "general": 3})
    assert mix(rows, replay_group="general", replay_share=0.1, budget=50)[0] == {"general": 3, "dom1": 31, "dom2": 16}
    # domains short: the replay group does not grow past its share
    rows = pool({"dom1": 4, "dom2": 2, "general": 100})
    assert mix(rows, replay_group="general", replay_share=0.2, budget=50)[0] == {"general": 10, "dom1": 4, "dom2": 2}


def test_token_budget_words_and_tokenizer(tmp_path):
    # 3 words -> ceil(3 * 4/3) = 4 tokens; 6 words -> 8 tokens
    rows = pool({"A": 10}, words=3) + pool({"B": 10}, words=6)
    kept, _, step = mix(rows, unit="tokens", budget=60)  # 60 split 40:80 -> 20 / 40 tokens: 5 rows each
    assert kept == {"A": 5, "B": 5}
    # 50 split 40:80 -> 16.67 / 33.33 -> A 17, B 33 tokens: A fits 4 rows (16), B 4 rows (32); never over
    kept, _, step = mix(rows, unit="tokens", budget=50)
    stats = step.last_plan.stats()
    assert kept == {"A": 4, "B": 4} and stats["mix_tokens/A"] == 16 and stats["mix_tokens/B"] == 32
    assert stats["requested/A"] == 17 and stats["requested/B"] == 33
    assert step.realized(rows[:3]) == {"A": (3, 12)}

    from dataflywheel.models.tiny_lm import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["hello world, the tokens of a tiny tokenizer"] * 3, vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    step = Mixture(group_by="source", unit="tokens", fraction=1.0, tokenizer=str(tmp_path / "tok"))
    counts = step.token_counts(rows[:2])
    assert counts == [len(tok("word word\nok", add_special_tokens=False)["input_ids"])] * 2 and counts[0] != 4


def test_priority_order_and_determinism():
    rows = pool({"A": 20, "B": 20})
    for i, r in enumerate(rows):
        if i % 7:  # every 7th row has no score: it comes after the scored ones
            r["scores"] = {"q": float((i * 37) % 20)}
    step = Mixture(group_by="source", budget=10, order_by="q")
    kept = [r for r, reason in step.run(rows) if reason is None]
    for g in ("A", "B"):
        mine = sorted((r for r in rows if r["source"] == g and "scores" in r), key=lambda r: (-r["scores"]["q"], r["id"]))
        assert {r["id"] for r in kept if r["source"] == g} == {r["id"] for r in mine[:5]}
    # a seeded shuffle: the same set whatever the input order; another seed, another set
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    ids = {seed: {r["id"] for r, why in Mixture(group_by="source", budget=10, seed=seed).run(rows) if why is None}
           for seed in (0, 1)}
    again = {r["id"] for r, why in Mixture(group_by="source", budget=10, seed=0).run(shuffled) if why is None}
    assert ids[0] == again and ids[0] != ids[1] and len(ids[0]) == 10


def test_group_paths_and_missing_groups():
    row = {"id": "x", "meta": {"source": "web"}, "tags": ["math", "code"]}
    assert field_path(row, "meta.source") == "web" and field_path(row, "tags") == "math"
    assert field_path(row, "tags.1") == "code" and field_path(row, "tags.5") is None and field_path(row, "a.b") is None
    rows = [dict(conv(f"r{i}", "s"), tags=["math"] if i % 2 else []) for i in range(10)]
    kept, reasons, _ = mix(rows, group_by="tags", budget=10)
    assert sum(kept.values()) == 5 and set(reasons.values()) == {"missing_group"}
    step = Mixture(group_by="tags", budget=10, missing_group="untagged")
    assert Counter(r["meta"]["mixture_group"] for r in process_group(step, rows).kept) == {"math": 5, "untagged": 5}


def test_allocation_helpers():
    assert largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}  # tie -> by name
    assert largest_remainder(100, {"a": 0.29, "b": 0.71}) == {"a": 29, "b": 71}  # 28.999999999999996 is 29
    assert largest_remainder(29, {"a": 0.29, "b": 0.71}) == {"a": 8, "b": 21}  # 8.41 / 20.59
    assert sum(largest_remainder(7, {"a": 0.3, "b": 0.3, "c": 0.4}).values()) == 7
    assert allocate(100, {"a": 1, "b": 1}, {"a": 10, "b": 1000}) == {"a": 10, "b": 90}
    assert allocate(100, {"a": 1, "b": 1}, {"a": 10, "b": 1000}, redistribute=False) == {"a": 10, "b": 50}
    assert allocate(100, {"a": 1, "b": 0}, {"a": 30, "b": 1000}) == {"a": 30, "b": 0}


def test_config_errors_and_registry():
    assert stage_class("mixture") is Mixture
    for bad in ({"budget": 1, "fraction": 0.5}, {}, {"budget": 1, "strategy": "weights"},
                {"budget": 1, "weights": {"a": 1}}, {"budget": 1, "strategy": "capped"},
                {"budget": 1, "cap": 3}, {"budget": 1, "replay_group": "g"},
                {"budget": 1, "strategy": "weights", "weights": {"a": 0}},
                {"budget": 1, "strategy": "weights", "weights": {"g": 1}, "replay_group": "g", "replay_share": 0.1}):
        with pytest.raises(ValidationError):
            Mixture(group_by="source", **bad)


def test_mixture_job_on_beam_equals_plain_and_reconciles(tmp_path):
    from dataflywheel.io import read
    from dataflywheel.pipelines.config import parse_config
    from dataflywheel.pipelines.job import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    rows = pool({"dom1": 40, "dom2": 20, "general": 30}) + [dict(conv("nosrc", "x"), source="")]
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = {"stage": "mixture", "group_by": "source", "strategy": "temperature", "temperature": 2.0,
             "budget": 40, "replay_group": "general", "replay_share": 0.25}
    kept, stats = {}, {}
    for engine in ("plain", "local"):
        cfg = {"name": "mix", "runner": {"engine": engine}, "stages": [stage],
               "input": {"paths": str(folder / "*.jsonl"), "kind": "conversation", "batch_rows": 7},
               "output": {"path": str(tmp_path / engine), "format": "jsonl"}}
        parsed = parse_config(cfg, "<test>")
        report = run_job(parsed.jobs[0], parsed.runner)
        report.check()
        by = {s.stage: s for s in report.stages}
        assert by["mixture"].rows_in == 91 and by["mixture"].rejected == {"over_budget": 50, "missing_group": 1}
        kept[engine] = sorted(r["id"] for r in read(str(tmp_path / engine)))
        stats[engine] = by["mixture"].stats
    assert kept["plain"] == kept["local"] and len(kept["plain"]) == 40
    # replay 10 of 40; 30 split by sqrt(40):sqrt(20) = 17.57 / 12.43 -> 18 / 12
    assert Counter(k[:-3] for k in kept["plain"]) == {"general": 10, "dom1": 18, "dom2": 12}
    assert stats["plain"] == stats["local"] and stats["plain"]["mix/general"] == 10
    text = describe_mixture(stats["local"])
    assert "budget 40 rows, realized 40" in text and "25.0%" in text
