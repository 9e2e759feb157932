"""The training loop: accumulation k == batch k (uneven tokens per micro-batch), exact resume (in
process and after kill -9 of the CLI), the learning-rate schedule."""

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

from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.train.config import LoopConfig
from dataflywheel.train.data import Example
from dataflywheel.train.distributed import Calls
from dataflywheel.train.loop import LossOut, accumulate, index_plan, lr_factor
from dataflywheel.train.losses import IGNORE, sft_loss, token_logps
from dataflywheel.train.model import load_for_training
from dataflywheel.train.pack import collate_padded
from dataflywheel.train.sft import SftConfig, run

REPO = Path(__file__).resolve().parent.parent
POOL = REPO / "dataflywheel" / "data" / "demo" / "sft_pool.jsonl"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("lm"), hidden=64, layers=2)


def _loss_fn(model, batch):
    batch = dict(batch)
    labels, _ = batch.pop("labels"), batch.pop("num_tokens")
    total, count = sft_loss(token_logps(model(**batch, use_cache=False).logits, labels), labels)
    return LossOut(total, float(count))


def _grads(model, micro_batches):
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    accumulate(Calls(model), micro_batches, _loss_fn, params)
    return [p.grad.clone() for p in params]


def test_accumulation_equals_one_batch_with_uneven_tokens(folder):
    model, _ = load_for_training(str(folder))
    g = torch.Generator().manual_seed(0)
    # target counts per row differ ~20x, so micro-batches of 2 rows hold very different token counts
    rows = []
    for i, (length, trained) in enumerate([(60, 50), (12, 2), (40, 3), (70, 65), (9, 6), (33, 30), (50, 1), (20, 15)]):
        ids = torch.randint(4, 300, (length,), generator=g).tolist()
        rows.append(Example(str(i), ids, [IGNORE] * (length - trained) + ids[length - trained:]))
    whole = _grads(model, [collate_padded(rows, 0)])
    accumulated = _grads(model, [collate_padded(rows[i:i + 2], 0) for i in range(0, 8, 2)])
    for a, b in zip(whole, accumulated):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # the bug this prevents (trl#2175): averaging per-micro-batch means gives another gradient
    model.zero_grad(set_to_none=True)
    for i in range(0, 8, 2):
        batch = dict(collate_padded(rows[i:i + 2], 0))
        labels, _ = batch.pop("labels"), batch.pop("num_tokens")
        s, c = sft_loss(token_logps(model(**batch, use_cache=False).logits, labels), labels)
        (s / c / 4).backward()
    naive = [p.grad for p in model.parameters() if p.requires_grad]
    assert max(float((a - b).abs().max()) for a, b in zip(whole, naive)) > 1e-3


def test_index_plan_is_a_function_of_the_step_and_covers_each_epoch():
    plan = index_plan(10, batch_size=2, grad_accum=2, seed=3)
    first_epoch = [i for s in range(3) for mb in plan(s) for i in mb][:10]
    assert sorted(first_epoch) == list(range(10))
    assert plan(7) == index_plan(10, 2, 2, 3)(7)


def test_index_plan_deals_a_steps_micro_batches_round_the_ranks():
    """W ranks with k micro-batches each see the rows 1 process with k x W sees, each once."""
    one = index_plan(13, batch_size=2, grad_accum=6, seed=5, shard=(0, 1))
    ranks = [index_plan(13, batch_size=2, grad_accum=2, seed=5, shard=(r, 3)) for r in range(3)]
    for step in range(5):
        dealt = [ranks[m % 3](step)[m // 3] for m in range(6)]
        assert dealt == one(step)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = LoopConfig(warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def _cfg(folder, out, **loop):
    return SftConfig(model=str(folder), data=[str(POOL)], output=str(out), max_length=128, eval_fraction=0.0,
                     loop={"lr": 1e-3, "batch_size": 2, "grad_accum": 2, "max_steps": 6, "progress": False, **loop})


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def test_resume_in_process_gives_the_same_weights(folder, tmp_path):
    run(_cfg(folder, tmp_path / "straight"))
    first = run(_cfg(folder, tmp_path / "split", stop_after=3))
    assert "final" not in first and first["steps"] == 3
    second = run(_cfg(folder, tmp_path / "split"))
    assert second["steps"] == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))
    assert [x["loss"] for x in lines] == [x["loss"] for x in straight]


def test_kill_9_then_resume_equals_uninterrupted(folder, tmp_path):
    """The CLI killed with SIGKILL after its 2nd checkpoint resumes to the uninterrupted weights."""
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({"model": str(folder), "data": [str(POOL)], "max_length": 128, "eval_fraction": 0.0,
                                  "loop": {"lr": 1e-3, "batch_size": 2, "max_steps": 16, "save_every": 2}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dataflywheel.cli", "train", "sft", str(config)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--output", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "checkpoints").glob("step-*"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    subprocess.run([*cmd, "--output", str(killed)], env=env, check=True, capture_output=True)
    subprocess.run([*cmd, "--output", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    a, b = _weights(killed), _weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chat_template_override_is_trained_with_and_saved(folder, tmp_path):
    from transformers import AutoTokenizer

    template = "{#- the config's override -#}" + AutoTokenizer.from_pretrained(str(folder)).chat_template
    cfg = _cfg(folder, tmp_path / "tpl", max_steps=1)
    cfg.chat_template = template
    run(cfg)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tpl" / "final")).chat_template == template
