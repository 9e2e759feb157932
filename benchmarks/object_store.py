"""A bucket round trip vs local disk: the same job reading its input from and writing its output to
gs:// (fake-gcs-server) and s3:// (moto's server), both on loopback, against local paths.

The job: read JSONL shards -> validate -> length filter -> write shards (+ rejects, dead letters,
_report.json, _SUCCESS.json), on the Beam FnApiRunner and on the plain loop, side by side in one
run, best of N, interleaved. The servers are emulators on this machine (moto is itself Python and
shares the 2 cores with the job), so the ratio bounds what our filesystem layer and commit
protocol add (listing, streaming reads in 4 MB blocks, one PUT per shard, one DELETE per stray),
not what a real bucket's network costs. Target: bucket / local <= 2.0 on the Beam engine for gs://.
``--quick`` (50k rows, one pass) checks that every variant keeps the same rows and says SKIP.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the loopback servers of the tests
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no gRPC probe per bucket (the emulator has none)

from beam_overhead import job_config, make_input, timed_job  # noqa: E402

from dataflywheel.io import fs  # noqa: E402


def upload_inputs(paths: list[str], bucket: str) -> str:
    for path in paths:
        fs.copy_file(path, f"{bucket}/in/{os.path.basename(path)}")
    return f"{bucket}/in/*.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50k rows, one repeat (a check, not the claim)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    rows = args.rows or (50_000 if args.quick else 200_000)
    repeats = args.repeats or (1 if args.quick else 3)
    target = 2.0
    try:
        from object_store import gcs_emulator, new_bucket, s3_emulator
    except ImportError as err:
        print(f"BENCH object_store SKIP (the loopback servers need the dev extra: {err})")
        return 0

    with tempfile.TemporaryDirectory() as tmp, gcs_emulator(tmp) as _, s3_emulator(tmp) as _:
        tmp = Path(tmp)
        local_inputs = make_input(tmp, rows, files=4)
        mb = sum(os.path.getsize(p) for p in local_inputs) / 1e6
        print(f"input: {rows:,} rows in 4 JSONL files ({mb:.1f} MB); stage: length filter (min_words=20)")
        where = {"local": (str(tmp / "in-*.jsonl"), str(tmp / "out"))}
        for scheme in ("gs", "s3"):
            bucket = new_bucket(scheme)
            where[scheme] = (upload_inputs(local_inputs, bucket), f"{bucket}/out")
        times: dict[tuple[str, str], list[float]] = {}
        kept: dict[tuple[str, str], int] = {}
        for r in range(repeats):
            for engine in ("local", "plain"):
                for place, (inputs, out) in where.items():
                    t, report = timed_job(job_config(inputs, f"{out}-{engine}-{r}", engine))
                    times.setdefault((engine, place), []).append(t)
                    kept[engine, place] = report.outputs["kept"]["rows"]
        assert len(set(kept.values())) == 1, f"variants disagree: {kept}"
        print(f"{'engine':<8}{'where':<8}{'seconds':>9}{'rows/s':>12}{'vs local':>10}")
        for engine in ("local", "plain"):
            base = min(times[engine, "local"])
            for place in where:
                t = min(times[engine, place])
                print(f"{engine:<8}{place:<8}{t:>9.2f}{rows / t:>12,.0f}{t / base:>9.2f}x")
        print(f"kept {next(iter(kept.values())):,} of {rows:,} rows in every variant")
        ours, peer = min(times["local", "gs"]), min(times["local", "local"])
        ratio = ours / peer
        status = "PASS" if ratio <= target else "FAIL"
        if args.quick:
            status = f"SKIP (quick: {rows // 1000}k rows, one pass; run without --quick)"
        claim = "object_store_gs_roundtrip" if rows >= 200_000 else f"object_store_gs_roundtrip_{rows // 1000}k"
        print(f"BENCH {claim} ours={ours:.2f} peer={peer:.2f} ratio={ratio:.2f} target=<={target} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
