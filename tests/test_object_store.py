"""Pipelines with inputs and outputs in buckets, against real servers on loopback (fake-gcs-server
for gs://, moto for s3://): the same rows as the same jobs on local paths, the commit protocol under
a kill -9 in the middle of a write, streaming reads, and no credential in any output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from object_store import S3_KEY_ID, S3_SECRET, upload

from dataflywheel.cli import main
from dataflywheel.errors import UserError
from dataflywheel.io import expand_paths, fs, read
from dataflywheel.io.commit import read_success

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
POOL = REPO / "dataflywheel" / "data" / "demo" / "sft_pool.jsonl"


def rows(folder: str, root: str = "") -> list[dict]:
    """A folder's rows sorted by id, with the input root taken out of ``source`` fields."""
    def clean(row: dict) -> dict:
        text = json.dumps(row, sort_keys=True)
        return json.loads(text.replace(root, "<root>")) if root else row

    return sorted((clean(r) for r in read(folder) if isinstance(r, dict)),
                  key=lambda r: json.dumps(r, sort_keys=True))


def same_outputs(local: str, remote: str, local_root: str, remote_root: str) -> None:
    for sub in ("", "_rejected", "_dead_letter"):
        a, b = fs.join(local, sub) if sub else local, fs.join(remote, sub) if sub else remote
        if read_success(a) is None:
            assert read_success(b) is None
            continue
        assert rows(a, local_root) == rows(b, remote_root), sub or "kept"
    ours, theirs = read_success(local), read_success(remote)
    assert (ours["rows"], ours["ids"]) == (theirs["rows"], theirs["ids"])


def test_filesystem_layer_on_a_bucket(bucket):
    fs.write_text(f"{bucket}/a/b/c.jsonl", '{"id": "1", "text": "x"}\n')
    fs.write_text(f"{bucket}/a/d.jsonl", '{"id": "2", "text": "y"}\n')
    fs.write_text(f"{bucket}/a/_hidden/e.jsonl", "not data\n")
    assert fs.isdir(f"{bucket}/a") and fs.isfile(f"{bucket}/a/d.jsonl") and not fs.exists(f"{bucket}/zz")
    assert expand_paths(f"{bucket}/a/**/*.jsonl") == [f"{bucket}/a/b/c.jsonl", f"{bucket}/a/d.jsonl"]
    assert expand_paths(f"{bucket}/a") == [f"{bucket}/a/b/c.jsonl", f"{bucket}/a/d.jsonl"]
    assert [r["id"] for r in read(f"{bucket}/a")] == ["1", "2"]
    with pytest.raises(RuntimeError), fs.atomic_path(f"{bucket}/a/never.jsonl") as tmp:
        Path(tmp).write_text("half")
        raise RuntimeError("the writer dies")
    assert not fs.exists(f"{bucket}/a/never.jsonl")  # a failed write leaves nothing
    fs.remove_tree(f"{bucket}/a")
    assert fs.listdir(f"{bucket}/a") == []
    with pytest.raises(UserError, match="no input files match"):
        expand_paths(f"{bucket}/a/*.jsonl")


def test_reading_a_large_object_streams(s3_server, tmp_path):
    """A 64 MB object is read in blocks: Python never holds more than a few MB of it."""
    name = "s3://t-stream"
    fs.filesystem(name)[0].mkdir("t-stream")
    line = json.dumps({"id": "x", "text": "w " * 500}) + "\n"
    local = tmp_path / "big.jsonl"
    with open(local, "w") as fh:
        for i in range(64 * 1024 * 1024 // len(line)):
            fh.write(line.replace('"x"', f'"{i}"'))
    upload(local, f"{name}/big.jsonl")
    tracemalloc.start()
    n = sum(1 for _ in read(f"{name}/big.jsonl"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 64 * 1024 * 1024 // len(line)
    assert peak < 24 * 1024 * 1024, f"peak {peak / 2**20:.0f} MB while reading a 64 MB object"


def test_curate_warc_in_a_bucket_equals_local(bucket, shared_data, tmp_path, monkeypatch):
    """WARC/ARC files (malformed ones included) in a bucket -> documents in a bucket, on Beam."""
    monkeypatch.chdir(REPO)
    crawl = upload(shared_data / "warc_samples", f"{bucket}/crawl")
    cfg = yaml.safe_load((REPO / "configs" / "web.yaml").read_text())
    cfg["steps"]["extract"] = {"mode": "fast"}
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(cfg))
    local_in = str(shared_data / "warc_samples")
    assert main(["curate", str(path), "--input", local_in, "--output", str(tmp_path / "local")]) == 0
    assert main(["curate", str(path), "--input", crawl, "--output", f"{bucket}/docs"]) == 0
    same_outputs(str(tmp_path / "local"), f"{bucket}/docs", local_in, crawl)
    report = json.loads(fs.read_text(f"{bucket}/docs/_report.json"))
    assert report["reconciled"] and report["stages"][0]["kept"] > 100


def test_select_in_a_bucket_equals_local(bucket, tmp_path):
    """An SFT selection job reading its pool and its scoring model from a bucket."""
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "lm", max_positions=512)
    remote_model = upload(model, f"{bucket}/models/lm")
    pool = upload(POOL, f"{bucket}/pool/sft_pool.jsonl")

    def job(input_path: str, model_path: str, out: str) -> None:
        cfg = {"name": "sel", "runner": {"engine": "local"}, "input": {"paths": input_path},
               "output": {"path": out, "format": "parquet"},
               "steps": {"ifd": {"model": model_path, "max_ifd": None, "device": "cpu"}},
               "select": {"method": "top", "budget": 10, "field": "ifd"}}
        path = tmp_path / f"sel-{len(list(tmp_path.glob('sel-*')))}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["select", str(path)]) == 0

    job(str(POOL), str(model), str(tmp_path / "local"))
    job(pool, remote_model, f"{bucket}/selected")
    same_outputs(str(tmp_path / "local"), f"{bucket}/selected", str(POOL), pool)
    assert read_success(f"{bucket}/selected")["rows"] == 10


def test_cache_in_a_bucket_is_shared_by_fresh_machines(bucket, tmp_path, monkeypatch):
    """A sqlite cache at a bucket URL: each machine works on a local file and leaves a snapshot;
    a fresh machine starts with every earlier machine's entries."""
    from dataflywheel.models import store_sync
    from dataflywheel.models.store import SqliteStore

    url = f"{bucket}/cache/scores.sqlite"
    monkeypatch.setenv("DATAFLYWHEEL_CACHE", str(tmp_path / "machine-1"))
    first = SqliteStore(url, "kv")
    first.put_many([("a", "1")])
    first.close()
    monkeypatch.setenv("DATAFLYWHEEL_CACHE", str(tmp_path / "machine-2"))
    second = SqliteStore(url, "kv")
    assert second.get_many(["a"]) == {"a": "1"}  # merged from machine 1's snapshot
    second.put_many([("b", "2")])
    second.close()
    assert len([n for n, _ in fs.listdir(url)]) == 2  # one snapshot per machine
    monkeypatch.setenv("DATAFLYWHEEL_CACHE", str(tmp_path / "machine-1"))
    store_sync._MERGED.clear()  # a new process on machine 1
    again = SqliteStore(url, "kv")
    assert again.get_many(["a", "b"]) == {"a": "1", "b": "2"}
    again.close()


def test_selection_rerun_on_a_fresh_machine_reuses_a_bucket_cache(bucket, tmp_path, monkeypatch):
    from dataflywheel.models import store_sync
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    model = str(build_tiny_causal_lm(tmp_path / "lm", max_positions=512))
    pool = upload(POOL, f"{bucket}/pool/sft_pool.jsonl")
    cfg = {"name": "sel", "runner": {"engine": "local"}, "input": {"paths": pool},
           "steps": {"ifd": {"model": model, "max_ifd": None, "device": "cpu", "cache": f"{bucket}/cache/scores.sqlite"}},
           "select": {"method": "top", "budget": 10, "field": "ifd"}}
    stats = []
    for k in range(2):
        monkeypatch.setenv("DATAFLYWHEEL_CACHE", str(tmp_path / f"machine-{k}"))
        store_sync._MERGED.clear()
        path = tmp_path / f"sel-{k}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "output": {"path": f"{bucket}/out{k}"}}))
        assert main(["select", str(path), "--quiet"]) == 0
        report = json.loads(fs.read_text(f"{bucket}/out{k}/_report.json"))
        stats.append(next(s for s in report["stages"] if s["stage"] == "ifd")["stats"])
    assert stats[0]["pairs_scored"] > 0 and stats[1].get("pairs_scored", 0) == 0 and stats[1]["cache_hits"] > 0
    assert len(fs.listdir(f"{bucket}/cache/scores.sqlite")) == 2  # a snapshot per machine, in the bucket
    assert rows(f"{bucket}/out0") == rows(f"{bucket}/out1")


def test_pairs_in_a_bucket_equals_local(bucket, tmp_path, monkeypatch):
    """The shipped pairs config (generate -> verify -> reward model -> pairs, best-of-n) with its
    prompts, its output folders and its models in a bucket."""
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    monkeypatch.chdir(REPO)
    policy = build_tiny_causal_lm(tmp_path / "policy", hidden=32, layers=2, heads=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((REPO / "dataflywheel/data/demo/arithmetic_prompts.jsonl").read_text()
                               .splitlines(keepends=True)[:8]))
    cfg = yaml.safe_load((REPO / "configs" / "pairs.yaml").read_text())
    cfg["scorers"] = [cfg["scorers"][0]]  # the verifier alone: the reward model is the select test's kind of model
    cfg["scorers"][0]["set_reward"] = True
    del cfg["generate"]["backend"]["cache"]
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("PAIRS_POLICY", str(policy))
    assert main(["pairs", str(path), "--input", str(prompts), "--output", str(tmp_path / "local")]) == 0
    monkeypatch.setenv("PAIRS_POLICY", upload(policy, f"{bucket}/policy"))
    remote_prompts = upload(prompts, f"{bucket}/prompts.jsonl")
    assert main(["pairs", str(path), "--input", remote_prompts, "--output", f"{bucket}/run"]) == 0
    for sub in ("scored", "pairs", "sft"):
        local, remote = str(tmp_path / "local" / sub), f"{bucket}/run/{sub}"
        assert (read_success(local) is None) == (read_success(remote) is None), sub
        if read_success(local) is not None:
            assert _without_paths(rows(local, str(prompts))) == _without_paths(rows(remote, remote_prompts)), sub


def _without_paths(rs: list[dict]) -> list[dict]:
    """Rows with the fields that name where the models were loaded from left out."""
    return [json.loads(json.dumps(r), object_hook=lambda d: {k: v for k, v in d.items() if k not in ("policy", "model")})
            for r in rs]


SLOW_JOB = {"name": "slow", "runner": {"engine": "plain"},
            "jobs": [{"name": "slow", "input": {"paths": "IN", "kind": "document"},
                      "output": {"path": "OUT", "format": "jsonl", "rows_per_shard": 20},
                      "stages": [{"stage": "stages_for_tests:SlowForTests"}]}]}


def _slow_config(tmp_path: Path, inp: str, out: str, delay: float) -> Path:
    cfg = json.loads(json.dumps(SLOW_JOB).replace("IN", inp).replace("OUT", out))
    cfg["jobs"][0]["stages"][0]["delay"] = delay
    path = tmp_path / f"slow-{delay}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kill_mid_write_leaves_no_complete_output(bucket, tmp_path):
    """kill -9 while shards are being uploaded: no _SUCCESS.json, readers refuse the folder, the
    earlier complete output is not taken for this run's; a re-run commits and removes the strays."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i:04d}", "text": f"document {i}"}) + "\n" for i in range(400)))
    inp, out = upload(docs, f"{bucket}/in/docs.jsonl"), f"{bucket}/out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "dataflywheel.cli", "run"]
    subprocess.run(cli + [str(_slow_config(tmp_path, inp, out, 0.0))], env=env, check=True, capture_output=True)
    assert read_success(out)["rows"] == 400  # an earlier, complete run
    proc = subprocess.Popen(cli + [str(_slow_config(tmp_path, inp, out, 0.02))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        first = {name for name, _ in fs.listdir(out)}
        while time.monotonic() < deadline:  # wait for new shards of the second run to appear
            if len({name for name, _ in fs.listdir(out) if name.startswith("part-")} - first) >= 3:
                break
            assert proc.poll() is None, "the slow job finished before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert read_success(out) is None
    with pytest.raises(UserError, match="unfinished pipeline output"):
        list(read(out))
    subprocess.run(cli + [str(_slow_config(tmp_path, inp, out, 0.0))], env=env, check=True, capture_output=True)
    info = read_success(out)
    assert info["rows"] == 400 and sorted(r["id"] for r in read(out)) == [f"d{i:04d}" for i in range(400)]
    parts = sorted(name for name, _ in fs.listdir(out) if name.startswith("part-"))
    assert parts == sorted(s["file"] for s in info["shards"])  # strays of the killed run are gone


def test_credentials_never_appear_in_outputs(s3_server, tmp_path, capfd):
    """The S3 keys from the environment appear in no printed line, report, marker or dead letter,
    not even when a job fails on a bad URL that carries a secret of its own."""
    name = "t-secrets"
    fs.filesystem(f"s3://{name}")[0].mkdir(name)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "1", "text": "hello world"}\n{not json\n')
    inp = upload(docs, f"s3://{name}/in/docs.jsonl")
    cfg = {"name": "c", "runner": {"engine": "local"},
           "jobs": [{"name": "c", "input": {"paths": inp, "kind": "document"}, "output": {"path": f"s3://{name}/out"},
                     "stages": [{"stage": "exact_dedup"}]}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--verbose", "run", str(path)]) == 0
    bad = {**cfg, "jobs": [{**cfg["jobs"][0], "input": {"paths": f"s3://{S3_KEY_ID}:{S3_SECRET}@{name}/none/*.jsonl"}}]}
    path.write_text(yaml.safe_dump(bad))
    assert main(["run", str(path)]) == 2
    printed = "".join(capfd.readouterr())
    written = "".join(fs.read_text(f"s3://{name}/out/{p}") for p in ("_report.json", "_SUCCESS.json"))
    written += "".join(json.dumps(r) for r in read(f"s3://{name}/out/_dead_letter"))
    assert "json_syntax" in written and "credentials in a URL are not accepted" in printed
    for secret in (S3_SECRET, S3_KEY_ID):
        assert secret not in printed and secret not in written


def test_export_from_and_to_a_bucket(bucket, tmp_path):
    """`dataflywheel export`: a pipeline output in a bucket -> a Hub-layout dataset in a bucket."""
    from dataflywheel.io import write_rows

    rows_in = [{"id": f"r{i}", "text": f"text {i}"} for i in range(30)]
    write_rows(f"{bucket}/out", rows_in)
    assert main(["export", f"{bucket}/out", "--config-name", "docs", "--to", f"{bucket}/export"]) == 0
    card = fs.read_text(f"{bucket}/export/README.md")
    assert "dataflywheel" in card and "docs/train-" in card
    assert sorted(r["id"] for r in read(f"{bucket}/export/docs/*.parquet")) == sorted(r["id"] for r in rows_in)
    with pytest.raises(UserError, match="overlaps"):
        from dataflywheel.io.hub_export import export_dataset

        export_dataset({"docs": f"{bucket}/out"}, f"{bucket}/out/export")
