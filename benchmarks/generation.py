"""Generation through the Beam pipeline vs the same backend called directly, in one run.

A tiny Llama built here (no download) and prompts written here; both sides use the in-process
transformers backend with the same settings and no cache:

- ours: a job on the local FnApiRunner: read the prompt JSONL -> ``generate`` stage -> write
  shards, the whole pipeline, start-up included;
- peer: ``backend.generate(requests)`` in a loop over batches of the same size, same prompts.

The texts must be identical (per-sample seeds make them independent of batching):
``BENCH generation_same_texts``; the pipeline may cost at most 10% over the direct loop:
``BENCH generation_pipeline_overhead``. Best of ``--repeats`` interleaved runs. Beam's fixed start-up
(~0.6 s on the local runner) is part of ours, so the quick mode (64 prompts) measures mostly that:
there the texts are checked and the overhead line says ``SKIP``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from dataflywheel.io import read
from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.pipelines.config import parse_config
from dataflywheel.pipelines.job import run_job
from dataflywheel.synth.backends.base import Request, Sampling, request_seed
from dataflywheel.synth.backends.transformers import TransformersBackend

TOPICS = ("rivers", "bread", "bicycles", "gardens", "libraries", "trains", "music", "weather", "stars", "tea")
VERBS = ("Describe", "Explain", "List facts about", "Write a short note on", "Give advice about", "Compare")


def prompts(n: int) -> list[dict]:
    return [{"id": f"p{i:05d}", "prompt": f"{VERBS[i % len(VERBS)]} {TOPICS[i % len(TOPICS)]} (case {i})."}
            for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 prompts x 24 tokens, one repeat")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n, tokens, repeats = (64, 24, 1) if args.quick else (args.prompts, args.tokens, args.repeats)
    batch = 32
    sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=tokens, seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_causal_lm(Path(tmp) / "model", hidden=256, layers=4, max_positions=1024))
        rows = prompts(n)
        src = Path(tmp) / "prompts.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        backend = TransformersBackend(model, batch_size=batch)
        backend.generate([Request("warm", messages=({"role": "user", "content": "hi"},), sampling=sampling)])
        requests = [Request(r["id"], messages=({"role": "user", "content": r["prompt"]},),
                            sampling=sampling.model_copy(update={"seed": request_seed(sampling.seed, r["id"])}))
                    for r in rows]  # the stage's per-row seeds
        stage = {"stage": "generate", "batch_size": batch, "reject_overlong": False,
                 "backend": {"kind": "transformers", "model": model, "options": {"batch_size": batch}},
                 "sampling": sampling.model_dump()}
        direct_t, pipe_t = [], []
        for r in range(repeats):
            start = time.perf_counter()
            direct = {}
            for i in range(0, len(requests), batch):
                for res in backend.generate(requests[i:i + batch]):
                    direct[res.request_id] = res.samples[0].text
            direct_t.append(time.perf_counter() - start)
            out = Path(tmp) / f"out{r}"
            cfg = parse_config({"name": "bench", "runner": {"engine": "local"},
                                "input": {"paths": str(src), "kind": "prompt", "batch_rows": batch},
                                "stages": [stage], "output": {"path": str(out), "format": "jsonl"}}, "<bench>")
            start = time.perf_counter()
            report = run_job(cfg.jobs[0], cfg.runner)
            pipe_t.append(time.perf_counter() - start)
            piped = {row["id"]: row["completions"][0]["text"] for row in read(str(out))}
            if any((out / "_rejected").glob("part-*")):
                piped.update({row["id"]: row["completions"][0]["text"] for row in read(str(out / "_rejected"))})
        generated = report.stages[-1].stats.get("tokens_generated", 0)
        best_d, best_p = min(direct_t), min(pipe_t)
        same = piped == direct
        ratio = best_p / best_d
        print(f"{n} prompts x <= {tokens} tokens, tiny Llama (hidden 256, 4 layers), batch {batch}, CPU")
        print(f"direct backend loop: {best_d:.2f} s ({generated / best_d:,.0f} tokens/s)")
        print(f"Beam pipeline:       {best_p:.2f} s ({generated / best_p:,.0f} tokens/s), start-up and IO included")
        print(f"BENCH generation_same_texts prompts={n} identical={same} {'PASS' if same else 'FAIL'}")
        status = "PASS" if ratio <= 1.10 else "FAIL"
        if args.quick:
            status = (f"SKIP (quick: {n} prompts x {tokens} tokens, Beam start-up dominates; "
                      "run without --quick)")
        print(f"BENCH generation_pipeline_overhead ours={best_p:.2f} peer={best_d:.2f} ratio={ratio:.3f} "
              f"target=<=1.10 {status}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
