"""TRL as the peer of our training loop: SFT and DPO on the same model folder, data and settings.

Helpers for ``benchmarks/train_sft.py`` and ``benchmarks/train_dpo.py`` (no BENCH lines here).
They reproduce the TRL setup of docs/sources.md#trl-peer-figures (TRL 1.16.0, transformers 5.23, torch 2.13 CPU),
except that gradient checkpointing is OFF: our loop has none, so TRL's default (on) would make
the comparison measure recomputation rather than the trainers. fp32 on CPU (TRL's ``bf16``
defaults to True when fp16 is unset, which would autocast to bf16 on CPU: turned off here), bf16
autocast only on CUDA, as our loop does. No eval, no saving, dropout off, logging every step.

Each run returns per-step wall time (the interval between consecutive optimizer steps, so data
loading, collation and logging are included, as in our loop), per-step loss (TRL's logged loss,
unrounded) and per-step token counts taken from the batches TRL's own collator built.

``trl`` is a benchmark-only dependency: ``pip install trl==1.16.0`` (it needs accelerate and datasets).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Nothing may be fetched from a hub, and TRL's telemetry ping stays off. Set before transformers loads.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
             "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_var, "1")

DATA = Path(os.environ.get("DATAFLYWHEEL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SFT_DATA = DATA / "alpaca_subset"  # instruction/input/output rows -> user + assistant turns (records.py)
PAIRS_DATA = DATA / "hh_rlhf"  # HH-RLHF transcripts -> explicit prompt/chosen/rejected (records.py)
LN2 = math.log(2.0)  # DPO loss at step 0 when policy == reference (ln 2; docs/sources.md#dpo)
# A live reference sees the step's own batch, so its log-probs are bit-identical to the policy's and
# the loss is ln 2 to fp32 precision. The precompute pass batches pairs unshuffled, so padding and
# summation order differ from training's: sums of ~1e3 nats then differ by ~1e-4, moving the loss
# by ~1e-6. A real reference bug (e.g. missing ref log-probs read as 0, trl PR #5563) is far larger.
LN2_TOL = 1e-4


# ----------------------------------------------------------------------------- data


def _load(folder: Path, kind: str, n: int) -> list[dict] | None:
    """The first ``n`` valid rows of ``kind`` under ``folder`` (files in sorted order); None when absent."""
    if not folder.is_dir():
        return None
    from dataflywheel.io import DeadLetter, read

    rows: list[dict] = []
    for row in read(str(folder), kind=kind):
        if isinstance(row, DeadLetter):  # rows the validator rejects are not ours to fix here
            continue
        rows.append(row)
        if len(rows) >= n:
            break
    return rows


def load_sft_rows(n: int) -> list[dict] | None:
    """``n`` conversations ``{"messages": [...]}`` from the shared Alpaca subset, or None without the data."""
    rows = _load(SFT_DATA, "conversation", n)
    return None if rows is None else [{"messages": r["messages"]} for r in rows]


def load_pairs(n: int) -> list[dict] | None:
    """``n`` pairs in TRL's conversational explicit-prompt form from HH-RLHF, or None without the data."""
    rows = _load(PAIRS_DATA, "preference", n)
    return None if rows is None else [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


def corpus_text(sft_rows: Iterable[dict] = (), pairs: Iterable[dict] = ()) -> list[str]:
    """Every message content of the rows: the text a tiny model's tokenizer is trained on."""
    texts = [m["content"] for r in sft_rows for m in r["messages"]]
    for p in pairs:
        texts += [m["content"] for key in ("prompt", "chosen", "rejected") for m in p[key]]
    return texts


# ----------------------------------------------------------------------------- instrumentation


def _callback_class() -> type:
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        """Wall time between optimizer steps, compute time within a step, and every logged metric."""

        def __init__(self) -> None:
            self.step_times: list[float] = []
            self.compute_times: list[float] = []
            self.logs: list[dict] = []
            self._last = self._begin = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            # fires after the step's micro-batches were fetched and collated (Trainer prefetches them)
            self._begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_times.append(now - self._last)
            self.compute_times.append(now - self._begin)
            self._last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # the end-of-training summary has train_loss, not loss
                self.logs.append(dict(logs))

    return StepRecorder


class _CountingCollator:
    """Wraps TRL's collator to count, per micro-batch, the tokens of the batch it really built.

    ``counter(batch, n_examples) -> (tokens, targets, slots)``. Micro-batches arrive in training
    order, so micro-batch i belongs to step i // grad_accum (a look-ahead fetch at the end is cut off).
    """

    def __init__(self, inner: Callable, counter: Callable[[dict, int], tuple[int, int, int]]) -> None:
        self.inner, self.counter, self.counts = inner, counter, []

    def __call__(self, examples: list) -> dict:
        batch = self.inner(examples)
        self.counts.append(self.counter(batch, len(examples)))
        return batch


def _per_step(counts: list[tuple[int, int, int]], grad_accum: int, steps: int) -> list[tuple[int, int, int]]:
    counts = counts[: grad_accum * steps]
    return [
        tuple(sum(c[j] for c in counts[i : i + grad_accum]) for j in range(3))  # type: ignore[misc]
        for i in range(0, len(counts), grad_accum)
    ]


def _sft_counter(max_length: int) -> Callable[[dict, int], tuple[int, int, int]]:
    def count(batch: dict, n_examples: int) -> tuple[int, int, int]:
        labels, ids = batch["labels"], batch["input_ids"]
        targets = int((labels[..., 1:] != -100).sum())  # shifted targets: the count TRL divides by
        if "attention_mask" in batch:  # padded: rows x the longest row of the batch
            return int(batch["attention_mask"].sum()), targets, int(ids.numel())
        # padding-free: one flattened row of real tokens; the slots are the packs' capacity
        return int(ids.numel()), targets, n_examples * max_length

    return count


def _dpo_counts(batch: dict, n_examples: int) -> tuple[int, int, int]:
    # chosen rows then rejected rows, right-padded; completion tokens are the summed log-prob terms
    return int(batch["attention_mask"].sum()), int(batch["completion_mask"].sum()), int(batch["input_ids"].numel())


def _common_args(out_dir: Path, *, batch_size: int, grad_accum: int, steps: int, lr: float, seed: int) -> dict:
    """TrainingArguments shared by both runs. Optimizer and schedule stay TrainingArguments' defaults
    (AdamW betas 0.9/0.999, eps 1e-8, weight decay 0, linear decay, no warmup, clip 1.0), which the
    caller can override with ``config_overrides`` to match our loop's settings."""
    import torch

    return dict(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        seed=seed,
        data_seed=seed,
        gradient_checkpointing=False,  # our loop has none (module docstring)
        bf16=torch.cuda.is_available(),  # fp32 on CPU; TRL's default would be True
        fp16=False,
        logging_steps=1,
        logging_first_step=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _load_model(model_dir: str | Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import disable_dropout_in_model

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa", use_safetensors=True
    )
    disable_dropout_in_model(model)  # SFTConfig has no disable_dropout switch (DPOConfig defaults it on)
    return model, tok


def _settings(args: Any) -> dict:
    keys = ("lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
            "max_grad_norm", "optim", "bf16", "gradient_checkpointing")
    return {k: getattr(getattr(args, k), "value", getattr(args, k)) for k in keys}  # enums as their names


def _instrument(trainer: Any, counter_fn: Callable) -> _CountingCollator:
    """Wrap the collator for token counts and drop the PrinterCallback (it prints every log dict)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    counter = _CountingCollator(trainer.data_collator, counter_fn)
    trainer.data_collator = counter
    return counter


def _result(trainer: Any, rec: Any, counter: _CountingCollator, grad_accum: int, steps: int) -> dict:
    import trl

    counts = _per_step(counter.counts, grad_accum, steps)
    return {
        "step_times": rec.step_times,
        "compute_times": rec.compute_times,
        "losses": [log["loss"] for log in rec.logs],
        "tokens": [c[0] for c in counts],  # non-pad input tokens per step
        "target_tokens": [c[1] for c in counts],  # trained tokens per step (SFT: shifted labels; DPO: completions)
        # positions of the step's batches: rows x padded length, or packs x max_length when packing
        # (padding-free rows hold no padding, so the bins' unused capacity is what packing wastes)
        "slot_tokens": [c[2] for c in counts],
        "logs": rec.logs,
        "settings": _settings(trainer.args),
        "trl_version": trl.__version__,
    }


# ----------------------------------------------------------------------------- runs


def trl_sft(
    model_dir: str | Path,
    rows: list[dict],
    *,
    max_length: int,
    batch_size: int,
    grad_accum: int,
    steps: int,
    lr: float,
    packing: bool,
    seed: int,
    out_dir: str | Path,
    config_overrides: dict | None = None,
) -> dict:
    """Run ``steps`` optimizer steps of TRL's SFTTrainer on ``rows`` (``{"messages": [...]}``).

    Assistant-only loss through the template's ``{% generation %}`` block (every assistant turn,
    end-of-turn token included). ``packing=True``: BFD packing into ``max_length`` bins with
    padding-free collation (position ids restart per document, one flattened row per micro-batch);
    ``batch_size`` then counts packs. ``packing=False``: right padding to the longest row, rows
    truncated to ``max_length`` (``keep_start``) and dropped when no target is left. Returns
    step_times, losses, tokens, target_tokens, slot_tokens, padding_fraction, rows_in,
    rows_trained (packs when packing), logs, settings and trl_version.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = _load_model(model_dir)
    args = SFTConfig(
        **_common_args(Path(out_dir), batch_size=batch_size, grad_accum=grad_accum, steps=steps, lr=lr, seed=seed),
        max_length=max_length,
        packing=packing,
        packing_strategy="bfd",  # TRL's default; forces padding_free on
        assistant_only_loss=True,
        **(config_overrides or {}),
    )
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    rec = _callback_class()()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[rec])
    counter = _instrument(trainer, _sft_counter(max_length))
    trainer.train()
    out = _result(trainer, rec, counter, grad_accum, steps)
    out["padding_fraction"] = [1 - t / s for t, s in zip(out["tokens"], out["slot_tokens"])]
    out["rows_in"], out["rows_trained"] = len(rows), len(trainer.train_dataset)
    return out


def trl_dpo(
    model_dir: str | Path,
    pairs: list[dict],
    *,
    max_length: int,
    batch_size: int,
    steps: int,
    lr: float,
    beta: float,
    precompute_ref: bool,
    seed: int,
    out_dir: str | Path,
    config_overrides: dict | None = None,
) -> dict:
    """Run ``steps`` steps of TRL's DPOTrainer (sigmoid loss) on conversational explicit-prompt pairs.

    The reference is the same folder: either precomputed once before training
    (``precompute_ref_log_probs``, no reference in memory while training) or a second live copy.
    Pairs whose prompt alone fills ``max_length`` are dropped by TRL; the rest are truncated
    (``keep_start``). Returns the SFT keys plus step0_loss and step0_is_ln2 (|loss - ln 2| < LN2_TOL:
    policy == reference before the first update), rewards_margins and rewards_accuracies per step.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = _load_model(model_dir)
    args = DPOConfig(
        **_common_args(Path(out_dir), batch_size=batch_size, grad_accum=1, steps=steps, lr=lr, seed=seed),
        max_length=max_length,
        beta=beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute_ref,
        **(config_overrides or {}),
    )
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    rec = _callback_class()()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[rec])
    counter = _instrument(trainer, _dpo_counts)
    trainer.train()
    out = _result(trainer, rec, counter, 1, steps)
    out["padding_fraction"] = [1 - t / s for t, s in zip(out["tokens"], out["slot_tokens"])]
    out["rows_in"], out["rows_trained"] = len(pairs), len(trainer.train_dataset)
    out["step0_loss"] = out["losses"][0] if out["losses"] else float("nan")
    out["step0_is_ln2"] = abs(out["step0_loss"] - LN2) < LN2_TOL
    out["rewards_margins"] = [log.get("rewards/margins") for log in rec.logs]
    out["rewards_accuracies"] = [log.get("rewards/accuracies") for log in rec.logs]
    return out


# ----------------------------------------------------------------------------- smoke check


def _summary(name: str, res: dict) -> str:
    st = res["step_times"]
    mean_s = sum(st[1:]) / max(1, len(st) - 1)  # the first step carries start-up
    tok_s = sum(res["tokens"][1:]) / max(1e-9, sum(st[1:]))
    losses = ", ".join(f"{x:.4f}" for x in res["losses"])
    return (
        f"{name:<22} s/step {mean_s:6.3f} (first {st[0]:.3f})  tokens/s {tok_s:7.0f}  "
        f"pad {sum(res['padding_fraction']) / len(res['padding_fraction']):.1%}  "
        f"rows {res['rows_trained']}/{res['rows_in']}  losses [{losses}]"
    )


def main() -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="accepted for make bench: the smoke check is already short")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--dpo-batch", type=int, default=4)
    opts = ap.parse_args()

    n_sft = opts.sft_batch * opts.steps * 2
    sft_rows, pairs = load_sft_rows(n_sft), load_pairs(opts.dpo_batch * opts.steps * 2)
    if sft_rows is None or pairs is None:
        print(f"SKIP trl_peer: shared data not found at {DATA}")
        return 0
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_causal_lm(
            Path(tmp) / "model", texts=corpus_text(sft_rows, pairs), arch="llama", hidden=128, layers=4,
            heads=4, vocab_size=4096, seed=0, max_positions=opts.max_length,
        )
        common = dict(max_length=opts.max_length, steps=opts.steps, lr=1e-4, seed=0)
        for packing in (False, True):
            res = trl_sft(model_dir, sft_rows, batch_size=opts.sft_batch, grad_accum=1, packing=packing,
                          out_dir=Path(tmp) / "sft", **common)
            print(_summary(f"SFT {'packed' if packing else 'padded'}", res))
        for precompute in (False, True):
            res = trl_dpo(model_dir, pairs, batch_size=opts.dpo_batch, beta=0.1, precompute_ref=precompute,
                          out_dir=Path(tmp) / "dpo", **common)
            print(_summary(f"DPO {'precomputed' if precompute else 'live'} ref", res))
            print(f"  step-0 loss {res['step0_loss']!r} (ln 2 = {LN2!r}): {'ok' if res['step0_is_ln2'] else 'WRONG'}")
        print(f"trl {res['trl_version']}; settings {res['settings']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
