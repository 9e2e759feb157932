"""Several processes (train/distributed.py) on CPU with gloo, launched as users launch them
(``dataflywheel train ALGO CONFIG --nproc 2``, i.e. torchrun): 2 processes x k micro-batches train
the weights 1 process x 2k micro-batches does, for SFT, RM, DPO and GRPO, with DDP and FSDP2;
a rank killed with SIGKILL mid-run resumes to the uninterrupted run's weights; the gathered final/
loads in transformers; a sharded checkpoint resumes in another world size.

Tolerance: the processes' gradients are summed by an all-reduce instead of accumulated in place,
and divided by (N / W) after DDP's average instead of by N: the same numbers in another rounding
order, ~1e-8 relative. Adam divides each update by sqrt(v), so parameters whose gradients are
~0 amplify that; after a few steps at lr 1e-3 the weights agree to ~1e-6 (measured: see the asserts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dataflywheel" / "data" / "demo"
POOL, PREFS = DEMO / "sft_pool.jsonl", DEMO / "prefs.jsonl"
ATOL = 2e-5  # weights after K steps, N processes vs 1 (module docstring)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny(demo_tiny) -> Path:
    return demo_tiny


def train(algorithm: str, config: dict, out: Path, nproc: int | None = None, *extra: str) -> dict | None:
    """Run the CLI (under torchrun with ``nproc``) and return the run's summary (None: it stopped early)."""
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "dataflywheel.cli", "train", algorithm, str(path), "--output", str(out), *extra]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """final/ as transformers loads it (the gathered folder must load, not only exist)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = json.loads((out / "final" / "config.json").read_text())
    cls = AutoModelForSequenceClassification if config["architectures"][0].endswith("SequenceClassification") \
        else AutoModelForCausalLM
    return {k: v.detach() for k, v in cls.from_pretrained(str(out / "final")).state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"max abs difference {worst:.2e}"
    return worst


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def sft_config(tiny: Path, grad_accum: int, **kw) -> dict:
    return {"model": str(tiny), "data": [str(POOL)], "max_length": 128, "eval_fraction": 0.1,
            "loop": {"lr": 1e-3, "batch_size": 2, "grad_accum": grad_accum, "max_steps": 4, "progress": False}, **kw}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sft_two_processes_equal_one(tiny, tmp_path, strategy):
    one = train("sft", sft_config(tiny, 2), tmp_path / "one")
    two = train("sft", sft_config(tiny, 1, distributed={"strategy": strategy}), tmp_path / "two", 2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert_same(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_two_processes_equal_one_and_split_the_reference(tiny, tmp_path, strategy):
    cfg = {"model": str(tiny), "data": [str(PREFS)], "max_length": 128, "eval_fraction": 0.2, "eval_batch_size": 4,
           "loop": {"lr": 1e-3, "batch_size": 2, "max_steps": 3, "progress": False}}
    one = train("dpo", {**cfg, "loop": {**cfg["loop"], "grad_accum": 2}}, tmp_path / "one")
    two = train("dpo", {**cfg, "distributed": {"strategy": strategy}}, tmp_path / "two", 2)
    # each rank ran half the reference batches (rounded up), and the gathered values train the same
    assert two["ref_forwards"] == -(-one["ref_forwards"] // 2)
    assert losses(tmp_path / "two")[0] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert_same(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))


def test_rm_two_processes_equal_one(tiny, tmp_path):
    cfg = {"model": str(tiny), "data": [str(PREFS)], "max_length": 128, "eval_fraction": 0.2,
           "loop": {"lr": 1e-3, "batch_size": 2, "max_steps": 3, "progress": False}}
    one = train("rm", {**cfg, "loop": {**cfg["loop"], "grad_accum": 2}}, tmp_path / "one")
    two = train("rm", cfg, tmp_path / "two", 2)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert two["eval_accuracy"] == one["eval_accuracy"]
    assert_same(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))


def test_grpo_two_processes_split_the_rollout_and_equal_one(tmp_path, arithmetic_prompts):
    data, model = arithmetic_prompts
    cfg = {"model": str(model), "data": [str(data)], "max_length": 64, "num_generations": 4,
           "verifier": "dataflywheel.flywheel.tasks.arithmetic:reward", "max_completion_length": 6,
           "prompts_per_step": 2, "beta": 0.04, "loop": {"lr": 1e-3, "batch_size": 4, "max_steps": 3, "progress": False}}
    train("grpo", cfg, tmp_path / "one")
    two = train("grpo", cfg, tmp_path / "two", 2)
    assert two["world_size"] == 2
    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):  # the same samples (seeded per prompt), so the same rewards and lengths
        assert (y["reward"], y["completion_length"]) == pytest.approx((x["reward"], x["completion_length"]))
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-7)
    assert_same(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))


def test_kill_9_one_rank_then_resume_equals_uninterrupted(tiny, tmp_path):
    """SIGKILL to one rank after the 2nd sharded checkpoint: torchrun takes the job down; the re-run
    resumes from the sharded checkpoint to the uninterrupted run's weights, bit for bit."""
    cfg = sft_config(tiny, 1, distributed={"strategy": "fsdp"})
    cfg["loop"] |= {"max_steps": 10, "save_every": 2}
    train("sft", cfg, tmp_path / "straight", 2)
    killed = tmp_path / "killed"
    path = tmp_path / "killed.yaml"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "dataflywheel.cli", "train", "sft", str(path), "--output",
                             str(killed), "--nproc", "2"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "checkpoints").glob("step-0000004")):
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "torch.distributed.run" in " ".join(p.parent().cmdline())]  # torchrun's workers
    assert len(ranks) == 2, "no worker processes found"
    os.kill(ranks[-1].pid, signal.SIGKILL)  # one rank, not the launcher
    proc.wait(timeout=120)
    assert proc.returncode != 0 and not (killed / "final").exists(), "the run finished before it could be killed"
    resumed = train("sft", cfg, killed, 2)
    assert resumed["resumed_from"] >= 4
    a, b = final_weights(tmp_path / "straight"), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(killed) == losses(tmp_path / "straight")


def test_sharded_checkpoint_resumes_in_one_process(tiny, tmp_path):
    cfg = sft_config(tiny, 1, distributed={"strategy": "fsdp"})
    train("sft", cfg, tmp_path / "straight", 2)
    first = tmp_path / "split"
    path = tmp_path / "split.yaml"
    path.write_text(json.dumps(cfg))
    train("sft", cfg, first, 2, "--stop-after", "2")
    assert (first / "checkpoints" / "step-0000002" / "sharded").is_dir()
    # one process, two micro-batches per step: the same rows per step as 2 x 1
    one = {**cfg, "loop": {**cfg["loop"], "grad_accum": 2}}
    summary = train("sft", one, first)
    assert summary["resumed_from"] == 2 and summary["world_size"] == 1
    assert_same(final_weights(tmp_path / "straight"), final_weights(first))
    assert load_file(first / "final" / "model.safetensors")  # one gathered safetensors file
