"""Lean memory: per-token log-probs (models/label_logps.py) equal the direct computation on the full
logits, values and gradients, for Llama and GPT-2 heads, padded and packed rows, tempered and not,
every chunk size, with a model's logit post-processing (softcap, scale) applied as its forward does;
gradient checkpointing gives the same gradients; bf16 autocast runs on CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dataflywheel.models.label_logps import backbone, label_logps  # noqa: E402
from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_fp32  # noqa: E402
from dataflywheel.train.losses import IGNORE, token_logps  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    folder = build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch=request.param, max_positions=64)
    model, _ = load_fp32(str(folder))
    return model


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = IGNORE  # a prompt
    labels[mask == 0] = IGNORE
    labels[2, 10:13] = IGNORE  # a hole mid-row (a user turn between assistant turns)
    return ids, mask, labels


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_full_logits(model, chunk, temperature):
    ids, mask, labels = _batch(model.config.vocab_size)
    model.zero_grad()
    direct = token_logps(model(input_ids=ids, attention_mask=mask, use_cache=False).logits / temperature, labels)
    (direct * torch.linspace(0.5, 1.5, direct.shape[-1])).sum().backward()  # a weighted loss, as GRPO's
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lean = label_logps(model, labels, temperature=temperature, chunk=chunk, input_ids=ids, attention_mask=mask)
    (lean * torch.linspace(0.5, 1.5, lean.shape[-1])).sum().backward()
    assert lean.shape == direct.shape
    assert torch.allclose(lean, direct, atol=1e-5, rtol=0)
    assert bool((lean[labels[:, 1:] == IGNORE] == 0).all())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], atol=1e-5, rtol=1e-4), name


def test_packed_rows_with_position_ids(model):
    if model.config.model_type != "llama":
        pytest.skip("position_ids restart per document on Llama-style models")
    ids, _, labels = _batch(model.config.vocab_size, seed=1)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(3, -1)
    with torch.no_grad():
        direct = token_logps(model(input_ids=ids, position_ids=positions, use_cache=False).logits, labels)
        lean = label_logps(model, labels, chunk=5, input_ids=ids, position_ids=positions)
    assert torch.allclose(lean, direct, atol=1e-5, rtol=0)


def test_nothing_scored_gives_zeros(model):
    ids, mask, _ = _batch(model.config.vocab_size)
    out = label_logps(model, torch.full_like(ids, IGNORE), input_ids=ids, attention_mask=mask)
    assert out.shape == (3, 23) and bool((out == 0).all())


def test_softcap_and_scale_follow_the_config(model):
    ids, mask, labels = _batch(model.config.vocab_size)
    model.config.final_logit_softcapping, model.config.logit_scale = 2.0, 0.5
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits * 0.5
            direct = token_logps(torch.tanh(logits / 2.0) * 2.0, labels)
            lean = label_logps(model, labels, input_ids=ids, attention_mask=mask)
    finally:
        model.config.final_logit_softcapping, model.config.logit_scale = None, None
    assert torch.allclose(lean, direct, atol=1e-5, rtol=0)


def test_a_model_without_a_backbone_is_named():
    class Bare(torch.nn.Module):
        base_model_prefix = "model"

    with pytest.raises(ValueError, match="Bare has no backbone"):
        backbone(Bare())


def _sft_grads(folder, checkpointing: bool, bf16: bool = False) -> tuple[float, dict]:
    from dataflywheel.train.loop import autocast
    from dataflywheel.train.losses import sft_loss
    from dataflywheel.train.model import load_for_training

    model, _ = load_for_training(str(folder), gradient_checkpointing=checkpointing)
    model.train()
    ids, mask, labels = _batch(model.config.vocab_size)
    with autocast("cpu", bf16):
        total, count = sft_loss(label_logps(model, labels, input_ids=ids, attention_mask=mask), labels)
    (total / count).backward()
    return float(total.detach() / count), {n: p.grad for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    folder = build_tiny_causal_lm(tmp_path / "m", arch="llama", layers=3, max_positions=64)
    loss, plain = _sft_grads(folder, False)
    loss_ckpt, ckpt = _sft_grads(folder, True)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for name, grad in plain.items():
        assert torch.allclose(ckpt[name], grad, atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_on_cpu_runs_close_to_fp32(tmp_path):
    folder = build_tiny_causal_lm(tmp_path / "m", arch="llama", max_positions=64)
    loss, grads = _sft_grads(folder, False)
    loss_bf16, grads_bf16 = _sft_grads(folder, False, bf16=True)
    assert loss_bf16 != loss  # it really ran in bf16 ...
    assert loss_bf16 == pytest.approx(loss, rel=2e-2)  # ... to bf16's ~3 significant digits
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads.values()]),
                                                torch.cat([g.flatten() for g in grads_bf16.values()]), dim=0)
    assert cos > 0.99
