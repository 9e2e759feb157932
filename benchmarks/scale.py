"""Whole-dataset steps at scale on one machine: wall time, peak RSS of the process tree and spill
disk per corpus size, on both local engines (the plain loop and Beam's FnApiRunner), which run
them in bounded memory (rows spilled to local disk; MinHash's band keys partitioned on disk and
paired in numpy, the other steps' joins and sorts in DuckDB).

Corpora are generated here, deterministically, as 8 gzip JSONL shards:
- dedup: ~200-word documents of letter-only pseudo-words (datatrove's normalizer maps digits to 0),
  60% unique and 40% near-copies of an earlier one at several edit rates (1, 3, 10 and 40 of 200
  words changed), through one ``minhash_dedup`` step (defaults);
- web (at 100k and 1M): real pages of the shared neardup corpus, each unique one with 15% of its
  words replaced and near-copies as above, through the web pipeline's text steps (line filter,
  language ID, Gopher, C4, FineWeb rules, sensitive content, exact and MinHash dedup).
Each run is a fresh child process (so peak RSS is that run's alone), sampled every 0.2 s with
psutil over the child and its children.

The budget (``runner.memory_budget_mb``, 2048 by default) is set to 64 MB here, so that even the
smallest corpus fills it: flat then means bounded, not merely "under a large budget" (MinHash's
partitions of band keys are budget / 128 bytes keys each: 100k documents' 1.8M keys already make
four of them). Claims, on
the plain engine: peak RSS at the largest size <= 1.2x peak RSS at the smallest, time grows at most
linearly (largest / smallest <= size ratio x 1.1), and with ``--peer`` at least 3x the documents/s
of datatrove 0.10.1's 4-stage local MinHash (2 tasks) at 1M. datatrove needs its own environment
(it pins xxhash<4 and tokenizes with spacy):

    python -m venv .venv-peer && .venv-peer/bin/pip install 'datatrove[io,processing]==0.10.1' 'spacy>=3.8,<3.9'
    python benchmarks/scale.py --peer .venv-peer/bin/python

``--quick`` runs 100k and 300k; ``--sizes``, ``--engines`` and ``--no-web`` pick parts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = 200
EDITS = (1, 3, 10, 40)
NEARDUP = Path(__file__).resolve().parents[2] / "shared" / "data" / "neardup" / "corpus.jsonl.gz"
CLAIM_BUDGET_MB = 64  # the smallest runner.memory_budget_mb: even 100k documents fill it
WEB_STEPS = {"url_filter": False, "extract": False}  # the web pipeline's text steps: JSONL documents in


def make_corpus(folder: Path, n: int, shards: int = 8, seed: int = 0) -> str:
    """``n`` documents: 60% unique, 40% near-copies of an earlier one with a few words changed."""
    rng = random.Random(seed)
    vocab = [_word(i) for i in range(50_000)]  # letters only: datatrove's normalizer maps every digit to 0
    folder.mkdir(parents=True, exist_ok=True)
    outs = [gzip.open(folder / f"shard-{k:02d}.jsonl.gz", "wt", compresslevel=1) for k in range(shards)]
    recent: list[list[str]] = []
    for i in range(n):
        if recent and rng.random() < 0.4:
            words = list(rng.choice(recent))
            for _ in range(rng.choice(EDITS)):
                words[rng.randrange(WORDS)] = rng.choice(vocab)
        else:
            words = rng.choices(vocab, k=WORDS)
            recent.append(words)
            if len(recent) > 1000:
                recent.pop(rng.randrange(len(recent)))
        outs[i % shards].write(json.dumps({"id": f"d{i:08d}", "text": " ".join(words)}) + "\n")
    for out in outs:
        out.close()
    return str(folder / "*.jsonl.gz")


def make_web_corpus(folder: Path, n: int, shards: int = 8, seed: int = 0) -> str | None:
    """``n`` real-looking web documents (None without the shared neardup corpus): 60% a real page
    of it with 15% of its words replaced (variants of one page share few 5-grams: not near
    duplicates), 40% near-copies of an earlier one (as ``make_corpus``). Line breaks are kept, so
    the line-level rules see real lines; the language mix is the corpus's own."""
    if not NEARDUP.is_file():
        return None
    rng = random.Random(seed)
    with gzip.open(NEARDUP, "rt") as fh:
        pages = [re.split(r"(\s+)", json.loads(line)["text"]) for line in fh]
    vocab = sorted({t for page in pages[:2000] for t in page[::2] if t.isascii() and t.isalpha()})
    folder.mkdir(parents=True, exist_ok=True)
    outs = [gzip.open(folder / f"shard-{k:02d}.jsonl.gz", "wt", compresslevel=1) for k in range(shards)]
    recent: list[list[str]] = []
    for i in range(n):
        if recent and rng.random() < 0.4:
            tokens, edits = list(rng.choice(recent)), rng.choice(EDITS)
        else:
            tokens = list(rng.choice(pages))
            edits = len(tokens) * 15 // 200  # tokens alternate word, space: 15% of the words
            recent.append(tokens)
            if len(recent) > 1000:
                recent.pop(rng.randrange(len(recent)))
        for _ in range(edits):
            tokens[2 * rng.randrange((len(tokens) + 1) // 2)] = rng.choice(vocab)
        outs[i % shards].write(json.dumps({"id": f"w{i:08d}", "text": "".join(tokens)}) + "\n")
    for out in outs:
        out.close()
    return str(folder / "*.jsonl.gz")


def _word(i: int) -> str:
    """The i-th pseudo-word: i in base 26, as letters (0 -> "a", 26 -> "ba")."""
    letters = ""
    while True:
        i, r = divmod(i, 26)
        letters = chr(97 + r) + letters
        if not i:
            return letters


def measure(cmd: list[str], env: dict, spill: Path) -> tuple[float, float, float, str]:
    """(seconds, peak RSS GB of the process tree, peak spill GB, stdout) of one child run."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, disk, start = 0, 0, time.perf_counter()
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        disk = max(disk, sum(f.stat().st_size for f in spill.rglob("*") if f.is_file()))
        time.sleep(0.2)
    reader.join()
    return time.perf_counter() - start, peak / 1e9, disk / 1e9, "".join(out)


def run_once(tmp: Path, inputs: str, n: int, engine: str, memory_mb: int, job: str = "dedup") -> tuple[int, float, float] | None:
    """One job in a child process (``dedup``: one minhash_dedup step; ``web``: the web pipeline's
    text steps); prints its line; (docs, seconds, peak RSS GB)."""
    runner = {"engine": engine, "memory_budget_mb": memory_mb}
    out_dir = tmp / f"out{n}-{engine}-{job}"
    cfg = {"name": f"{job}{n}", "runner": runner, "input": {"paths": inputs, "kind": "document"},
           "output": {"path": str(out_dir), "format": "jsonl.gz", "write_rejected": False}}
    cfg.update({"stages": [{"stage": "minhash_dedup"}]} if job == "dedup" else {"steps": WEB_STEPS})
    path = tmp / f"{job}{n}-{engine}.yaml"
    path.write_text(json.dumps(cfg))
    spill = tmp / f"spill{n}-{engine}-{job}"
    spill.mkdir()
    env = {**os.environ, "DATAFLYWHEEL_SPILL": str(spill)}
    command = "run" if job == "dedup" else "curate"
    seconds, rss, disk, out = measure([sys.executable, "-m", "dataflywheel.cli", command, str(path), "--quiet"],
                                      env, spill)
    if not (out_dir / "_report.json").is_file():
        print(out[-3000:])
        return None
    kept = json.loads((out_dir / "_report.json").read_text())["stages"][-1]["kept"]
    shutil.rmtree(out_dir)
    _line(n, job, engine, seconds, rss, disk, kept)
    return n, seconds, rss


def _line(n: int, job: str, engine: str, seconds: float, rss: float, disk: float, kept: int) -> None:
    print(f"{n:>10,}{job:>6}{engine:>10}{seconds:>10.1f}{n / seconds:>10,.0f}{rss:>13.2f}{disk:>10.2f}{kept:>10,}",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k and 300k documents")
    ap.add_argument("--sizes", default=None, help="comma-separated document counts")
    ap.add_argument("--memory-mb", type=int, default=CLAIM_BUDGET_MB,
                    help=f"runner.memory_budget_mb (default {CLAIM_BUDGET_MB}: see the module docstring)")
    ap.add_argument("--engines", default="plain,local", help="engines to run (the claims are on plain)")
    ap.add_argument("--no-web", action="store_true", help="skip the web pipeline's text steps at 100k and 1M")
    ap.add_argument("--peer", default=None, help="a Python with datatrove 0.10.1 (its own venv: it needs xxhash<4 "
                    "and spacy): runs datatrove's 4-stage MinHash at 100k and 1M beside ours")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [100_000, 300_000] if args.quick else [100_000, 300_000, 1_000_000, 3_000_000])
    engines = args.engines.split(",")
    results = []
    peers: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'docs':>10}{'job':>6}{'engine':>10}{'seconds':>10}{'docs/s':>10}{'peak RSS GB':>13}{'spill GB':>10}"
              f"{'kept':>10}")
        for n in sizes:
            inputs = make_corpus(tmp / f"c{n}", n)
            for engine in engines:
                row = run_once(tmp, inputs, n, engine, args.memory_mb)
                if row is None:
                    return 1
                if engine == "plain":
                    results.append(row)
            if args.peer and n in (100_000, 1_000_000):
                work = tmp / f"datatrove{n}"
                script = str(Path(__file__).parent / "peers" / "datatrove_minhash.py")
                seconds, rss, disk, out = measure([args.peer, script, str(tmp / f"c{n}"), str(work), "2"],
                                                  dict(os.environ), work)
                kept = int(out.rsplit("KEPT ", 1)[-1].split()[0]) if "KEPT " in out else -1
                peers[n] = seconds
                _line(n, "dedup", "datatrove", seconds, rss, disk, kept)
                shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(tmp / f"c{n}")
            if not args.no_web and n in (100_000, 1_000_000):
                web = make_web_corpus(tmp / f"w{n}", n)
                if web is None:
                    print(f"web pipeline at {n:,}: SKIP (no {NEARDUP})")
                for engine in engines if web else []:
                    if run_once(tmp, web, n, engine, args.memory_mb, job="web") is None:
                        return 1
                shutil.rmtree(tmp / f"w{n}", ignore_errors=True)
    for n, seconds in peers.items():
        ours = next(t for m, t, _ in results if m == n)
        ratio = seconds / ours  # docs/s ours over docs/s datatrove
        status = "PASS" if ratio >= 3 else "FAIL"
        if n < 1_000_000:
            status = f"SKIP ({n // 1000}k documents; the claim is at 1M)"
        print(f"BENCH scale_vs_datatrove_{n // 1000}k ours={n / ours:.0f} peer={n / seconds:.0f} ratio={ratio:.2f} "
              f"target=>=3 {status}")
    if len(results) < 2:
        print("BENCH scale_memory_flat SKIP (the claims need two sizes on the plain engine)")
        return 0
    (n0, t0, m0), (n1, t1, m1) = results[0], results[-1]
    flat = m1 / m0
    linear = (t1 / t0) / (n1 / n0)
    status = "PASS" if flat <= 1.2 else "FAIL"
    if args.quick:
        status = f"SKIP (quick: {n1 // 1000}k documents; the claim is at 3M)"
    print(f"BENCH scale_memory_flat ours={m1:.2f} peer={m0:.2f} ratio={flat:.2f} target=<=1.2 {status}")
    status = "PASS" if linear <= 1.1 else "FAIL"
    if args.quick:
        status = f"SKIP (quick: {n1 // 1000}k documents; the claim is at 3M)"
    print(f"BENCH scale_time_linear ours={t1:.1f} peer={t0:.1f} ratio={linear:.2f} target=<=1.1 {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
