"""DPO on preference pairs: summed completion log-probs, reference log-probs precomputed and cached.

The reference model is used once, before training: one no-grad pass over every train and held-out
pair, whose summed completion log-probs go to a cache on disk keyed by the reference's fingerprint,
max_length, chat template, precision and the pairs' token ids (``models/score_cache.py``). Then the
reference is dropped, so training holds one model; a re-run, or a resume, computes no reference
forward at all. When the reference is the starting policy (``ref_model: null``, the usual case),
that pass runs on the policy itself before its first update, and no second model is ever built.
``reference: live`` keeps a reference model and runs it on every micro-batch (TRL's default; kept
to measure what precomputing saves). Missing reference values are an error, never 0.0 (trl PR #5563).

With several processes (distributed.py) the reference pass is split across them and its values
gathered; with LoRA (lora.py) the reference is the policy with its adapter disabled, so even a live
reference holds no second model. The losses (``loss_type``, one or a weighted list) are the pure
functions of pref_losses.py; reference-free ones (simpo, orpo, sft alone) skip the reference
entirely, and KTO adds one mismatched row per pair (its prompt with the previous pair's chosen
completion; no gradient) whose policy and reference log-probs set its reference point. Simplifications, stated: chosen and rejected are one forward, stacked
on the batch dim and right-padded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from dataflywheel.errors import UserError
from dataflywheel.io import fs
from dataflywheel.models.fingerprint import model_fingerprint
from dataflywheel.models.label_logps import label_logps
from dataflywheel.models.score_cache import ScoreCache, cache_key

from . import distributed as dist
from . import lora
from .config import LoopConfig, TrainBase
from .data import Lint, PairExample, load_split, pair_examples, unpaired_examples, use_chat_template, with_kl_rows
from .loop import LossOut, autocast, index_plan, pick_device, steps_for, train_loop
from .losses import dpo_loss, sequence_logps
from .model import load_for_training, resolve_model, save_final, to_device
from .output import RunOutput
from .pack import collate_padded
from .pref_losses import DISCOPOP_TAU, DPOP_LAMBDA, KTO_WEIGHT, LOSSES, REFERENCE_FREE, SIMPO_GAMMA, Knobs


class DpoLoop(LoopConfig):
    lr: float = Field(1e-6, gt=0)  # TRL DPOConfig (docs/sources.md#dpo)


class DpoConfig(TrainBase):
    loop: DpoLoop = DpoLoop()
    beta: float = Field(0.1, gt=0)  # TRL DPOConfig (τ for ipo), docs/sources.md#dpo
    # one of train/pref_losses.LOSSES, or a list combined with loss_weights (TRL's loss_type list); TRL's default
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None  # None: 1.0 each
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # ε: cDPO with sigmoid; robust, exo_pair, aot, simpo read it (TRL: 0.0)
    discopop_tau: float = Field(DISCOPOP_TAU, gt=0)
    dpop_lambda: float = Field(DPOP_LAMBDA, ge=0)
    simpo_gamma: float = Field(SIMPO_GAMMA, ge=0)  # SimPO's target margin (a reward gap, after β)
    desirable_weight: float = Field(KTO_WEIGHT, gt=0)  # KTO
    undesirable_weight: float = Field(KTO_WEIGHT, gt=0)
    unpaired: bool = False  # KTO on unpaired rows {prompt, completion, label} instead of pairs (TRL's KTO data)
    reference: Literal["precompute", "live"] = "precompute"
    ref_model: str | None = None  # a folder or Hub id; None: the starting policy
    ref_cache: str | None = None  # the reference log-prob cache; None: output/ref_logps.sqlite
    eval_batch_size: int = Field(16, ge=1)  # pairs per batch in the reference pass and the held-out eval

    @field_validator("loss_type")
    @classmethod
    def _known(cls, value: str | list[str]) -> str | list[str]:
        for name in [value] if isinstance(value, str) else value:
            if name not in LOSSES:
                raise ValueError(f"unknown loss_type {name!r}; one of {', '.join(LOSSES)}")
        return value

    @property
    def types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def reference_free(self) -> bool:
        """Only losses that never read the reference (simpo, orpo, sft): no reference pass at all."""
        return set(self.types) <= REFERENCE_FREE

    def knobs(self) -> Knobs:
        return Knobs(self.beta, self.label_smoothing, self.discopop_tau, self.dpop_lambda, self.simpo_gamma,
                     self.desirable_weight, self.undesirable_weight)

    @model_validator(mode="after")
    def _weights(self) -> DpoConfig:
        types = self.types
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(types)} loss types")
        if self.unpaired and types != ["kto"]:
            raise ValueError("unpaired data trains only with loss_type kto")
        if "exo_pair" in types and self.label_smoothing == 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (its target distribution is (1 - ε, ε))")
        return self


def pair_batch(pairs: Sequence[PairExample], pad_id: int, ref: torch.Tensor | None = None) -> dict:
    """Chosen rows then rejected rows, right-padded with a mask; ``ref``: [P, 2] reference log-probs
    ([P, 3] with KTO's mismatched rows, which go under ``kl``)."""
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if pairs and pairs[0].kl is not None:
        batch["kl"] = collate_padded([p.kl for p in pairs], pad_id)
    if any(p.sides != (True, True) for p in pairs):  # KTO's unpaired rows: which sides are real
        batch["sides"] = torch.tensor([p.sides for p in pairs], dtype=torch.float32)
    if ref is not None:
        batch["ref"] = ref
    return batch


def pair_logps(model: Any, batch: dict, chunk: int) -> tuple[torch.Tensor, ...]:
    """One forward over the stacked batch -> [P] summed completion log-probs of chosen and rejected,
    and their [P] completion token counts."""
    labels = batch["labels"]
    logps, counts = sequence_logps(label_logps(model, labels, chunk=chunk, input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]), labels)
    (pol_c, pol_r), (len_c, len_r) = logps.chunk(2), counts.chunk(2)
    return pol_c, pol_r, len_c, len_r


@torch.no_grad()
def kl_logps(model: Any, batch: dict, chunk: int) -> torch.Tensor:
    """[P] summed log-probs of KTO's mismatched rows; no gradient (they only set the reference point)."""
    rows = batch["kl"]
    return sequence_logps(label_logps(model, rows["labels"], chunk=chunk, input_ids=rows["input_ids"],
                                      attention_mask=rows["attention_mask"]), rows["labels"])[0]


def ref_pair_logps(model: Any, batch: dict, chunk: int) -> tuple[torch.Tensor, ...]:
    """The reference's [P] chosen and rejected log-probs (and mismatched rows' when the batch has
    them): ``model`` itself with a LoRA adapter off."""
    with torch.no_grad(), lora.reference_context(model):
        found = pair_logps(model, batch, chunk)[:2]
        return (*found, kl_logps(model, batch, chunk)) if "kl" in batch else found


def pair_loss(model: Any, batch: dict, cfg: DpoConfig, ref_model: Any = None) -> LossOut:
    """The loss of one micro-batch; reference log-probs from ``batch["ref"]`` or a live ``ref_model``
    (``lora.ADAPTER_OFF``: the policy's LoRA base)."""
    pol_c, pol_r, len_c, len_r = pair_logps(model, batch, cfg.logits_chunk)
    ref: tuple[torch.Tensor | None, ...] = (None, None)  # reference-free losses read none
    if not cfg.reference_free:
        ref = batch["ref"].unbind(-1) if ref_model is None else ref_pair_logps(
            model if ref_model is lora.ADAPTER_OFF else ref_model, batch, cfg.logits_chunk)
    kl = kl_logps(model, batch, cfg.logits_chunk) - ref[2] if "kl" in batch else None
    total, n, metrics = dpo_loss(pol_c, pol_r, ref[0], ref[1], cfg.knobs(), cfg.loss_type, len_c, len_r,
                                 weights=cfg.loss_weights, kl=kl, sides=batch.get("sides"))
    return LossOut(total, n, {**metrics, "tokens": (batch["num_tokens"], 1)})


def dpo_loss_fn(device: str, cfg: DpoConfig, ref_model: Any = None) -> Callable[[Any, dict], LossOut]:
    return lambda model, batch: pair_loss(model, to_device(batch, device), cfg, ref_model)


def ref_key_prefix(ref_name: str, cfg: DpoConfig, tok: Any, bf16: bool, loaded: Any = None) -> tuple[str, str]:
    """(model id, settings) for the cache keys: what decides a reference log-prob besides the tokens.
    ``loaded``: the reference when already loaded (a Hub model's id then includes its revision)."""
    template = tok.chat_template or ""  # the config's override is on the tokenizer (use_chat_template)
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    # a model in a bucket is fingerprinted by its content (its cached copy), as a local folder is
    return model_fingerprint(fs.local_copy(ref_name), loaded), f"dpo_ref:max_length={cfg.max_length}:template={digest}:bf16={bf16}"


@torch.no_grad()
def reference_logps(load_ref: Callable[[], Any], pair_lists: Sequence[Sequence[PairExample]], cfg: DpoConfig,
                    pad_id: int, cache: ScoreCache | None, prefix: tuple[str, str]) -> tuple[list[torch.Tensor], int]:
    """[N, 2] reference log-probs (chosen, rejected) per list, from the cache or one no-grad pass of the
    reference (``load_ref()``: a function running ``fn(model, *args)`` on it, built only when something
    is missing). With several processes the missing pairs' batches are dealt round the ranks, each
    running as many (a rank short of one repeats a batch and drops it: FSDP needs every rank's
    forwards), and the values gathered; rank 0 holds the cache (None on the others). Also returns
    the number of reference forwards this rank ran."""
    device, bf16 = pick_device(cfg.loop)
    rank, world = dist.shard()
    def ids(p: PairExample) -> list[list[int]]:
        rows = [p.chosen, p.rejected] + ([p.kl] if p.kl is not None else [])
        return [x for row in rows for x in (row.input_ids, row.labels)]

    keyed = [[cache_key(*prefix, json.dumps(ids(p))) for p in pairs] for pairs in pair_lists]
    found = dist.from_main(cache.get_json([k for keys in keyed for k in keys]) if cache is not None else None)
    missing = {k: p for pairs, keys in zip(pair_lists, keyed) for p, k in zip(pairs, keys) if k not in found}
    todo = sorted(missing.items(), key=lambda kp: len(kp[1].chosen.input_ids) + len(kp[1].rejected.input_ids))
    parts = [todo[at:at + cfg.eval_batch_size] for at in range(0, len(todo), cfg.eval_batch_size)]  # little padding
    mine = parts[rank::world]
    forwards, new = 0, []
    if parts:
        run = load_ref()
        for i in range(-(-len(parts) // world)):
            part = mine[i] if i < len(mine) else parts[0]
            with autocast(device, bf16):
                values = run(ref_pair_logps, to_device(pair_batch([p for _, p in part], pad_id), device),
                             cfg.logits_chunk)
            if i < len(mine):
                new += [(key, list(v)) for (key, _), v in zip(part, torch.stack(values, -1).tolist())]
            forwards += 1
        del run
    for part in dist.gather(new):
        if cache is not None:
            cache.put_json(part)
        found.update(part)
    width = 3 if any(p.kl is not None for pairs in pair_lists for p in pairs) else 2
    return [torch.tensor([found[k] for k in keys], dtype=torch.float32).view(-1, width) for keys in keyed], forwards


@torch.no_grad()
def evaluate(engine: Any, pairs: Sequence[PairExample], ref: torch.Tensor | None, cfg: DpoConfig, pad_id: int,
             ref_model: Any = None) -> dict[str, float]:
    """Held-out loss and metrics (``eval_`` + the training metric names); ``engine``: the wrapped
    policy (distributed.py), on which every rank runs every pair."""
    if not pairs:
        return {}
    device, bf16 = pick_device(cfg.loop)
    was_training = engine.training
    engine.eval()
    sums: dict[str, list[float]] = {"loss": [0.0, 0.0]}
    for at in range(0, len(pairs), cfg.eval_batch_size):
        part = slice(at, at + cfg.eval_batch_size)
        batch = to_device(pair_batch(pairs[part], pad_id, None if ref is None else ref[part]), device)
        with autocast(device, bf16):
            out = engine(pair_loss, batch, cfg, ref_model)
        for name, (s, c) in {"loss": (float(out.loss_sum), out.count), **out.metrics}.items():
            sums.setdefault(name, [0.0, 0.0])
            sums[name][0] += s
            sums[name][1] += c
    engine.train(was_training)
    return {f"eval_{k}": s / c for k, (s, c) in sums.items() if k != "tokens" and c}


def run(cfg: DpoConfig) -> dict:
    """Train; returns the summary also written to ``output/summary.json``."""
    device, bf16 = pick_device(cfg.loop)
    dist.setup(cfg.distributed, device)
    output = RunOutput.start(cfg.output, cfg.resume)  # a bucket output: its latest checkpoint comes here first
    lint = Lint()
    kind, fields = ("unpaired", ("prompt", "completion")) if cfg.unpaired else ("preference", ("prompt", "chosen", "rejected"))
    train_rows, held = load_split(cfg.data, cfg.eval_data, cfg.eval_fraction, kind, lint)
    texts = (m["content"] for r in train_rows for k in fields for m in r[k])
    model_name = resolve_model(cfg.model, cfg.tiny, cfg.out, texts)

    def load() -> Any:
        return load_for_training(model_name, gradient_checkpointing=cfg.gradient_checkpointing, lora=cfg.lora,
                                 seed=cfg.loop.seed)

    model, tok = load()
    engine = dist.wrap(model, cfg.distributed, device, bf16)
    use_chat_template(tok, cfg.chat_template, model_name)
    tokenize = unpaired_examples if cfg.unpaired else pair_examples
    pairs = tokenize(train_rows, tok, cfg.max_length, lint)
    eval_pairs = tokenize(held, tok, cfg.max_length, lint)
    lint.enforce(cfg.lint, "dpo data")
    if not pairs:
        raise UserError("no training pairs left after the data lint")
    if "kto" in cfg.types:
        pairs, eval_pairs = with_kl_rows(pairs, cfg.max_length), with_kl_rows(eval_pairs, cfg.max_length)
    ref_name = cfg.ref_model or model_name

    def load_ref() -> Any:
        ref, ref_tok = load_for_training(ref_name)
        if ref_tok.get_vocab() != tok.get_vocab():
            raise UserError(f"ref_model {ref_name} has another tokenizer than the policy {model_name}")
        return ref.requires_grad_(False).to(device).eval()

    t0 = time.perf_counter()
    live, forwards, ref_logps, eval_ref_logps = None, 0, None, None
    reference = "none" if cfg.reference_free else cfg.reference
    if reference == "live":  # with LoRA and no ref_model: the policy's base, no second model
        live = load_ref() if cfg.ref_model or cfg.lora is None else lora.ADAPTER_OFF
    elif reference == "precompute":
        cfg.out.mkdir(parents=True, exist_ok=True)
        cache = ScoreCache(cfg.ref_cache or cfg.out / "ref_logps.sqlite") if dist.is_main() else None
        # the starting policy is its own reference: precompute on it before its first update
        own = None if cfg.ref_model else model
        prefix = ref_key_prefix(ref_name, cfg, tok, bf16, own)

        def runner() -> Callable[..., Any]:
            if own is not None:
                engine.eval()
                return engine
            ref = load_ref()
            return lambda fn, *args: fn(ref, *args)

        (ref_logps, eval_ref_logps), forwards = reference_logps(runner, [pairs, eval_pairs], cfg, tok.pad_token_id,
                                                                cache, prefix)
        if cache is not None:
            cache.close()
        gc.collect()  # the reference model is gone before training starts
    ref_seconds = time.perf_counter() - t0
    loop = cfg.loop
    plan = index_plan(len(pairs), loop.batch_size, loop.grad_accum, loop.seed, loop.shuffle)

    def step_batches(step: int) -> list[dict]:
        return [pair_batch([pairs[i] for i in mb], tok.pad_token_id, None if ref_logps is None else ref_logps[mb])
                for mb in plan(step)]

    total = steps_for(len(pairs), loop)
    dist.say(f"dpo: {len(pairs)} pairs, {len(eval_pairs)} held out, {total} steps, {cfg.loss_type} beta {cfg.beta}, "
             f"reference {reference} ({forwards} reference forwards, {ref_seconds:.1f}s)")
    t0 = time.perf_counter()
    last = train_loop(model, loop, cfg.out, total_steps=total, step_batches=step_batches, engine=engine,
                      loss_fn=dpo_loss_fn(device, cfg, live), tokenizer=tok, on_checkpoint=output.push_checkpoint,
                      resume=cfg.resume, desc="dpo", config=cfg.model_dump(mode="json"))
    seconds = time.perf_counter() - t0
    metrics = {k: v for k, v in last.items() if k.startswith(("rewards/", "logps/"))}
    summary = {
        "algorithm": "dpo", "model": model_name, "ref_model": None if cfg.reference_free else ref_name,
        "reference": reference,
        "loss_type": cfg.loss_type, "beta": cfg.beta, "pairs": len(pairs), "eval_pairs": len(eval_pairs),
        **({"rows": {"desirable": sum(p.sides[0] for p in pairs), "undesirable": sum(p.sides[1] for p in pairs)}}
           if cfg.unpaired else {}),
        "lint": dict(lint.counts), "rows_dropped": lint.rows, "ref_forwards": forwards, "ref_seconds": round(ref_seconds, 2),
        "steps": last["step"], "resumed_from": last["resumed_from"], "train_loss": last.get("loss"), **metrics,
        "seconds": round(seconds, 2),
        "step_seconds": last.get("step_seconds"), "tokens_per_s": last.get("tokens_per_s_run"),
        "seconds_per_step": last.get("seconds_per_step"), "world_size": dist.shard()[1],
        **evaluate(engine, eval_pairs, eval_ref_logps, cfg, tok.pad_token_id, live),
    }
    if last["step"] >= total:
        summary["final"] = output.publish_final(save_final(model, tok, cfg.out, summary, cfg.lora,
                                                           lambda: load()[0]))
    return summary
