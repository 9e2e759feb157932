"""The portable engine for real: jobs sent to Beam's job service and run by an EXTERNAL worker
pool in other processes (tests/portable_beam.py), so every stage is pickled, shipped and set up in
a worker, and the row accounting comes back as Beam metrics through the job service. Each job
gives the same rows and the same report as on the local FnApiRunner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dataflywheel.cli import main
from dataflywheel.flywheel.config import FlywheelConfig
from dataflywheel.flywheel.rounds import run_rounds
from dataflywheel.io import read
from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.pipelines.config import RunConfig, parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.pipelines.sft import sft_run_config
from dataflywheel.pipelines.web import web_run_config
from dataflywheel.runner import RunnerConfig
from dataflywheel.stages import Scorer
from dataflywheel.stats import RunReport

REPO = Path(__file__).resolve().parent.parent
POOL = REPO / "dataflywheel" / "data" / "demo" / "sft_pool.jsonl"
LOCAL = RunnerConfig()

# A worker that dies (e.g. cannot import a module) leaves its job waiting, not failed: fail fast.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "model", max_positions=512))


def rows(out: Path) -> list[dict]:
    return sorted(read(str(out)), key=lambda r: r["id"])


def counts(report: RunReport) -> list[tuple]:
    """What the report says happened to the rows (times left out)."""
    return [(s.stage, s.rows_in, s.kept, s.rejected, s.dead_letter, s.ids) for s in report.stages]


def on_both(run: RunConfig, tmp: Path, portable: RunnerConfig) -> dict:
    """Run the config's one job locally and on the portable runner, each into its own folder; check
    that both reconcile and agree; return the kept rows and the report by engine."""
    got = {}
    for name, runner in (("local", LOCAL), ("portable", portable)):
        job = run.jobs[0].model_copy(deep=True)
        job.output.path = str(tmp / name)
        report = run_job(job, runner)  # raises ReconcileError when the accounting does not add up
        saved = json.loads((tmp / name / "_report.json").read_text())
        assert all(s["balanced"] for s in saved["stages"]), saved
        got[name] = (rows(tmp / name), report)
    (local, local_report), (port, port_report) = got["local"], got["portable"]
    assert port == local
    assert counts(port_report) == counts(local_report)
    return got


def test_web_curation_over_warc(shared_data, tmp_path, portable_runner):
    """url filter, extract, langid, the quality filters, exact and MinHash dedup over real WARC/ARC
    files, the malformed ones included (their records become dead letters on both engines)."""
    cfg = yaml.safe_load((REPO / "configs" / "web.yaml").read_text())
    cfg["steps"]["extract"] = {"mode": "fast"}
    run = web_run_config(cfg, "web.yaml", inputs=[str(shared_data / "warc_samples")], output=str(tmp_path))
    got = on_both(run, tmp_path, portable_runner)
    kept, report = got["portable"]
    by = {s.stage: s for s in report.stages}
    assert len(kept) > 10 and by["read"].dead_letter > 0
    assert by["langid"].stats and by["minhash_dedup"].rows_in > 0


def test_generate_with_transformers(tmp_path, tiny_model, portable_runner):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(
        ["Name three colours.", "What is two plus two?", "Write a short greeting.", "Describe a cat."])))
    stage = {"stage": "generate", "batch_size": 4, "reject_overlong": False,
             "backend": {"kind": "transformers", "model": tiny_model},
             "sampling": {"n": 2, "temperature": 0.8, "max_tokens": 12, "seed": 3}}
    run = parse_config({"name": "gen", "input": {"paths": str(prompts), "kind": "prompt"}, "stages": [stage],
                        "output": {"path": str(tmp_path), "format": "jsonl"}}, "<test>")
    got = on_both(run, tmp_path, portable_runner)
    kept, report = got["portable"]
    assert len(kept) == 4 and report.stages[-1].stats["tokens_generated"] > 0


def test_sft_selection(tmp_path, tiny_model, portable_runner):
    """IFD and Deita scores with a tiny model, Deita's repr filter on the bundled MiniLM, a mixture:
    model stages set up in the workers, global steps grouped by the job service."""
    cfg = {"name": "sel", "input": {"paths": str(POOL)}, "output": {"path": str(tmp_path), "format": "jsonl"},
           "steps": {"ifd": {"model": tiny_model, "max_ifd": None, "device": "cpu"},
                     "deita_score": {"model": tiny_model, "device": "cpu"}},
           "select": {"method": "deita", "budget": 12},
           "mixture": {"group_by": "source", "strategy": "weights", "budget": 9,
                       "weights": {"code": 1, "math": 1, "general": 1}}}
    got = on_both(sft_run_config(cfg, "sel.yaml"), tmp_path, portable_runner)
    kept, report = got["portable"]
    assert len(kept) == 9 and report.stages[-1].stage == "mixture"


class WorkerPid(Scorer):
    """Stamps each row with the process that scored it."""

    def score(self, rows):
        return [{**r, "meta": {"pid": os.getpid()}} for r in rows]


def lines_job(folder: Path, inputs: str, out: str, stages: list[dict]) -> RunConfig:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in.jsonl").write_text("".join(json.dumps({"id": f"d{i:02d}", "text": f"row {i} " * (i % 7 + 1)}) + "\n"
                                             for i in range(40)))
    return parse_config({"name": "t", "input": {"paths": inputs, "kind": "document", "batch_rows": 8},
                         "stages": stages, "output": {"path": out, "format": "jsonl"}}, "<test>")


def test_stages_run_in_worker_processes(tmp_path, portable_runner):
    run = lines_job(tmp_path, str(tmp_path / "in.jsonl"), str(tmp_path / "out"),
                    [{"stage": "test_portable:WorkerPid"}, {"stage": "length", "min_words": 3}])
    report = run_job(run.jobs[0], portable_runner)
    pids = {r["meta"]["pid"] for r in read(str(tmp_path / "out"))}
    assert len(pids) == 1 and os.getpid() not in pids  # one SDK worker for the job, not this process
    assert report.stages[-1].rejected == {"too_short": 6}


def test_relative_paths_mean_the_launchers_directory(tmp_path, portable_runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = lines_job(tmp_path, "in.jsonl", "out", [{"stage": "length", "min_words": 3}])
    report = run_job(run.jobs[0], portable_runner)
    assert report.stages[0].kept == 40 and len(list(read(str(tmp_path / "out")))) == 34


def test_flywheel_round_with_the_rounds_runner_option(tmp_path, portable_runner):
    """Round 0 and round 1 of the smallest flywheel test config, the Beam stages (samples: generate,
    verify, pairs, best-of-n; curate) on the portable runner through ``rounds --runner``: the
    same outputs, byte for byte, and the same counts as with the local engine."""
    from test_flywheel import TINY

    config = {**TINY, "rounds": 1}
    local = run_rounds(FlywheelConfig.model_validate({**config, "output": str(tmp_path / "local")}), log=lambda _: None)
    (tmp_path / "fw.yaml").write_text(yaml.safe_dump({**config, "output": str(tmp_path / "portable")}))
    (tmp_path / "portable.yaml").write_text(yaml.safe_dump({"runner": portable_runner.model_dump(mode="json")}))
    assert main(["rounds", str(tmp_path / "fw.yaml"), "--runner", str(tmp_path / "portable.yaml")]) == 0
    portable = json.loads((tmp_path / "portable" / "manifest.json").read_text())

    def outcome(manifest: dict) -> list:
        return [(r["round"], r["accuracy"], {name: (s["output"], s["counts"]) for name, s in r["stages"].items()})
                for r in manifest["rounds"]]

    assert outcome(portable) == outcome(local)
    assert portable["rounds"][1]["stages"]["samples"]["counts"]["sample"]["in"] == TINY["prompts"]["per_round"]
