"""The flywheel with its run folder in a bucket (fake-gcs-server on loopback): stage markers,
pipeline outputs, the pool, trained policies and manifests all live in the bucket; a driver killed
with SIGKILL and started again on a "fresh machine" (an empty local cache) ends with the same
outputs as a local run that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from test_flywheel import TINY

from dataflywheel.flywheel.config import FlywheelConfig
from dataflywheel.flywheel.rounds import run_rounds
from dataflywheel.io import fs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def outcome(manifest: dict) -> list:
    return [(r["round"], r["accuracy"], r["policy"], {name: (s["output"], s["counts"]) for name, s in r["stages"].items()})
            for r in manifest["rounds"]]


def _run_until(cmd: list[str], env: dict, marker: str) -> None:
    """Start the driver; SIGKILL it once ``marker`` exists in the bucket (mid-stage)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not fs.exists(marker):
            assert proc.poll() is None, f"the driver finished before {marker} appeared"
            assert time.monotonic() < deadline, f"{marker} never appeared"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_round_in_a_bucket_resumes_after_kill_on_a_fresh_machine(gcs_server, tmp_path):
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs.filesystem(f"gs://{name}")[0].mkdir(name)
    run = f"gs://{name}/flywheel"
    config = {**TINY, "rounds": 1}
    local = run_rounds(FlywheelConfig.model_validate({**config, "output": str(tmp_path / "local")}), log=lambda _: None)

    path = tmp_path / "fw.yaml"
    path.write_text(yaml.safe_dump({**config, "output": run}))
    cmd = [sys.executable, "-m", "dataflywheel.cli", "rounds", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    _run_until(cmd, {**env, "DATAFLYWHEEL_CACHE": str(tmp_path / "machine-1")}, f"{run}/round-001/samples.started.json")
    _run_until(cmd, {**env, "DATAFLYWHEEL_CACHE": str(tmp_path / "machine-2")}, f"{run}/round-001/train.started.json")
    done = subprocess.run(cmd, env={**env, "DATAFLYWHEEL_CACHE": str(tmp_path / "machine-3")},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    remote = json.loads(fs.read_text(f"{run}/manifest.json"))
    assert outcome(remote) == outcome(local)
    assert fs.isfile(f"{run}/round-001/pool/pool.sqlite") and fs.isdir(f"{run}/{remote['rounds'][1]['policy']}")
    assert fs.glob(f"{run}/**/*.started.json") == []  # every stage that started has finished
