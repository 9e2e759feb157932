"""Does the loop, and not the extra training, make the model better? Flywheel ablations, one command.

Every variant starts from the same round 0 (the same seed set, the same tiny model, the same steps;
round 0 is trained once per seed and copied: its stage markers make the copy count as done) and
then trains the same number of steps per round:

- ``loop``: the default config (configs/flywheel.yaml): verified best-of-N, pooled over rounds, SFT;
- ``control``: the same steps per round on the seed set alone (``--control``), same seeds;
- ``sft+dpo``: (a) SFT then DPO on the round's West-of-N pairs; ``sft+dpop``, ``sft+simpo``,
  ``sft+orpo``, ``sft+kto``, ``sft+rpo``: the same with another preference loss (train/pref_losses.py),
  each printed with how far chosen's and rejected's log-probs moved over its DPO steps;
- ``select_ifd`` / ``select_random``: (b) the pool cut to the same budget by IFD under the policy
  (the ``ifd`` selection method, docs/selection.md#ifd) or at random;
- ``last_round``: (c) this round's verified samples only, not the pool of all rounds.

The claim (docs/benchmarks.md#flywheel): held-out accuracy rises round over round and the loop beats the control by
more than the spread over seeds (``BENCH flywheel_loop_vs_control``; ``BENCH flywheel_rises``).
Default: loop and control over seeds 0, 1, 2, the ablations on seed 0 (``--ablation-seeds`` for
more; each variant-seed costs about 3-4 minutes on 2 cores). ``--quick`` only checks that loop and
control run end to end on a toy task (under a minute); it prints no BENCH line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dataflywheel.flywheel.config import FlywheelConfig, load_flywheel_config
from dataflywheel.flywheel.rounds import run_rounds

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "loop": {},
    "control": {"control": True},
    "sft+dpo": {"train": {"algorithm": "sft+dpo"}},
    # the DPO family at the same SFT and DPO steps (train/pref_losses.py); --variants picks them
    "sft+dpop": {"train": {"algorithm": "sft+dpo", "dpo": {"loss_type": "dpop"}}},
    # SimPO's β and γ are on per-token log-likelihoods: its paper uses β 2-2.5 with γ/β 0.3-0.8
    "sft+simpo": {"train": {"algorithm": "sft+dpo", "dpo": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0}}},
    "sft+orpo": {"train": {"algorithm": "sft+dpo", "dpo": {"loss_type": "orpo"}}},
    "sft+kto": {"train": {"algorithm": "sft+dpo", "dpo": {"loss_type": "kto"}}},
    "sft+rpo": {"train": {"algorithm": "sft+dpo", "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}}},
    "select_ifd": {"curate": {"select": "ifd", "budget": 200}},
    "select_random": {"curate": {"select": "random", "budget": 200}},
    "last_round": {"pool": {"mode": "last_round"}},
}
# --quick checks that every part runs (a 1-digit task, one round, small model); it makes no claim.
QUICK = {"task": {"seed_rows": 40, "eval_rows": 30, "width": 1, "seed_digits": [1, 1], "eval_digits": [1, 1]},
         "prompts": {"per_round": 32, "curriculum": [[1, 1]]}, "rounds": 1,
         "policy": {"tiny": {"hidden": 32, "layers": 1, "heads": 2, "vocab_size": 300, "split_digits": True},
                    "steps": 30, "loop": {"lr": 3e-3, "batch_size": 8, "progress": False}},
         "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 4},
         "train": {"steps": 10, "loop": {"lr": 1e-3, "batch_size": 8, "progress": False}}}


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_variant(base: dict, name: str, seed: int, folder: Path, round0: Path | None) -> tuple[list[float], float]:
    cfg = FlywheelConfig.model_validate(merged(base, {**VARIANTS[name], "seed": seed, "output": str(folder)}))
    if round0 is not None and not (folder / "round-000").exists():
        shutil.copytree(round0, folder / "round-000")  # identical inputs: its markers make it count as done
    start = time.perf_counter()
    manifest = run_rounds(cfg, log=lambda line: None)
    return [r["accuracy"] for r in manifest["rounds"]], time.perf_counter() - start


def logp_moves(folder: Path, window: int = 5) -> list[tuple[float, float]] | None:
    """Per round with DPO: how far the summed log-prob of chosen and of rejected moved over the DPO
    steps: the mean of logps/chosen (logps/rejected) over the last ``window`` steps minus over the
    first ``window`` (each step's batch is another draw of the round's pairs: averaging damps that).
    Both falling is DPO's known failure; a loss that keeps chosen up shows a move near 0 or above."""
    moves = []
    for metrics in sorted(folder.glob("round-*/train/dpo/metrics.jsonl")):
        steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"logps/chosen"' in line]
        if len(steps) >= 2 * window:
            moves.append(tuple(statistics.mean(s[key] for s in steps[-window:])
                               - statistics.mean(s[key] for s in steps[:window])
                               for key in ("logps/chosen", "logps/rejected")))
    return moves or None


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a toy task, 1 round, seed 0, loop + control; no claim")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablation-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--config", default=str(ROOT / "configs" / "flywheel.yaml"))
    ap.add_argument("--keep", metavar="DIR", help="keep the runs in DIR (default: a temporary folder)")
    args = ap.parse_args()
    base = load_flywheel_config(args.config).model_dump()
    seeds, ablation_seeds, variants = args.seeds, args.ablation_seeds, args.variants
    if args.quick:
        base, seeds, ablation_seeds, variants = merged(base, QUICK), [0], [], ["loop", "control"]
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="flywheel-ablation-"))
    results: dict[str, dict[int, list[float]]] = {v: {} for v in variants}
    moves: dict[str, dict[int, list[tuple[float, float]] | None]] = {v: {} for v in variants}
    total = time.perf_counter()
    round0: dict[int, Path] = {}
    plan = [(seed, name) for seed in seeds for name in variants if name in ("loop", "control")]
    plan += [(seed, name) for seed in ablation_seeds for name in variants if name not in ("loop", "control")]
    plan.sort(key=lambda sn: sn[0])  # seed by seed: a stopped run has whole seeds (the folders resume)
    for seed, name in plan:
        folder = tmp / f"seed{seed}" / name
        accs, secs = run_variant(base, name, seed, folder, round0.get(seed))
        round0.setdefault(seed, folder / "round-000")
        results[name][seed] = accs
        moves[name][seed] = logp_moves(folder)
        trail = "" if not moves[name][seed] else "  logp chosen/rejected moved " + ", ".join(
            f"{c:+.1f}/{r:+.1f}" for c, r in moves[name][seed])
        print(f"seed {seed} {name:>13}: " + " -> ".join(f"{a:.3f}" for a in accs) + f"  ({secs:.0f} s){trail}", flush=True)
    print(f"\nheld-out accuracy (greedy, exact answer), mean ± sd over seeds; {time.perf_counter() - total:.0f} s in all")
    n_rounds = max(len(a) for r in results.values() for a in r.values())
    print(f"{'variant':>13} {'seeds':>6} " + " ".join(f"{'round ' + str(k):>13}" for k in range(n_rounds)))
    for name, by_seed in results.items():
        if not by_seed:
            continue
        cols = []
        for k in range(n_rounds):
            vals = [a[k] for a in by_seed.values() if len(a) > k]
            cols.append(f"{statistics.mean(vals):.3f} ± {spread(vals):.3f}" if vals else "-")
        print(f"{name:>13} {len(by_seed):>6} " + " ".join(f"{c:>13}" for c in cols))
    if any(m for by_seed in moves.values() for m in by_seed.values()):
        print("\nDPO steps of each round: change of the summed log-prob of chosen / rejected (last 5 steps - first 5)")
        for name, by_seed in moves.items():
            runs = [m for m in by_seed.values() if m]
            if runs:
                cols = [f"{statistics.mean(m[k][0] for m in runs):+.2f} / {statistics.mean(m[k][1] for m in runs):+.2f}"
                        for k in range(min(len(m) for m in runs))]
                print(f"{name:>13} " + " ".join(f"{c:>17}" for c in cols))
    if args.quick:
        print("quick mode: a toy run of every part; no claim (run without --quick for the BENCH lines)")
    elif results.get("loop") and results.get("control"):
        common = sorted(set(results["loop"]) & set(results["control"]))
        loop = [results["loop"][s][-1] for s in common]
        ctrl = [results["control"][s][-1] for s in common]
        gain = statistics.mean(loop) - statistics.mean(ctrl)
        noise = max(spread(loop), spread(ctrl))
        ok = gain > noise and len(common) >= 3
        print(f"BENCH flywheel_loop_vs_control ours={statistics.mean(loop):.3f} peer={statistics.mean(ctrl):.3f} "
              f"ratio={statistics.mean(loop) / max(statistics.mean(ctrl), 1e-9):.2f} "
              f"target=gain>{noise:.3f}(sd,{len(common)}seeds) {'PASS' if ok else 'FAIL'}")
        means = [statistics.mean(results["loop"][s][k] for s in common) for k in range(n_rounds)]
        rises = all(b > a for a, b in zip(means, means[1:]))
        print(f"BENCH flywheel_rises ours={means[-1]:.3f} peer={means[0]:.3f} ratio={means[-1] / max(means[0], 1e-9):.2f} "
              f"target=rises_every_round {'PASS' if rises else 'FAIL'}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
