"""Training with its output, model and data in buckets, against the loopback servers (fake-gcs-server
for gs://, moto for s3://): the same weights as a local output, uploads ordered so a half-uploaded
checkpoint or final is never taken as complete, and a run killed with SIGKILL resumed on a fresh
machine (an empty cache) from the bucket's checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from object_store import upload
from safetensors.torch import load_file

from dataflywheel.io import fs
from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.train import output as output_mod
from dataflywheel.train import sft
from dataflywheel.train.dpo import DpoConfig, DpoLoop
from dataflywheel.train.dpo import run as run_dpo
from dataflywheel.train.model import load_for_training

REPO = Path(__file__).resolve().parent.parent
POOL = REPO / "dataflywheel" / "data" / "demo" / "sft_pool.jsonl"
PREFS = REPO / "dataflywheel" / "data" / "demo" / "prefs.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """This test's own cache: staging folders and local copies of bucket models land here."""
    monkeypatch.setenv(fs.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("lm"), hidden=32, layers=2, heads=2, vocab_size=600)


def sft_config(model: Path, output: str, **loop) -> dict:
    return {"model": str(model), "data": [str(POOL)], "output": output, "max_length": 128, "eval_fraction": 0.0,
            "loop": {"lr": 1e-3, "batch_size": 2, "max_steps": 4, "progress": False, **loop}}


def final_weights(final: str) -> dict[str, torch.Tensor]:
    return load_file(Path(fs.local_copy(final)) / "model.safetensors")


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(metrics: str) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in map(json.loads, fs.read_text(metrics).splitlines())]


def test_sft_to_a_bucket_equals_local_and_uploads_in_order(bucket, lm, tmp_path, cache, monkeypatch):
    puts: list[str] = []
    real_put = output_mod._put
    monkeypatch.setattr(output_mod, "_put", lambda local, url: (puts.append(url), real_put(local, url)))
    local = sft.run(sft.SftConfig(**sft_config(lm, str(tmp_path / "local"), save_every=1)))
    remote_cfg = sft.SftConfig(**sft_config(lm, f"{bucket}/run", save_every=1))
    remote = sft.run(remote_cfg)

    assert remote_cfg.out.is_relative_to(cache)  # trained in the staging folder, not in a folder named "gs:"
    assert remote["final"] == f"{bucket}/run/final"
    assert same_weights(final_weights(remote["final"]), final_weights(local["final"]))
    assert losses(f"{bucket}/run/metrics.jsonl") == losses(str(tmp_path / "local" / "metrics.jsonl"))
    kept = ["step-0000003", "step-0000004"]  # keep_checkpoints 2: the pruned ones are gone from the bucket too
    assert [name for name, _ in fs.listdir(f"{bucket}/run/checkpoints")] == kept
    assert all(fs.isfile(f"{bucket}/run/checkpoints/{k}/trainer_state.pt") for k in kept)
    assert json.loads(fs.read_text(f"{bucket}/run/summary.json"))["steps"] == 4

    for step in range(1, 5):  # a step folder's state file goes up last, after the metrics
        folder = f"{bucket}/run/checkpoints/step-{step:07d}/"
        mine = [i for i, url in enumerate(puts) if url.startswith(folder)]
        assert puts[mine[-1]] == folder + "trainer_state.pt" and len(mine) > 2
        assert f"{bucket}/run/metrics.jsonl" in puts[mine[-2]:mine[-1]]
    final = [i for i, url in enumerate(puts) if url.startswith(f"{bucket}/run/final/")]
    assert puts[final[-1]] == f"{bucket}/run/final/config.json" and len(final) > 2
    assert puts.index(f"{bucket}/run/summary.json") > final[-1]


def test_kill_9_then_resume_on_a_fresh_machine(bucket, lm, tmp_path):
    """The CLI killed with SIGKILL once a checkpoint is in the bucket; run again with an empty cache,
    it resumes from the bucket's checkpoint (a stray half-uploaded step is not taken) and ends with
    the uninterrupted run's weights and metrics."""
    out = f"{bucket}/run"
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps(sft_config(lm, out, max_steps=24, save_every=2)))
    cmd = [sys.executable, "-m", "dataflywheel.cli", "train", "sft", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env={**env, fs.CACHE_ENV: str(tmp_path / "machine-a")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not fs.exists(f"{out}/checkpoints/step-0000002/trainer_state.pt"):
            assert proc.poll() is None, "the run ended before its first checkpoint reached the bucket"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not fs.exists(f"{out}/final/config.json"), "the run finished before it could be killed"
    fs.write_text(f"{out}/checkpoints/step-9999999/model.safetensors", "half an upload, no state file")

    done = subprocess.run(cmd, env={**env, fs.CACHE_ENV: str(tmp_path / "machine-b")}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {out}/checkpoints/step-" in done.stdout
    assert json.loads(fs.read_text(f"{out}/summary.json"))["resumed_from"] >= 2
    assert "step-9999999" not in {name for name, _ in fs.listdir(f"{out}/checkpoints")}

    straight = sft.run(sft.SftConfig(**sft_config(lm, str(tmp_path / "straight"), max_steps=24, save_every=2)))
    assert same_weights(final_weights(f"{out}/final"), final_weights(straight["final"]))
    assert losses(f"{out}/metrics.jsonl") == losses(str(tmp_path / "straight" / "metrics.jsonl"))  # steps 1..24 once


def test_dpo_with_model_data_and_output_in_a_bucket(bucket, tmp_path):
    texts = [m["content"] for r in map(json.loads, PREFS.read_text().splitlines())
             for k in ("prompt", "chosen", "rejected") for m in r[k]]
    policy = upload(build_tiny_causal_lm(tmp_path / "policy", texts=texts, hidden=32, layers=2, heads=2,
                                         vocab_size=400), f"{bucket}/models/policy")
    data = upload(PREFS, f"{bucket}/data/prefs.jsonl")
    loop = DpoLoop(lr=1e-3, batch_size=4, max_steps=2, save_every=1, progress=False)
    summary = run_dpo(DpoConfig(model=policy, data=[data], output=f"{bucket}/dpo", eval_fraction=0.2,
                                max_length=128, loop=loop))
    assert summary["model"] == policy and summary["ref_forwards"] > 0 and summary["pairs"] > 0
    assert summary["final"] == f"{bucket}/dpo/final" and fs.isfile(f"{bucket}/dpo/final/config.json")
    assert [name for name, _ in fs.listdir(f"{bucket}/dpo/checkpoints")] == ["step-0000001", "step-0000002"]
    assert not fs.exists(f"{bucket}/dpo/ref_logps.sqlite")  # a cache stays on the machine that made it
    trained, _ = load_for_training(summary["final"])  # through the cached local copy, as the next round loads it
    start, _ = load_for_training(policy)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
