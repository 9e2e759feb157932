"""The flywheel driver (docs/flywheel.md#resumable): stage markers, resume after kill -9, invalidation, lock, plateau.

Real parts: a tiny Llama trained here, the real pairs and select pipelines on the FnApiRunner, real
files. The verifier is a permissive regex (any answer with a digit passes) so that even a model
trained for a few steps fills the pool and the pairs, and every stage has rows to carry.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import untrained_reward_model

from dataflywheel.errors import UserError
from dataflywheel.flywheel.config import FlywheelConfig
from dataflywheel.flywheel.rounds import plateaued, run_rounds
from dataflywheel.flywheel.state import lock_run, run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "name": "tiny", "seed": 0, "rounds": 2,
    "task": {"seed_rows": 40, "eval_rows": 16, "width": 1, "seed_digits": [1, 1], "eval_digits": [1, 1]},
    "prompts": {"per_round": 12, "verifier": "regex_match"},
    "policy": {"tiny": {"hidden": 32, "layers": 1, "heads": 2, "vocab_size": 300, "split_digits": True},
               "steps": 30},
    "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 4},
    "scorers": [{"stage": "verify", "verifier": "regex_match", "options": {"pattern": "[0-9]"}}],
    "batch_size": 32,
    "train": {"steps": 4, "algorithm": "sft+dpo", "dpo_steps": 2},
    "curate": {"select": "random", "budget": 6},
}


def _config(tmp: Path, **over) -> FlywheelConfig:
    return FlywheelConfig.model_validate({**TINY, "output": str(tmp / "run"), **over})


def _outputs(run: Path) -> dict:
    """What a run produced: every stage's output hash, per round (the resume contract)."""
    manifest = json.loads((run / "manifest.json").read_text())
    return {r["round"]: {s: m["output"] for s, m in r["stages"].items()} for r in manifest["rounds"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("flywheel-ref")
    manifest = run_rounds(_config(tmp), log=lambda _: None)
    return tmp / "run", manifest


def test_run_writes_every_stage_and_a_manifest(reference):
    run, manifest = reference
    assert [r["round"] for r in manifest["rounds"]] == [0, 1, 2]
    r1 = manifest["rounds"][1]
    assert list(r1["stages"]) == ["prompts", "samples", "pool", "curate", "train", "eval"]
    samples = r1["stages"]["samples"]["counts"]
    assert samples["sample"]["in"] == 12
    for job in samples.values():  # every pipeline job reconciles
        assert job["in"] == job["kept"] + sum(job["rejected"].values()) + job["dead_letter"]
    pool1, pool2 = (manifest["rounds"][k]["stages"]["pool"]["counts"] for k in (1, 2))
    assert pool1["pool"] > 0 and pool2["pool"] >= pool1["pool"]  # the pool keeps earlier rounds
    assert manifest["rounds"][2]["stages"]["curate"]["counts"]["kept"] == 6  # the random budget
    train = r1["stages"]["train"]
    assert train["counts"]["pool"] == 6 and "dpo" in train["metrics"]
    assert manifest["rounds"][2]["policy"] == "round-002/train/dpo/final"  # run-relative
    for k in range(3):
        assert (run / f"round-{k:03d}" / "manifest.json").is_file()
        assert 0.0 <= manifest["rounds"][k]["accuracy"] <= 1.0
    assert manifest["exports"]["sft_pool"] == "round-002/pool/rows"
    assert not list(run.rglob("checkpoints"))  # a finished training stage needs no resume state


def test_rerun_skips_every_stage(reference, tmp_path):
    run, manifest = reference
    again = run_rounds(_config(run.parent), log=lambda _: None)
    assert all(m["skipped"] for r in again["rounds"] for m in r["stages"].values())
    assert _outputs(run) == {r["round"]: {s: m["output"] for s, m in r["stages"].items()} for r in manifest["rounds"]}


def test_changed_input_reruns_that_stage_and_everything_after(reference, tmp_path):
    import shutil

    run, _ = reference
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    lines = []
    # Another curation budget: round 1's curate re-runs, and so must train/eval and all of round 2
    # after it; the samples and pool before it must not.
    run_rounds(_config(tmp_path, curate={"select": "random", "budget": 4}), log=lines.append)
    ran = [line.split(":")[0] for line in lines if line.endswith("running")]
    assert ran[:3] == ["round-001/curate", "round-001/train", "round-001/eval"]  # not prompts, samples, pool
    # Round 2 samples from the new policy, so it re-runs from there (its prompts do not depend on round 1).
    # A stage whose inputs come out byte-identical is skipped: the pool when the samples did not change.
    assert ran[3] == "round-002/samples" and ran[-2:] == ["round-002/train", "round-002/eval"]
    assert "round-002/prompts" not in ran


def _cli(tmp: Path, cfg: dict) -> list[str]:
    path = tmp / "flywheel.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "dataflywheel.cli", "rounds", str(path)]


def _kill_when(cmd: list[str], marker: Path, env: dict) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``marker`` exists (mid-stage)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, f"finished before {marker.name} appeared"
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_anywhere_then_rerun_equals_uninterrupted(reference, tmp_path):
    run, _ = reference
    cfg = {**TINY, "output": str(tmp_path / "run")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = _cli(tmp_path, cfg)
    out = tmp_path / "run"
    _kill_when(cmd, out / "round-001" / "samples.started.json", env)  # inside a Beam stage
    _kill_when(cmd, out / "round-002" / "train" / "sft" / "checkpoints", env)  # inside training
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out accuracy by round" in done.stdout
    assert _outputs(out) == _outputs(run)


def test_lock_refuses_a_second_writer(tmp_path):
    held = lock_run(tmp_path)
    try:
        with pytest.raises(UserError, match="locked by pid"):
            lock_run(tmp_path)
    finally:
        held.close()
    lock_run(tmp_path).close()  # released: the next writer gets it


def test_round_k_runs_only_up_to_k(tmp_path):
    manifest = run_rounds(_config(tmp_path), only_round=0, log=lambda _: None)
    assert [r["round"] for r in manifest["rounds"]] == [0]
    assert not (tmp_path / "run" / "round-001").exists()


def test_resumable_stage_keeps_partial_work_only_for_the_same_inputs(tmp_path):
    calls = []

    def work(out: str) -> dict:
        calls.append(sorted(p.name for p in Path(out).iterdir()))
        (Path(out) / "part").write_text("x")
        raise RuntimeError("killed")

    for inputs in ({"a": 1}, {"a": 1}, {"a": 2}):
        with pytest.raises(RuntimeError):
            run_stage(tmp_path, "train", inputs, work, resumable=True, log=lambda _: None)
    assert calls == [[], ["part"], []]  # same inputs: resumed; new inputs: a clean folder


def test_plateau_rule():
    assert not plateaued([0.1, 0.2, 0.3], patience=1, min_delta=0.01)
    assert plateaued([0.1, 0.3, 0.305], patience=1, min_delta=0.01)
    assert not plateaued([0.1, 0.3, 0.29, 0.5], patience=2, min_delta=0.01)
    assert plateaued([0.1, 0.3, 0.29, 0.3], patience=2, min_delta=0.01)
    assert not plateaued([0.5], patience=1, min_delta=0.0)


def test_config_errors_name_the_key(tmp_path):
    from dataflywheel.flywheel.config import load_flywheel_config

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output": "x", "sampling": {"n": 1}}))
    with pytest.raises(UserError, match="sampling.n must be >= 2"):
        load_flywheel_config(path)
    path.write_text(yaml.safe_dump({**TINY, "output": "x", "train": {"steps": 0}}))
    with pytest.raises(UserError, match=r"bad.yaml: train.steps"):
        load_flywheel_config(path)
    path.write_text(yaml.safe_dump({**TINY, "output": "x", "task": {**TINY["task"], "template": "{a} {x} {b}"}}))
    with pytest.raises(UserError, match=r"bad.yaml: task: .*only \{a\}, \{op\} and \{b\}"):
        load_flywheel_config(path)
    path.write_text(yaml.safe_dump({**TINY, "output": "x", "policy": {**TINY["policy"], "steps": 0}}))
    with pytest.raises(UserError, match=r"bad.yaml: policy: .*give it steps >= 1"):
        load_flywheel_config(path)


def test_dataflow_dry_run_builds_the_rounds_pipelines(tmp_path):
    pytest.importorskip("apitools", reason="needs apache-beam[gcp]")
    from dataflywheel.flywheel.rounds import dry_run_round

    dataflow = {"project": "dummy-proj", "temp_location": "gs://dummy-bucket/tmp", "gpu_type": "nvidia-l4"}
    cfg = _config(tmp_path, runner={"engine": "dataflow", "dataflow": dataflow},
                  curate={"select": "ifd", "budget": 6})
    graphs = dry_run_round(cfg, 1)
    assert sorted(graphs) == ["tiny-curate1", "tiny-round1-best_of_n", "tiny-round1-pairs", "tiny-round1-sample"]
    names = {job: {t.unique_name for t in g.components.transforms.values()} for job, g in graphs.items()}
    for job, stages in {"tiny-round1-sample": ["generate", "verify"], "tiny-round1-pairs": ["pairs"],
                        "tiny-round1-best_of_n": ["best_of_n"], "tiny-curate1": ["exact_dedup", "ifd", "select_top"]}.items():
        for stage in stages:
            assert any(f"Stage[{stage}]" in n for n in names[job]), (job, stage)
    assert not (tmp_path / "run").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_round_trains_with_dpo_alone_or_grpo(tmp_path, algorithm):
    over = {"rounds": 1, "train": {"steps": 3, "algorithm": algorithm, "dpo_steps": 2, "grpo": {"prompts_per_step": 2}}}
    manifest = run_rounds(_config(tmp_path, **over), log=lambda _: None)
    train = manifest["rounds"][1]["stages"]["train"]
    assert algorithm in train["metrics"] and "sft" not in train["metrics"]  # no SFT before it
    assert manifest["rounds"][1]["policy"] == f"round-001/train/{algorithm}/final"
    assert train["output"] != manifest["rounds"][0]["stages"]["train"]["output"]  # the weights moved


def test_reward_model_refresh_from_west_of_n_pairs(tmp_path):
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    base = build_tiny_causal_lm(tmp_path / "lm", hidden=32, layers=1, heads=2, vocab_size=300)
    untrained_reward_model(base, tmp_path / "rm")
    over = {"rounds": 2, "scorers": [{"stage": "reward_model", "model": str(tmp_path / "rm"), "device": "cpu"}],
            "pool": {"field": "reward", "min_score": -1e9}, "rm_refresh": {"steps": 2, "batch_size": 4}}
    manifest = run_rounds(_config(tmp_path, **over), log=lambda _: None)
    r1, r2 = manifest["rounds"][1], manifest["rounds"][2]
    assert r1["stages"]["rm"]["counts"]["pairs"] > 0
    assert r1["rm"] == "round-001/rm/train/final" and r2["rm"] == "round-002/rm/train/final"
    assert r1["rm_hash"] != r2["rm_hash"]  # refreshed again, from round 1's model
    scored = next((tmp_path / "run" / "round-002" / "samples" / "scored").glob("part-*")).read_text()
    assert "round-001/rm/train/final" in scored  # round 2 scored with round 1's refreshed model


def test_run_command_takes_a_round_config(tmp_path):
    from dataflywheel.cli import main

    path = tmp_path / "fw.yaml"
    path.write_text(yaml.safe_dump({**TINY, "rounds": 0, "output": str(tmp_path / "run")}))
    assert main(["run", str(path)]) == 0
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["rounds"][0]["round"] == 0


def test_each_round_stage_is_one_tracker_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    track = {"report_to": ["tensorboard"], "progress": False}
    over = {"rounds": 1, "policy": {**TINY["policy"], "loop": track},
            "train": {**TINY["train"], "loop": track, "dpo_loop": track}}
    run_rounds(_config(tmp_path, **over), log=lambda _: None)
    runs = {str(p.parent.relative_to(tmp_path / "run")): p for p in (tmp_path / "run").rglob("events.out.tfevents.*")}
    assert set(runs) == {"round-000/train/sft/tensorboard/run/round-000/sft",
                         "round-001/train/sft/tensorboard/run/round-001/sft",
                         "round-001/train/dpo/tensorboard/run/round-001/dpo"}
    events = EventAccumulator(str(runs["round-001/train/dpo/tensorboard/run/round-001/dpo"].parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]  # dpo_steps
