"""LoRA through peft (train/lora.py): only adapters train; DPO's reference is the adapter-disabled
base (equal to a separate frozen copy, to 1e-6; no second model loaded); the RM trains its value head
with the adapter; outputs are an adapter peft loads and, on request, a merged model whose logits equal
base + adapter; GRPO's weight sync gets merged weights under the base's names; resume is exact; and
FSDP over 2 processes gathers the adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataflywheel.train import dpo, lora, rm, sft
from dataflywheel.train.data import Lint, pair_examples
from dataflywheel.train.model import load_for_training

pytest.importorskip("peft")
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dataflywheel" / "data" / "demo"
POOL, PREFS = DEMO / "sft_pool.jsonl", DEMO / "prefs.jsonl"
LORA = {"r": 4, "alpha": 8, "merge": True}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(demo_tiny) -> Path:
    return demo_tiny


def loop(**kw) -> dict:
    return {"lr": 1e-2, "batch_size": 2, "max_steps": 3, "progress": False, **kw}


def test_only_adapters_train_and_merged_logits_equal_base_plus_adapter(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = load_for_training(str(tiny), lora=lora.LoraConfig(**LORA), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    summary = sft.run(sft.SftConfig(model=str(tiny), data=[str(POOL)], output=str(tmp_path / "out"), max_length=128,
                                    eval_fraction=0.0, lora=LORA, loop=loop()))
    final = Path(summary["final"])
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(str(tiny))
    adapted = PeftModel.from_pretrained(base, str(final)).eval()  # the adapter loads with peft
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged")).eval()
    ids = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tiny))(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter learned something
    assert torch.allclose(got, want, atol=1e-5)


def test_dpo_reference_is_the_adapter_disabled_base(tiny, tmp_path, monkeypatch):
    """After training moves the adapter, the policy with its adapter off equals a separate frozen copy
    of the base to 1e-6; a live reference with LoRA loads no second model."""
    loads = []
    real = dpo.load_for_training
    monkeypatch.setattr(dpo, "load_for_training", lambda *a, **k: loads.append(a) or real(*a, **k))
    cfg = dpo.DpoConfig(model=str(tiny), data=[str(PREFS)], output=str(tmp_path / "out"), max_length=128,
                        eval_fraction=0.0, reference="live", lora=LORA, loop=loop())
    holder = {}
    real_loop = dpo.train_loop

    def spy(model, *a, **k):
        holder["model"] = model
        return real_loop(model, *a, **k)

    monkeypatch.setattr(dpo, "train_loop", spy)
    summary = dpo.run(cfg)
    assert len(loads) == 1 and summary["steps"] == 3  # the policy only
    policy = holder["model"].eval()
    frozen, tok = load_for_training(str(tiny))
    rows = [json.loads(x) for x in PREFS.read_text().splitlines()][:6]
    batch = dpo.pair_batch(pair_examples(rows, tok, 128, Lint()), tok.pad_token_id)
    with torch.no_grad():
        moved = dpo.pair_logps(policy, batch, 1024)[0]
        ref_c, ref_r = dpo.ref_pair_logps(policy, batch, 1024)
        base_c, base_r, _, _ = dpo.pair_logps(frozen.eval(), batch, 1024)
    assert (moved - base_c).abs().max() > 1e-4  # the adapter is not a no-op any more
    assert torch.allclose(ref_c, base_c, atol=1e-6) and torch.allclose(ref_r, base_r, atol=1e-6)


def test_rm_trains_its_value_head_with_the_adapter(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    summary = rm.run(rm.RmConfig(model=str(tiny), data=[str(PREFS)], output=str(tmp_path / "out"), max_length=128,
                                 eval_fraction=0.0, lora=LORA, loop=loop()))
    final = Path(summary["final"])
    saved = load_file(final / "adapter_model.safetensors")
    assert any("score" in k for k in saved) and any("lora_A" in k for k in saved)
    torch.manual_seed(0)  # the head's init, as rm.run draws it
    init = AutoModelForSequenceClassification.from_pretrained(str(tiny), num_labels=1).score.weight
    merged = AutoModelForSequenceClassification.from_pretrained(str(final / "merged"), num_labels=1)
    assert not torch.allclose(merged.score.weight, init)


def test_merged_weights_for_the_engine_use_the_base_names(tiny):
    model, _ = load_for_training(str(tiny), lora=lora.LoraConfig(**LORA), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter (B starts at zero)
    pairs = dict(lora.merged_weights(model))
    want = lora.merged_model(model).state_dict()
    assert pairs.keys() == want.keys()
    assert all(torch.allclose(pairs[k], want[k]) for k in want)
    assert not any("lora_" in k for n, _ in model.named_parameters() for k in [n] if k in pairs)
    # merging for the sync left the live model as it was (unmerged, adapter on)
    assert all("lora_" not in k for k in pairs) and not any(getattr(m, "merged", False) for m in model.modules())


def test_lora_resume_equals_uninterrupted(tiny, tmp_path):
    def cfg(out: Path, **kw):
        return sft.SftConfig(model=str(tiny), data=[str(POOL)], output=str(out), max_length=128, eval_fraction=0.0,
                             lora=LORA, loop=loop(max_steps=4, **kw))

    from safetensors.torch import load_file

    sft.run(cfg(tmp_path / "straight"))
    assert sft.run(cfg(tmp_path / "split", stop_after=2))["steps"] == 2
    assert sft.run(cfg(tmp_path / "split"))["resumed_from"] == 2
    a = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(600)
def test_lora_under_fsdp_two_processes_equals_one(tiny, tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(name: str, nproc: int | None, **kw) -> dict[str, torch.Tensor]:
        config = tmp_path / f"{name}.yaml"
        config.write_text(json.dumps({"model": str(tiny), "data": [str(POOL)], "max_length": 128, "eval_fraction": 0.0,
                                      "lora": LORA, "loop": loop(**kw), "distributed": {"strategy": "fsdp"}}))
        cmd = [sys.executable, "-m", "dataflywheel.cli", "train", "sft", str(config), "--output", str(tmp_path / name)]
        done = subprocess.run(cmd + (["--nproc", str(nproc)] if nproc else []), env=env, capture_output=True,
                              text=True, timeout=500)
        assert done.returncode == 0, done.stderr[-3000:]
        return load_file(tmp_path / name / "final" / "adapter_model.safetensors")

    one, two = run("one", None, grad_accum=2), run("two", 2)
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 2e-5
    assert (tmp_path / "two" / "final" / "merged" / "model.safetensors").is_file()


def length_reward(rows: list[dict], completions: list[str]) -> list[float]:
    """A reward that varies within every group, so the adapter moves from step 1."""
    return [float(len(c)) for c in completions]


def test_grpo_with_lora_uses_the_base_as_kl_reference(tmp_path, arithmetic_prompts):
    from dataflywheel.train import grpo

    data, model = arithmetic_prompts
    cfg = grpo.GrpoConfig.model_validate({
        "model": str(model), "data": [str(data)], "output": str(tmp_path / "out"), "max_length": 64, "beta": 0.04,
        "num_generations": 4, "verifier": "test_train_lora:length_reward", "max_completion_length": 6,
        "lora": LORA, "loop": loop(batch_size=4)})
    summary = grpo.run(cfg)
    assert summary["steps"] == 3 and (Path(summary["final"]) / "adapter_model.safetensors").is_file()
    steps = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # the KL to the adapter-off base is 0 before the first update and grows once the adapter moves
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7) and steps[-1]["kl"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_without_cuda_is_refused_with_the_reason(tiny):
    from dataflywheel.errors import UserError

    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_for_training(str(tiny), lora=lora.LoraConfig(load_in_4bit=True), seed=0)
