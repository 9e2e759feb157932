"""Experiment trackers (train/report.py): log three steps through each, then read back what it wrote."""

from __future__ import annotations

import importlib
import json
import socket
import struct
import sys
import zlib
from pathlib import Path

import pytest

from dataflywheel.errors import UserError
from dataflywheel.train import report

CONFIG = {"algo": "sft", "lr": 1e-4, "loop": {"max_steps": 3, "report_to": ["mlflow"]}, "out": "runs/x",
          "prompt": "p" * 7000}
STEPS = {s: {"loss": 1.0 / s, "lr": 1e-4 * s, "reward/mean": 0.25 * s, "step": s} for s in (1, 2, 3)}
SKIPPED = {"note": "not a number", "flag": True, "nothing": None}  # dropped by log()


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Every tracker's files in tmp; no tracking server or W&B account; no lookup of any host."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(var, raising=False)  # restored after the test: report.py's setdefault does not leak
    lookups: list = []

    def no_lookup(*args, **kwargs):
        lookups.append(args)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    yield
    assert lookups == []  # offline means no host is even looked up (W&B's analytics probe did, before)


def _log_three(names: list[str], out: Path, **kwargs) -> None:
    with report.trackers(names, out, "run-a", CONFIG, tags={"round": "2", "stage": "sft"}, **kwargs) as log:
        for step, metrics in STEPS.items():
            log({**metrics, **SKIPPED}, step)


def test_tensorboard_scalars_and_config(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_three(["tensorboard"], tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "run-a"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr", "reward/mean", "step"]
    for key in ("loss", "lr", "reward/mean", "step"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(s, pytest.approx(m[key], rel=1e-6)) for s, m in STEPS.items()]  # float32 on disk
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == CONFIG


def _wandb_records(path: Path) -> list:
    """The records of a .wandb file: wandb's LevelDB-style log (32 KiB blocks of crc32, length, type
    chunks after a 7-byte ':W&B' header), each a wandb_internal Record. wandb 0.31 ships no reader."""
    from wandb.proto import wandb_internal_pb2

    data, pos, records, chunks = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is zero padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pos, chunks = pos + 7 + length, chunks + chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


@pytest.mark.parametrize("mode", [None, "offline"])  # offline is the default, and WANDB_MODE may say so too
def test_wandb_offline_run_every_step(tmp_path, monkeypatch, mode):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    _log_three(["wandb"], tmp_path)
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, sorted(run.tags)) == ("dataflywheel", "run-a", ["round:2", "stage:sft"])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {k: config[k] for k in CONFIG} == CONFIG
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[r.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert history == {s: pytest.approx(m) for s, m in STEPS.items()}
    [exit_record] = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def test_mlflow_metrics_params_tags(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    _log_three(["mlflow"], tmp_path)
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("dataflywheel").experiment_id])
    assert (run.info.run_name, run.info.status) == ("run-a", "FINISHED")
    assert {k: run.data.tags[k] for k in ("round", "stage")} == {"round": "2", "stage": "sft"}
    for key in ("loss", "lr", "reward/mean", "step"):  # mlflow takes '/' in a metric name as it is
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(got) == [(s, pytest.approx(m[key])) for s, m in STEPS.items()]
    params = run.data.params
    assert params["loop.max_steps"] == "3" and params["loop.report_to"] == '["mlflow"]' and params["algo"] == "sft"
    assert params["prompt"] == "p" * 6000  # mlflow's cap on a param value


def test_mlflow_key_and_flatten():
    assert report._mlflow_key("eval/acc@1") == "eval/acc_1"
    assert report._mlflow_key("/a//b/../c/") == "a/b/c"
    assert report._flatten({"a": {"b": {"c": 1}}, "d": [1, 2], "e": {}}) == {"a.b.c": "1", "d": "[1, 2]", "e": "{}"}


def test_failure_marks_runs_failed(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    with pytest.raises(RuntimeError), report.trackers(["mlflow", "wandb"], tmp_path, "bad", {}) as log:
        log({"loss": 1.0}, 1)
        raise RuntimeError("step failed")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("dataflywheel").experiment_id])
    assert run.info.status == "FAILED"
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert [r.exit.exit_code for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "exit"] == [1]


def test_other_ranks_and_no_trackers_write_nothing(tmp_path):
    for name in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(name, reason=f"the {name} extra is not installed")
    _log_three(["tensorboard", "wandb", "mlflow"], tmp_path / "rank1", rank=1)
    _log_three([], tmp_path / "none")
    assert not (tmp_path / "rank1").exists() and not (tmp_path / "none").exists()


def test_unknown_tracker_rejected(tmp_path):
    with pytest.raises(UserError, match=r"unknown tracker\(s\) \['comet'\]"):
        _log_three(["tensorboard", "comet"], tmp_path, rank=1)  # every rank rejects it


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_package_names_the_extra(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` fails as if it were not installed
    with pytest.raises(UserError, match=rf"pip install 'dataflywheel\[{name}\]'"):
        _log_three([name], tmp_path, rank=1)  # checked on every rank, before anything is opened


def test_broken_install_names_the_extra(tmp_path, monkeypatch):
    real = importlib.import_module

    def failing(module, *args):
        if module == "tensorboard":
            raise ImportError("cannot import name 'x' from 'tensorboard'")
        return real(module, *args)

    monkeypatch.setattr(importlib, "import_module", failing)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # looks installed
    with pytest.raises(UserError, match=r"tensorboard is not installed .*pip install 'dataflywheel\[tensorboard\]'"):
        _log_three(["tensorboard"], tmp_path)
