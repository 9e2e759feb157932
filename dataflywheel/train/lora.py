"""LoRA through ``peft`` (docs/training.md#lora): the base weights frozen, low-rank adapters trained.

``lora: {r, alpha, dropout, target_modules}`` wraps the loaded model in a ``PeftModel``; every
algorithm trains it as any model (only the adapters, and for a reward model its value head,
require gradients). What LoRA changes elsewhere:

- DPO's reference is the same model with the adapter disabled (``reference_context``): no second
  copy of the weights in memory, and equal to a frozen copy of the base (tests/test_lora.py);
- checkpoints hold the adapter (and the optimizer's state of the adapter only);
- ``final/`` is the adapter (``PeftModel.from_pretrained(base, final)`` loads it) and, with
  ``merge: true``, ``final/merged`` a standalone model with the adapter folded into the weights;
- GRPO's vLLM engine receives the merged weights under the base model's names.

QLoRA (``load_in_4bit: true``: the frozen base stored in 4-bit NF4, computed in bf16, the adapters
fp32) loads through bitsandbytes and needs CUDA; on a machine without it the setting is refused.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dataflywheel.errors import UserError

ADAPTER_OFF = "adapter-off"  # a reference that is the LoRA policy itself with its adapter disabled (DPO, GRPO)


class LoraConfig(BaseModel):
    """Defaults are peft 0.21's ``LoraConfig`` except ``target_modules``: every linear layer, as the
    QLoRA paper (arXiv 2305.14314) found necessary to match full fine-tuning (peft's default is the
    attention's q and v projections only)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(8, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = False  # also write final/merged: the adapter folded into a standalone model
    load_in_4bit: bool = False  # QLoRA: a 4-bit NF4 base (bitsandbytes, CUDA only)


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UserError("lora needs peft: pip install 'dataflywheel[lora]'") from None
    return peft


def apply(model: Any, cfg: LoraConfig, head: str, seed: int) -> Any:
    """``model`` (fp32) as a ``PeftModel`` with fresh adapters drawn from ``seed`` (the same on every
    rank, and on a re-run: a resumed run's first steps must see the adapters the first run had);
    ``head`` "seq_cls" also trains the value head (peft's SEQ_CLS task keeps the ``score`` head
    trainable and saves it with the adapter)."""
    peft = _peft()
    if cfg.load_in_4bit:  # QLoRA's recipe: norms in fp32, input gradients on for checkpointing
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    task = "SEQ_CLS" if head == "seq_cls" else "CAUSAL_LM"
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type=task,
                             target_modules=cfg.target_modules)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def load_4bit(name: str, head: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """QLoRA's base (arXiv 2305.14314): NF4 weights with double quantization, bf16 compute, on this
    rank's GPU. bitsandbytes' kernels are CUDA only."""
    if not torch.cuda.is_available():
        raise UserError("lora.load_in_4bit (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit kernels); "
                        "on CPU train LoRA on the fp32 base")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("lora.load_in_4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    kw = {"quantization_config": quant, "dtype": torch.bfloat16, "trust_remote_code": trust_remote_code,
          "device_map": {"": torch.cuda.current_device()}}
    model = (AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **kw) if head == "seq_cls"
             else AutoModelForCausalLM.from_pretrained(name, **kw))
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def reference_context(model: Any) -> Any:
    """Inside it, a LoRA model computes as its base (the adapter off); a plain model is unchanged."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's saved names (what ``save_pretrained`` writes)."""
    return _peft().get_peft_model_state_dict(model)


def load_adapter_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    result = _peft().set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"adapter state does not match the model: unexpected {unexpected[:5]}")


@torch.no_grad()
def merged_weights(model: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the base model with the adapter folded in, under the base model's own names
    (``...q_proj.weight``, not ``...q_proj.base_layer.weight``): what a generation engine loads.
    The adapter is merged in place, copied out, and unmerged."""
    base = model.get_base_model()
    model.merge_adapter()
    try:
        out = []
        for name, tensor in base.state_dict().items():
            if "lora_" in name or ".original_module." in name:
                continue
            name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            out.append((name, tensor.detach().clone()))
        return out
    finally:
        model.unmerge_adapter()


def merged_model(model: Any) -> Any:
    """A standalone transformers model: a copy of ``model`` with the adapter merged and peft removed."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
