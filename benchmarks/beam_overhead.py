"""Beam wrapper overhead: a cheap filter over >= 200k rows read from disk, Beam vs a plain loop.

Both sides run the same job (read JSONL shards -> validate -> Length filter -> write shards) with
the same stage objects, in one process run, side by side:

- ours:  the Beam wrapper on the pinned local FnApiRunner, in-process (batches between stages);
- peer:  the plain Python loop over the same stage objects (``engine: plain``);
- also shown: the same wrapper with batches of one row (what batching buys), and a naive
  per-element Beam pipeline (ReadFromText -> Map -> Filter -> WriteToText, no validation).

Target: ours / peer <= 1.5 on >= 200k rows. Prints ``BENCH beam_overhead ...``. ``--quick`` (50k
rows, one pass) checks that both engines keep the same rows; its ratio is printed but not judged
(``SKIP``): Beam's fixed start-up (~0.5 s) dominates so small an input.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job

WORDS = ("data flywheel beam curation dedup filter token model train sample prompt answer quality "
         "score reward language page text shard bundle worker batch stream").split()


def make_input(folder: Path, rows: int, files: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paths = []
    for f in range(files):
        path = folder / f"in-{f:02d}.jsonl"
        with open(path, "w") as out:
            for i in range(f, rows, files):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
                out.write(json.dumps({"id": f"r{i:07d}", "text": text, "meta": {"source": "bench"}}) + "\n")
        paths.append(str(path))
    return paths


def job_config(inputs: str, out: str, engine: str, batch: int = 1000) -> dict:
    return {"name": f"bench-{engine}", "runner": {"engine": engine},
            "input": {"paths": inputs, "kind": "document", "batch_rows": batch},
            "stages": [{"stage": "length", "min_words": 20, "batch_size": batch}],
            "output": {"path": out, "format": "jsonl", "rows_per_shard": 1_000_000}}


def timed_job(cfg: dict) -> tuple[float, object]:
    run = parse_config(cfg, "<bench>")
    start = time.perf_counter()
    report = run_job(run.jobs[0], run.runner)
    return time.perf_counter() - start, report


def naive_beam(inputs: str, out: str) -> float:
    """Per-element Beam: what a straightforward pipeline without our batching costs."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    start = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        (p | beam.io.ReadFromText(inputs) | beam.Map(json.loads)
         | beam.Filter(lambda r: len(r["text"].split()) >= 20)
         | beam.Map(json.dumps) | beam.io.WriteToText(out))
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50k rows, one repeat (a check, not the claim)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    rows = args.rows or (50_000 if args.quick else 200_000)
    repeats = args.repeats or (1 if args.quick else 3)
    target = 1.5

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_input(tmp, rows, files=4)
        inputs = str(tmp / "in-*.jsonl")
        mb = sum(os.path.getsize(p) for p in tmp.glob("in-*.jsonl")) / 1e6
        print(f"input: {rows:,} rows in 4 JSONL files ({mb:.1f} MB); stage: length filter (min_words=20)")
        plain_t, beam_t = [], []
        for r in range(repeats):  # interleaved, best of N: timings on this machine are noisy
            t, plain_report = timed_job(job_config(inputs, str(tmp / f"plain{r}"), "plain"))
            plain_t.append(t)
            t, beam_report = timed_job(job_config(inputs, str(tmp / f"beam{r}"), "local"))
            beam_t.append(t)
        naive_t = naive_beam(inputs, str(tmp / "naive" / "out"))
        unbatched_t, _ = timed_job(job_config(inputs, str(tmp / "unbatched"), "local", batch=1))
        kept = beam_report.outputs["kept"]["rows"]
        assert kept == plain_report.outputs["kept"]["rows"], "engines disagree"
        best_plain, best_beam = min(plain_t), min(beam_t)
        ratio = best_beam / best_plain
        print(f"{'variant':<42}{'seconds':>9}{'rows/s':>12}{'vs plain':>10}")
        for name, t in (("plain loop (same stage objects)", best_plain),
                        ("dataflywheel Beam wrapper, FnApiRunner", best_beam),
                        ("same wrapper, batches of 1 row", unbatched_t),
                        ("naive per-element Beam, FnApiRunner", naive_t)):
            print(f"{name:<42}{t:>9.2f}{rows / t:>12,.0f}{t / best_plain:>9.2f}x")
        print(f"kept {kept:,} of {rows:,} rows on both engines")
        status = "PASS" if ratio <= target else "FAIL"
        if args.quick:  # the claim is about >= 200k rows: at 50k, Beam's fixed start-up decides the ratio
            status = f"SKIP (quick: {rows // 1000}k rows, Beam start-up dominates; run without --quick)"
        # The claim is about >= 200k rows; a smaller run's line names its size instead of the claim's.
        claim = "beam_overhead" if rows >= 200_000 else f"beam_overhead_{rows // 1000}k"
        print(f"BENCH {claim} ours={best_beam:.2f} peer={best_plain:.2f} ratio={ratio:.2f} target=<={target} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
