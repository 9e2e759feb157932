"""SFT throughput and loss: ours packed vs padded, and ours vs TRL, in one run (docs/benchmarks.md#training).

Same tiny Llama (hidden 128, 4 layers, byte-level BPE vocab 4096, built here; the TRL setup of
docs/sources.md#trl-peer-figures), same ``alpaca_subset`` rows in the same order (no shuffling on either side), same
optimizer and schedule (AdamW torch, lr 1e-4 cosine, no warmup, clip 1.0), fp32 on CPU, bf16
autocast on a GPU, no gradient checkpointing on either side.

1. Ours packed (BFD bins of 512) vs ours padded (batch 8, right padding): real tokens per second
   and the padding fraction (``BENCH sft_packing_*``).
2. Ours vs TRL 1.16 SFTTrainer, padded: median seconds per step and the per-step losses, which
   must agree (same rows, same order, same init: ``BENCH sft_loss_vs_trl``); and packed vs TRL's
   BFD packing (TRL packs per map batch, flattened padding-free rows; ours globally, one row per bin).

The first step of each run (start-up) is left out of the timings. TRL is a benchmark-only
dependency (``pip install trl==1.16.0``, the ``bench`` extra); without it the TRL claims SKIP.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_peer import DATA, corpus_text, load_sft_rows  # noqa: E402

MAX_LENGTH, LR, PADDED_BATCH, PACKED_BATCH = 512, 1e-4, 8, 4
TRL_MATCH = {"lr_scheduler_type": "cosine", "optim": "adamw_torch", "train_sampling_strategy": "sequential"}


def bench(claim: str, ours: float, peer: float | None, target: str, ok: bool) -> str:
    ratio = "-" if peer in (None, 0) else f"{ours / peer:.3f}"
    return (f"BENCH {claim} ours={ours:.4g} peer={'-' if peer is None else f'{peer:.4g}'} ratio={ratio} "
            f"target={target} {'PASS' if ok else 'FAIL'}")


def ours(model_dir: Path, rows: list[dict], out: Path, *, packing: bool, steps: int) -> dict:
    from dataflywheel.train.sft import SftConfig, run

    data = out / "rows.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"id": f"r{i}", **r}) + "\n" for i, r in enumerate(rows)))
    cfg = SftConfig(model=str(model_dir), data=[str(data)], output=str(out / "run"), eval_fraction=0.0,
                    max_length=MAX_LENGTH, packing=packing, lint="drop", resume=False,
                    loop={"lr": LR, "schedule": "cosine", "batch_size": PACKED_BATCH if packing else PADDED_BATCH,
                          "max_steps": steps, "shuffle": False, "progress": False})
    summary = run(cfg)
    steps_log = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "seconds": [s["seconds"] for s in steps_log], "losses": [s["loss"] for s in steps_log],
            "tokens": [s["tokens"] for s in steps_log], "padding": [s["padding"] for s in steps_log]}


def rate(tokens: list[float], seconds: list[float]) -> float:
    return sum(tokens[1:]) / sum(seconds[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 steps a side (make bench)")
    opts = ap.parse_args()
    steps = 6 if opts.quick else 30
    # a pool large enough that BFD finds good fits (packing a few dozen rows leaves half-empty tail bins)
    rows = load_sft_rows(max(PADDED_BATCH * steps, 400))
    if rows is None:
        print(f"SKIP train_sft: shared data not found at {DATA}")
        return 0
    try:
        import trl  # noqa: F401
        from trl_peer import trl_sft
    except ImportError:
        trl_sft = None
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_causal_lm(tmp / "model", texts=corpus_text(rows), arch="llama", hidden=128, layers=4,
                                         heads=4, vocab_size=4096, seed=0, max_positions=MAX_LENGTH)
        padded = ours(model_dir, rows, tmp / "padded", packing=False, steps=steps)
        packed = ours(model_dir, rows, tmp / "packed", packing=True, steps=steps)
        print(f"{'run':<16}{'s/step':>9}{'tokens/s':>10}{'padding':>9}  losses (first, last)")
        table = {"ours padded": padded, "ours packed": packed}
        if trl_sft is not None:
            common = dict(max_length=MAX_LENGTH, grad_accum=1, steps=steps, lr=LR, seed=0, config_overrides=TRL_MATCH)
            t_pad = trl_sft(model_dir, rows, batch_size=PADDED_BATCH, packing=False, out_dir=tmp / "trl", **common)
            t_pack = trl_sft(model_dir, rows, batch_size=PACKED_BATCH, packing=True, out_dir=tmp / "trl", **common)
            for t in (t_pad, t_pack):
                t["seconds"], t["padding"] = t["step_times"], t["padding_fraction"]
            table |= {"TRL padded": t_pad, "TRL packed": t_pack}
        for name, r in table.items():
            print(f"{name:<16}{statistics.median(r['seconds'][1:]):>9.3f}{rate(r['tokens'], r['seconds']):>10.0f}"
                  f"{statistics.mean(r['padding']):>9.1%}  {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
        pad_frac = statistics.mean(packed["padding"])
        lines.append(bench("sft_packing_padding_fraction", pad_frac, None, "<=0.05", pad_frac <= 0.05))
        speed_packed, speed_padded = rate(packed["tokens"], packed["seconds"]), rate(padded["tokens"], padded["seconds"])
        lines.append(bench("sft_packed_vs_padded_tokens_per_s", speed_packed, speed_padded, ">=1.5",
                           speed_packed >= 1.5 * speed_padded))
        if trl_sft is None:
            lines.append("BENCH sft_vs_trl SKIP (pip install trl==1.16.0)")
        else:
            ours_s, trl_s = statistics.median(padded["seconds"][1:]), statistics.median(t_pad["step_times"][1:])
            lines.append(bench("sft_padded_step_time_trl_over_ours", trl_s / ours_s, 1.0, ">=1.0", trl_s >= ours_s))
            diff = max(abs(a - b) for a, b in zip(padded["losses"], t_pad["losses"]))
            print(f"padded loss curves, ours vs TRL, max |diff| over {steps} steps: {diff:.2e}")
            lines.append(bench("sft_loss_vs_trl_max_abs_diff", diff, None, "<=1e-3", diff <= 1e-3))
            ours_tps, trl_tps = speed_packed, rate(t_pack["tokens"], t_pack["step_times"])
            lines.append(bench("sft_packed_tokens_per_s_vs_trl_packed", ours_tps, trl_tps, ">=1.0", ours_tps >= trl_tps))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
