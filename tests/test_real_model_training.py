"""Training from a real pretrained chat model (SmolLM2-135M-Instruct, 49,152-token vocabulary): SFT,
the reward model, DPO and GRPO each run a few steps on a learnable slice and move the right way;
DPO starts at ln 2; a training run killed with SIGKILL resumes to bit-identical weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataflywheel.train import dpo, grpo, rm, sft

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["apple", "river", "candle", "violet", "marble", "anchor"]
VERIFIER = Path(__file__).parent / "stages_for_tests.py"


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _sft_rows() -> list[dict]:
    """Six chats with one answer pattern to learn: 'Code <word>: <word> <word>.'"""
    return [{"id": f"s{i}", "messages": [{"role": "user", "content": f"Give the code for {w}."},
                                         {"role": "assistant", "content": f"Code {w}: {w} {w} {w}."}]}
            for i, w in enumerate(WORDS)]


def _pref_rows() -> list[dict]:
    """Chosen answers say the word, rejected ones do not: a preference a few steps can pick up."""
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Repeat the word {w}."}],
             "chosen": [{"role": "assistant", "content": f"{w}"}],
             "rejected": [{"role": "assistant", "content": "I cannot do that."}]} for i, w in enumerate(WORDS)]


def test_sft_lowers_the_loss(smollm2, tmp_path):
    data = _write(tmp_path / "sft.jsonl", _sft_rows())
    cfg = sft.SftConfig(model=smollm2, data=[data], output=str(tmp_path / "out"), max_length=64, eval_fraction=0.0,
                        loop={"lr": 1e-4, "batch_size": 6, "max_steps": 4, "progress": False})
    assert sft.run(cfg)["steps"] == 4
    losses = [m["loss"] for m in _metrics(tmp_path / "out")]
    assert losses[-1] < 0.7 * losses[0], losses


def test_reward_model_learns_the_preference(smollm2, tmp_path):
    data = _write(tmp_path / "prefs.jsonl", _pref_rows())
    cfg = rm.RmConfig(model=smollm2, data=[data], output=str(tmp_path / "out"), max_length=64, eval_fraction=0.0,
                      loop={"lr": 1e-4, "batch_size": 6, "max_steps": 4, "progress": False})
    rm.run(cfg)
    lines = _metrics(tmp_path / "out")
    assert lines[-1]["loss"] < lines[0]["loss"], [m["loss"] for m in lines]


def test_dpo_starts_at_ln2_and_lowers_the_loss(smollm2, tmp_path):
    data = _write(tmp_path / "prefs.jsonl", _pref_rows())
    cfg = dpo.DpoConfig(model=smollm2, data=[data], output=str(tmp_path / "out"), max_length=64, eval_fraction=0.0,
                        loop={"lr": 5e-5, "batch_size": 6, "max_steps": 4, "progress": False})
    dpo.run(cfg)
    lines = _metrics(tmp_path / "out")
    assert abs(lines[0]["loss"] - math.log(2)) < 1e-6  # the reference is the policy at step 0
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.05 and lines[-1]["rewards/margins"] > 0, lines[-1]


def test_grpo_raises_the_reward(smollm2, tmp_path):
    """Reward: 1 for a reply of at most three words. The model's replies are long; a few steps shorten them."""
    prompts = [{"id": f"g{i}", "prompt": [{"role": "user", "content": f"Say the word {w}."}]} for i, w in enumerate(WORDS)]
    data = _write(tmp_path / "prompts.jsonl", prompts)
    cfg = grpo.GrpoConfig(model=smollm2, data=[data], output=str(tmp_path / "out"), max_length=96,
                          verifier=f"{VERIFIER}:short_reply", num_generations=6, max_completion_length=12,
                          prompts_per_step=2, loop={"lr": 2e-5, "batch_size": 12, "max_steps": 6, "progress": False})
    grpo.run(cfg)
    rewards = [m["reward"] for m in _metrics(tmp_path / "out")]
    assert sum(rewards[-2:]) > sum(rewards[:2]), rewards


def test_kill_9_then_resume_is_bit_identical(smollm2, tmp_path):
    data = _write(tmp_path / "sft.jsonl", _sft_rows())
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({"model": smollm2, "data": [data], "max_length": 64, "eval_fraction": 0.0,
                                  "loop": {"lr": 1e-4, "batch_size": 3, "max_steps": 4, "save_every": 1}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dataflywheel.cli", "train", "sft", str(config)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--output", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not list((killed / "checkpoints").glob("step-*")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((killed / "checkpoints").glob("step-*")) and not (killed / "final").exists()
    subprocess.run([*cmd, "--output", str(killed)], env=env, check=True, capture_output=True)
    subprocess.run([*cmd, "--output", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    a = load_file(killed / "final" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in _metrics(killed)][-2:] == [m["loss"] for m in _metrics(tmp_path / "straight")][-2:]
