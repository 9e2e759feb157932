"""The settings every training run shares: model, data, output and the loop's optimizer schedule.

Each algorithm's module (sft.py, rm.py, dpo.py, grpo.py) subclasses ``TrainBase`` with its own
fields; defaults are stated once, here or there, with their source.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dataflywheel.config import load_yaml
from dataflywheel.io import fs
from dataflywheel.models.label_logps import DEFAULT_CHUNK

from .distributed import DistConfig
from .lora import LoraConfig
from .model import TinyInit

STAGING = "train-staging"  # bucket outputs are trained in fs.cache_root()/train-staging/<key>-<name> (output.py)


class LoopConfig(BaseModel):
    """The training loop (loop.py). Optimizer defaults are torch's AdamW (betas, eps) with TRL's
    weight decay 0.0 and gradient clipping 1.0 (transformers TrainingArguments)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(2e-5, gt=0)  # TRL SFTConfig's override; DPO/RM/GRPO configs set their own
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # share of total steps spent warming up linearly from 0
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    batch_size: int = Field(8, ge=1)  # rows (or packed bins) per micro-batch
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    seed: int = 0
    shuffle: bool = True  # False: items in data order every epoch (a curriculum; matching another trainer)
    device: str = "auto"  # auto: CUDA when available
    bf16: bool | None = None  # None: bf16 autocast on CUDA, fp32 on CPU
    log_every: int = Field(1, ge=1)
    save_every: int | None = Field(None, ge=1)  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = Field(2, ge=1)  # older step checkpoints are deleted
    stop_after: int | None = Field(None, ge=1)  # stop (with a checkpoint) after this step: split a run into sessions
    progress: bool = True
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []  # experiment trackers (train/report.py); none by default
    run_name: str | None = None  # the trackers' run name; None: the algorithm's name
    tags: dict[str, str] = {}  # the trackers' run tags (the flywheel sets the round and stage)


class TrainBase(BaseModel):
    """What every training config has. ``data``: files, folders or globs of the pipeline's outputs
    (JSONL / Parquet / HF folders), local or in a bucket; ``output``: the run folder (checkpoints/,
    final/, metrics.jsonl), local or a bucket URL (trained in a local staging folder, output.py)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # a local folder, bucket URL or Hub id ...
    tiny: TinyInit | None = None  # ... or a tiny model built into output/base (offline configs and tests)
    data: list[str]
    output: str
    eval_data: list[str] = []  # held-out rows; empty: split off eval_fraction of data
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(1024, ge=8)  # TRL 1.16 SFTConfig's default
    logits_chunk: int = Field(DEFAULT_CHUNK, ge=1)  # positions through the output head at once (label_logps.py)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, one more forward
    chat_template: str | None = None  # a Jinja template overriding the tokenizer's
    lint: Literal["fail", "drop"] = "fail"  # fail: any linter finding stops the run; drop: drop those rows, report
    resume: bool = True  # continue from the latest checkpoint in output, if any
    loop: LoopConfig = LoopConfig()
    distributed: DistConfig = DistConfig()  # under torchrun: ddp or fsdp (distributed.py)
    lora: LoraConfig | None = None  # train a LoRA adapter instead of every weight (lora.py)

    @property
    def out(self) -> Path:
        """The local folder the run writes (for a bucket output, its staging folder)."""
        return output_dir(self.output)


def staging_dir(url: str) -> Path:
    """The local folder a bucket output is trained in: one per URL, so a re-run on this machine finds it."""
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(fs.cache_root()) / STAGING / f"{key}-{fs.basename(url)}"


def output_dir(output: str) -> Path:
    """Where a run with this ``output`` writes its files: the folder itself, or a bucket's staging folder."""
    return staging_dir(output) if fs.is_remote(output) else Path(fs.local_path(output))


def load_train_config(path: str | Path, cls: type[TrainBase], overrides: dict | None = None) -> TrainBase:
    """Read a YAML config into ``cls`` (``${VAR}`` expanded; relative paths are from the working
    directory, as in the other commands); ``overrides`` are the command line's (None: not given)."""
    def prepare(raw: dict, source: str) -> dict:
        if (overrides or {}).get("model"):
            raw.pop("tiny", None)  # a model given on the command line replaces the config's tiny init
        for key in ("data", "eval_data"):
            if isinstance(raw.get(key), str):
                raw[key] = [raw[key]]
        return raw

    return load_yaml(path, cls, overrides, prepare)
