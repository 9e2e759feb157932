"""Runner options: each engine's Beam flags, and the local runner pinned to FnApiRunner."""

import pytest
from pydantic import ValidationError

from dataflywheel.errors import UserError
from dataflywheel.runner import RunnerConfig, beam_args, make_pipeline


def test_local_runner_is_pinned_fnapi():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    p = make_pipeline(RunnerConfig())
    assert isinstance(p.runner, FnApiRunner)
    assert beam_args(RunnerConfig(workers=2, mode="multi_processing")) == [
        "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert "--direct_running_mode=in_memory" in beam_args(RunnerConfig())


def test_dataflow_flags():
    cfg = RunnerConfig(engine="dataflow", dataflow={
        "project": "p", "temp_location": "gs://b/tmp", "machine_type": "n1-standard-8", "gpu_type": "nvidia-l4",
        "sdk_container_image": "img:1", "dry_run": True})
    args = beam_args(cfg, "My Job_1")
    assert "--runner=DataflowRunner" in args and "--project=p" in args and "--region=us-central1" in args
    assert "--temp_location=gs://b/tmp" in args and "--machine_type=n1-standard-8" in args
    assert "--sdk_container_image=img:1" in args and "--dry_run=True" in args
    assert "--job_name=dfw-my-job-1" in args
    assert cfg.dataflow.accelerator_hint() == "type:nvidia-l4;count:1;install-nvidia-driver"


def test_portable_flags():
    cfg = RunnerConfig(engine="portable", portable={"job_endpoint": "localhost:8099", "environment_type": "DOCKER"},
                       beam_args=["--parallelism=4"])
    assert beam_args(cfg) == ["--runner=PortableRunner", "--job_endpoint=localhost:8099",
                              "--environment_type=DOCKER", "--parallelism=4"]


def test_bad_runner_configs():
    with pytest.raises(ValidationError, match="gs://"):
        RunnerConfig(engine="dataflow", dataflow={"project": "p", "temp_location": "/tmp/x"})
    with pytest.raises(ValidationError, match="portable"):
        RunnerConfig(engine="portable")
    with pytest.raises(UserError, match="plain"):
        make_pipeline(RunnerConfig(engine="plain"))
    for engine in ("portable", "dataflow"):  # set after validation, as a command's --engine does
        cfg = RunnerConfig()
        cfg.engine = engine
        with pytest.raises(UserError, match=rf"engine {engine} needs a 'runner.{engine}' section"):
            make_pipeline(cfg)
