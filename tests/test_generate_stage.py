"""The `generate` stage and `dataflywheel synth`: a tiny local model through the real transformers
backend, on the Beam FnApiRunner and the plain loop; bad outputs rejected with reasons; a re-run
with the cache generates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dataflywheel.cli import main
from dataflywheel.io import read
from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.synth.generate import Generate

PROMPTS = ["Name three colours.", "What is two plus two?", "Write a short greeting.", "Describe a cat.",
           "List two fruits.", "Say something about rain."]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    # 2,048 positions: the Evol-Instruct prompts are ~600 tokens with this tokenizer
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", max_positions=2048))


def prompts_file(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return str(path)


def job(inputs: str, out: Path, engine: str, model: str, cache: Path) -> dict:
    stage = {"stage": "generate", "batch_size": 4, "reject_overlong": False,
             "backend": {"kind": "transformers", "model": model, "cache": str(cache)},
             "sampling": {"n": 1, "temperature": 0.8, "max_tokens": 12, "seed": 3}}
    return {"name": "gen", "runner": {"engine": engine}, "input": {"paths": inputs, "kind": "prompt"},
            "stages": [stage], "output": {"path": str(out), "format": "jsonl"}}


def run(cfg: dict):
    parsed = parse_config(cfg, "<test>")
    return run_job(parsed.jobs[0], parsed.runner)


def test_generate_on_beam_equals_plain_and_rerun_hits_cache(tmp_path, model):
    inputs = prompts_file(tmp_path / "in")
    beam = run(job(inputs, tmp_path / "beam", "local", model, tmp_path / "cache.sqlite"))
    stats = beam.stages[-1].stats
    assert stats["cache_misses"] == len(PROMPTS) and stats["tokens_generated"] > 0
    rows = {r["id"]: r for r in read(str(tmp_path / "beam"))}
    assert set(rows) == {f"p{i}" for i in range(len(PROMPTS))}
    for row in rows.values():
        assert row["messages"][-1]["role"] == "assistant" and "prompt" not in row
        assert row["meta"]["generation"]["backend"] == "transformers"
    # the plain loop with a fresh cache makes the same texts (per-sample seeds)
    run(job(inputs, tmp_path / "plain", "plain", model, tmp_path / "cache2.sqlite"))
    plain = {r["id"]: r["messages"][-1]["content"] for r in read(str(tmp_path / "plain"))}
    assert plain == {k: r["messages"][-1]["content"] for k, r in rows.items()}
    again = run(job(inputs, tmp_path / "again", "local", model, tmp_path / "cache.sqlite"))
    assert again.stages[-1].stats.get("cache_misses", 0) == 0
    assert again.stages[-1].stats["cache_hits"] == len(PROMPTS)
    assert "tokens_generated" not in again.stages[-1].stats


@pytest.mark.parametrize("sample, reason", [
    ({"text": "x", "finish_reason": "error"}, "generation_error"),
    ({"text": "cut", "finish_reason": "length"}, "overlong"),
    ({"text": "  ", "finish_reason": "stop"}, "empty_output"),
    ({"text": "I'm sorry, but I can't help with that.", "finish_reason": "stop"}, "refusal"),
    ({"text": "As an AI language model, I think", "finish_reason": "stop"}, "refusal"),
    ({"text": "Sorry to hear that! Here is a plan.", "finish_reason": "stop"}, None),
])
def test_bad_outputs_are_named(sample, reason):
    stage = Generate(backend={"model": "unused"})
    assert stage.verdict(sample) == reason


def test_row_kept_when_any_sample_is_usable():
    stage = Generate(backend={"model": "unused"})
    ok = {"completions": [{"rejected": "refusal"}, {"rejected": None}]}
    bad = {"completions": [{"rejected": "refusal"}, {"rejected": "overlong"}, {"rejected": "refusal"}]}
    assert stage.keep(ok) == (True, None) and stage.keep(bad) == (False, "refusal")


def test_synth_evol_end_to_end_and_rerun_generates_nothing(tmp_path, model, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PROMPTS[:3]))
    cfg = {"name": "synth", "method": "evol_instruct", "seeds": str(seeds),
           "backend": {"kind": "transformers", "model": model, "cache": str(tmp_path / "cache.sqlite")},
           "evol_instruct": {"rounds": 1, "gain_check": "embedding", "reject_truncated": False,
                             "evolve_sampling": {"max_tokens": 16, "seed": 1},
                             "response_sampling": {"max_tokens": 16, "seed": 2}},
           "output": {"path": str(tmp_path / "out"), "format": "jsonl"}}
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["synth", str(path)]) == 0
    first = json.loads((tmp_path / "out" / "_synth" / "summary.json").read_text())
    assert first["backend"]["cache_misses"] > 0
    candidates = (tmp_path / "out" / "_synth" / "candidates.jsonl").read_text().splitlines()
    rejected = (tmp_path / "out" / "_synth" / "rejected.jsonl").read_text().splitlines()
    assert len(candidates) + len(rejected) == 3  # one round: every seed either evolved or failed, with a reason
    for line in candidates:
        assert json.loads(line)["meta"]["synth"]["method"] == "evol_instruct"
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert all(s["balanced"] for s in report["stages"])
    assert main(["synth", str(path)]) == 0
    second = json.loads((tmp_path / "out" / "_synth" / "summary.json").read_text())
    assert second["backend"].get("cache_misses", 0) == 0 and second["backend"].get("tokens", 0) == 0
    assert "evol_instruct" in capsys.readouterr().out


@pytest.mark.parametrize("responses", [False, True])
def test_synth_self_instruct_through_the_pipeline(tmp_path, model, monkeypatch, responses):
    """Self-Instruct's rounds on a scripted backend (the test module's), then the Beam job: with
    instances as Conversation rows, or with the bootstrap prompts answered by the `generate` stage."""
    from test_self_instruct import ScriptedBackendForTests, full_script

    import dataflywheel.pipelines.synth as synth

    monkeypatch.setattr(synth, "build_backend", lambda cfg: ScriptedBackendForTests(full_script))
    seeds = Path(__file__).resolve().parent.parent / "dataflywheel" / "data" / "demo" / "seed_tasks.jsonl"
    cfg = synth.SynthConfig.model_validate({
        "method": "self_instruct", "seeds": str(seeds),
        "backend": {"kind": "transformers", "model": model},
        "self_instruct": {"num_instructions": 3, "request_batch_size": 1},
        "responses": {"sampling": {"max_tokens": 8, "seed": 1}, "reject_overlong": False} if responses else None,
        "output": {"path": str(tmp_path / "out"), "format": "jsonl"}})
    summary, report = synth.run_synth(cfg)
    assert all(s.balanced for s in report.stages)
    rows = list(read(str(tmp_path / "out")))
    assert rows and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert {r["meta"]["synth"]["operation"] for r in rows} == {"bootstrap" if responses else "instances"}
    assert summary["candidates"] == (3 if responses else 8)
    assert [s.stage for s in report.stages][1:] == (["generate"] if responses else []) + ["exact_dedup", "minhash_dedup"]


def test_bad_method_option_names_the_file_and_key(tmp_path):
    from dataflywheel.errors import UserError
    from dataflywheel.pipelines.synth import load_synth_config

    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump({"method": "evol_instruct", "seeds": "s.jsonl", "backend": {"model": "m"},
                                    "evol_instruct": {"roundz": 2}, "output": {"path": "o"}}))
    with pytest.raises(UserError, match=r"synth\.yaml: evol_instruct\.roundz: unknown key; allowed: .*rounds"):
        load_synth_config(path)
