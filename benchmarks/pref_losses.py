"""Every preference loss of ``train/pref_losses.py``: ours vs TRL 1.16's trainer, loss curve and step time (docs/benchmarks.md#training).

One tiny Llama (hidden 64, 2 layers, vocab 2048, built here), the same HH-RLHF pairs in the same
order (pairs that do not fit ``max_length`` on either side are removed up front, so neither trainer
drops or cuts any), batch 4 pairs, AdamW torch, lr 1e-4 cosine, beta 0.1, fp32 on CPU, one thread
(``torch.set_num_threads(1)``: both trainers run in this process, one after the other). For each
loss, ours (``dataflywheel.train.dpo.run``, reference precomputed) and TRL's trainer for it run the
same number of steps (``--quick``: 4, else 12) from the same weights:

  sigmoid, ipo, hinge, robust, bco_pair, apo_zero, discopop, sigmoid_norm, rpo (= [sigmoid, sft]),
  nca_pair, sppo_hard, apo_down, aot, aot_unpaired, exo_pair:
      ``trl.DPOTrainer`` with that ``loss_type`` and ``precompute_ref_log_probs`` (robust and
      exo_pair with label_smoothing 0.1: robust is sigmoid at 0, exo_pair needs it > 0);
  simpo: ``trl.experimental.cpo.CPOTrainer`` (loss_type simpo, cpo_alpha 0, simpo_gamma 0.5);
  orpo: ``trl.experimental.orpo.ORPOTrainer``;
  kto: ``trl.KTOTrainer`` with ``precompute_ref_log_probs`` on the pairs unpaired, batch 8 rows
      (each step: the 4 pairs' chosen rows, then their rejected rows: the same pairs as our step);
  dpop: ours only (DPO-Positive is not in TRL): its step-0 loss must be ln 2 (the penalty is 0 while
      the policy is the reference) within trl_peer.LN2_TOL: the precompute pass pads and sums in
      another order than training, which moves the step-0 loss by ~1e-6 (6e-6 at 48 pairs). The
      same effect is the ~1e-5 step-0 |diff| of the other losses (1e-3 for sppo_hard, whose
      squares of (r - 1/(2 beta)) multiply a log-ratio error by 10); ORPO's 2e-3 to 8e-3 at step 0
      is its NLL's token mean over TRL's two extra tokens.

Two lines per loss: ``pref_loss_<name>_vs_trl_max_abs_diff`` (max |ours - TRL| over the per-step
loss curve) and ``pref_loss_<name>_step_time`` (median s/step over steps 1.., lower is better; the
first step carries start-up). Step 0 agrees closely everywhere (same weights, and for reference
losses ref == policy); the curves then drift apart a little because the trainers do not score the
same completion tokens:

* TRL's ``DPOTrainer`` and ``KTOTrainer`` also score the newline the chat template writes after
  ``<|im_end|>``; ours stops at ``<|im_end|>`` (train_dpo.py's known difference, 0.011 there).
* TRL's ``CPOTrainer`` and ``ORPOTrainer`` render the template to text and then append an EOS when
  the completion does not end in one: the completion becomes ``...<|im_end|>\\n<|im_end|>``, two
  tokens more than ours. SimPO and ORPO are length-normalised (per-token means), so these tokens
  move their values more than a summed log-ratio that starts at 0.
* TRL's KTO reference point z0 comes from 8 mismatched rows per step (completions rotated within the
  batch of unpaired rows); ours from one per pair (its prompt with the previous pair's chosen
  completion), so z0 differs once the policy moves (it is 0 at step 0 on both sides).

The tolerance is train_dpo.py's (0.02 on a loss of ln 2 after 30 steps, about 3%) scaled by the
loss's size: 0.02 x max(1, TRL step-0 loss / ln 2). IPO starts at (1 / 2 beta)^2 = 25, RPO and ORPO
carry an NLL of about ln(vocab) ~ 7.6, so an absolute 0.02 would be far stricter for them than for
DPO. A real formula bug (a wrong sign, a missing reference, a sum for a mean) is off by far more.

Step time: ours / TRL <= 1.0 PASS. With ``--quick`` only 3 steps are timed on a shared 2-core
machine, so a ratio within 20% above 1.0 says SKIP (noise) rather than FAIL; above that it FAILs.
TRL is a benchmark-only dependency (``pip install trl==1.16.0``); without it the TRL lines SKIP.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: one thread for both trainers
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sft import bench  # noqa: E402
from trl_peer import DATA, LN2_TOL, corpus_text, load_pairs  # noqa: E402

MAX_LENGTH, LR, BATCH, BETA = 512, 1e-4, 4, 0.1
MARGIN = 2  # TRL's CPO/ORPO completions are 2 tokens longer than ours (newline + appended EOS): keep room
HIDDEN, LAYERS, HEADS, VOCAB = 64, 2, 4, 2048
TRL_MATCH = {"lr_scheduler_type": "cosine", "optim": "adamw_torch", "train_sampling_strategy": "sequential"}
QUICK_NOISE = 1.2  # --quick: a step-time ratio in (1.0, 1.2] is within run-to-run noise of 3 timed steps

# name -> (our DpoConfig settings, TRL trainer, TRL config settings); None: no TRL peer
LOSSES: dict[str, tuple[dict, str | None, dict]] = {
    "sigmoid": ({"loss_type": "sigmoid"}, "dpo", {"loss_type": ["sigmoid"]}),
    "ipo": ({"loss_type": "ipo"}, "dpo", {"loss_type": ["ipo"]}),
    "hinge": ({"loss_type": "hinge"}, "dpo", {"loss_type": ["hinge"]}),
    "robust": ({"loss_type": "robust", "label_smoothing": 0.1}, "dpo",
               {"loss_type": ["robust"], "label_smoothing": 0.1}),
    "bco_pair": ({"loss_type": "bco_pair"}, "dpo", {"loss_type": ["bco_pair"]}),
    "apo_zero": ({"loss_type": "apo_zero"}, "dpo", {"loss_type": ["apo_zero"]}),
    "discopop": ({"loss_type": "discopop"}, "dpo", {"loss_type": ["discopop"]}),
    "sigmoid_norm": ({"loss_type": "sigmoid_norm"}, "dpo", {"loss_type": ["sigmoid_norm"]}),
    "rpo": ({"loss_type": ["sigmoid", "sft"]}, "dpo", {"loss_type": ["sigmoid", "sft"]}),
    "nca_pair": ({"loss_type": "nca_pair"}, "dpo", {"loss_type": ["nca_pair"]}),
    "sppo_hard": ({"loss_type": "sppo_hard"}, "dpo", {"loss_type": ["sppo_hard"]}),
    "apo_down": ({"loss_type": "apo_down"}, "dpo", {"loss_type": ["apo_down"]}),
    "aot": ({"loss_type": "aot"}, "dpo", {"loss_type": ["aot"]}),
    "aot_unpaired": ({"loss_type": "aot_unpaired"}, "dpo", {"loss_type": ["aot_unpaired"]}),
    "exo_pair": ({"loss_type": "exo_pair", "label_smoothing": 0.1}, "dpo",
                 {"loss_type": ["exo_pair"], "label_smoothing": 0.1}),
    "simpo": ({"loss_type": "simpo", "simpo_gamma": 0.5}, "cpo",
              {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5}),
    "orpo": ({"loss_type": "orpo"}, "orpo", {}),
    "kto": ({"loss_type": "kto"}, "kto", {"loss_type": "kto"}),
    "dpop": ({"loss_type": "dpop"}, None, {}),
}


def fitting(pairs: list[dict], model_dir: Path) -> list[dict]:
    """Pairs whose chosen and rejected fit MAX_LENGTH under the template with MARGIN tokens to spare."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def size(messages: list[dict]) -> int:
        return len(tok.apply_chat_template(messages, tokenize=True, return_dict=False))

    return [p for p in pairs
            if max(size(p["prompt"] + p["chosen"]), size(p["prompt"] + p["rejected"])) < MAX_LENGTH - MARGIN]


def ours(model_dir: Path, data: Path, out: Path, settings: dict, steps: int) -> dict:
    from dataflywheel.train.dpo import DpoConfig, run

    cfg = DpoConfig(model=str(model_dir), data=[str(data)], output=str(out / "run"), eval_fraction=0.0,
                    max_length=MAX_LENGTH, beta=BETA, lint="drop", resume=False, **settings,
                    loop={"lr": LR, "schedule": "cosine", "batch_size": BATCH, "max_steps": steps, "shuffle": False,
                          "progress": False})
    t0 = time.perf_counter()
    summary = run(cfg)
    log = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "seconds": [s["seconds"] for s in log], "losses": [s["loss"] for s in log],
            "wall": time.perf_counter() - t0}


def trl_run(kind: str, model_dir: Path, pairs: list[dict], out: Path, settings: dict, steps: int) -> dict:
    """``steps`` steps of TRL's trainer ``kind`` (dpo, cpo, orpo, kto) on the pairs; per-step seconds and losses."""
    from datasets import Dataset
    from trl_peer import _callback_class, _common_args, _instrument, _load_model

    model, tok = _load_model(model_dir)
    rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    batch = BATCH
    if kind == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        settings = {"precompute_ref_log_probs": True, **settings}
    elif kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    elif kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:  # kto: unpaired rows, each step's 4 chosen then its 4 rejected (all KL rows then mismatched)
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        settings = {"precompute_ref_log_probs": True, **settings}
        batch = 2 * BATCH
        unpaired = []
        for at in range(0, len(rows) - len(rows) % BATCH, BATCH):
            group = rows[at:at + BATCH]
            unpaired += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in group]
            unpaired += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in group]
        rows = unpaired
    args = Config(**_common_args(out, batch_size=batch, grad_accum=1, steps=steps, lr=LR, seed=0), **TRL_MATCH,
                  max_length=MAX_LENGTH, beta=BETA, **settings)
    rec = _callback_class()()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-trainer notices
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          callbacks=[rec])
    _instrument(trainer, lambda b, n: (0, 0, 0))  # drops the PrinterCallback; token counts not needed here
    trainer.train()
    return {"seconds": rec.step_times, "compute": rec.compute_times, "losses": [log["loss"] for log in rec.logs],
            "wall": time.perf_counter() - t0}


def time_line(name: str, mine: float, peer: float, quick: bool) -> str:
    line = bench(f"pref_loss_{name}_step_time", mine, peer, "<=1.0", mine <= peer)
    if quick and peer < mine <= QUICK_NOISE * peer:
        return line.rsplit(" ", 1)[0] + f" SKIP (quick: 3 timed steps, within {QUICK_NOISE - 1:.0%} noise; run without --quick)"
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 steps a side (make bench)")
    ap.add_argument("--only", nargs="*", choices=list(LOSSES), help="these losses only")
    opts = ap.parse_args()
    steps = 4 if opts.quick else 12
    pairs = load_pairs(BATCH * steps * 4)
    if pairs is None:
        print(f"SKIP pref_losses: shared data not found at {DATA}")
        return 0
    import torch

    torch.set_num_threads(1)
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    names = opts.only or list(LOSSES)
    lines, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_causal_lm(tmp / "model", texts=corpus_text(pairs=pairs), arch="llama", hidden=HIDDEN,
                                         layers=LAYERS, heads=HEADS, vocab_size=VOCAB, seed=0, max_positions=MAX_LENGTH)
        pairs = fitting(pairs, model_dir)[: BATCH * steps]
        if len(pairs) < BATCH * steps:
            print(f"SKIP pref_losses: only {len(pairs)} HH-RLHF pairs fit {MAX_LENGTH} tokens, {BATCH * steps} needed")
            return 0
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps({"id": f"p{i}", **p}) + "\n" for i, p in enumerate(pairs)))
        print(f"{len(pairs)} HH-RLHF pairs fit {MAX_LENGTH - MARGIN} tokens; {steps} steps of {BATCH} pairs a side, "
              f"1 thread, tiny Llama hidden {HIDDEN} x {LAYERS} layers")
        for name in names:
            mine_cfg, kind, peer_cfg = LOSSES[name]
            mine = ours(model_dir, data, tmp / name / "ours", mine_cfg, steps)
            if mine["summary"]["pairs"] != len(pairs):  # our lint dropped some: the rows would not line up
                lines.append(f"BENCH pref_loss_{name}_vs_trl SKIP (our lint kept {mine['summary']['pairs']} of "
                             f"{len(pairs)} pairs)")
                continue
            s_mine = statistics.median(mine["seconds"][1:])
            if kind is None:
                d0 = abs(mine["losses"][0] - math.log(2))
                table.append((name, s_mine, None, mine["losses"], None, mine["wall"], None, None))
                lines.append(bench(f"pref_loss_{name}_step0_loss_minus_ln2", d0, None, f"<={LN2_TOL:g}", d0 <= LN2_TOL))
                lines.append(f"BENCH pref_loss_{name}_step_time ours={s_mine:.4g} peer=- ratio=- target=<=1.0 "
                             "SKIP (no TRL peer: DPO-Positive is not in TRL 1.16)")
                continue
            if not have_trl:
                lines.append(f"BENCH pref_loss_{name}_vs_trl SKIP (pip install trl==1.16.0)")
                continue
            peer = trl_run(kind, model_dir, pairs, tmp / name / "trl", peer_cfg, steps)
            if len(peer["losses"]) != len(mine["losses"]):
                lines.append(f"BENCH pref_loss_{name}_vs_trl SKIP (TRL logged {len(peer['losses'])} losses for "
                             f"{len(mine['losses'])} steps)")
                continue
            s_peer = statistics.median(peer["seconds"][1:])
            diff = max(abs(a - b) for a, b in zip(mine["losses"], peer["losses"]))
            tol = 0.02 * max(1.0, abs(peer["losses"][0]) / math.log(2))
            s_peer_compute = statistics.median(peer["compute"][1:])
            table.append((name, s_mine, s_peer, mine["losses"], peer["losses"], mine["wall"], peer["wall"], s_peer_compute))
            lines.append(bench(f"pref_loss_{name}_vs_trl_max_abs_diff", diff, None, f"<={tol:.3g}", diff <= tol))
            lines.append(time_line(name, s_mine, s_peer, opts.quick))
    # TRL compute: on_step_begin to on_step_end (its batch already fetched and collated); the claim uses the
    # interval between optimizer steps, as train_dpo.py does
    print(f"{'loss':<13}{'ours s/step':>12}{'TRL s/step':>11}{'TRL compute':>12}{'step-0 |diff|':>14}"
          f"{'max |diff|':>11}{'wall ours/TRL s':>17}  ours losses (first -> last)")
    for name, s_mine, s_peer, lm, lp, w_mine, w_peer, s_comp in table:
        d0 = "-" if lp is None else f"{abs(lm[0] - lp[0]):.2e}"
        dm = "-" if lp is None else f"{max(abs(a - b) for a, b in zip(lm, lp)):.2e}"
        walls = f"{w_mine:.1f}/" + ("-" if w_peer is None else f"{w_peer:.1f}")
        print(f"{name:<13}{s_mine:>12.4f}{'-' if s_peer is None else f'{s_peer:.4f}':>11}"
              f"{'-' if s_comp is None else f'{s_comp:.4f}':>12}{d0:>14}{dm:>11}"
              f"{walls:>17}  {lm[0]:.6f} -> {lm[-1]:.6f}" + ("" if lp is None else f" (TRL {lp[0]:.6f} -> {lp[-1]:.6f})"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
