"""The flywheel from a real pretrained chat model (configs/flywheel_smollm2.yaml, shrunk to a
handful of prompts and one round): round 0 is the released model as it is, round 1 samples, verifies,
pools and trains from it, and every count reconciles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dataflywheel.flywheel.config import load_flywheel_config
from dataflywheel.flywheel.rounds import run_rounds
from dataflywheel.flywheel.state import tree_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flywheel_smollm2.yaml"


def test_one_round_from_the_released_model(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLLM2", smollm2)
    data = yaml.safe_load(CONFIG.read_text())
    data["task"].update(seed_rows=8, eval_rows=4)
    data["prompts"]["per_round"] = 4
    data["sampling"].update(n=2, max_tokens=12)
    data["eval"]["pass_at"] = 2
    data["train"].update(steps=2, max_length=64)
    data["train"]["loop"]["batch_size"] = 4
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(data))
    cfg = load_flywheel_config(tmp_path / "small.yaml", {"output": str(tmp_path / "run"), "rounds": 1})
    manifest = run_rounds(cfg, log=lambda _: None)
    r0, r1 = manifest["rounds"]
    assert r0["policy"] == smollm2 and r0["policy_hash"] == tree_hash(smollm2)  # untrained: the model as given
    assert r0["stages"]["train"]["counts"]["trained_steps"] == 0
    assert set(r0["stages"]["eval"]["metrics"]) >= {"accuracy", "pass@2"}
    samples = r1["stages"]["samples"]["counts"]
    assert samples["sample"]["in"] == 4
    for job in samples.values():  # whatever the model says, every row is accounted for
        assert job["in"] == job["kept"] + sum(job["rejected"].values()) + job["dead_letter"]
    train = r1["stages"]["train"]
    assert train["metrics"]["sft"]["steps"] == 2 and train["counts"]["seed"] == 8
    assert r1["policy"] == "round-001/train/sft/final" and (tmp_path / "run" / r1["policy"] / "config.json").is_file()
    assert not list((tmp_path / "run").rglob("checkpoints"))
