"""Engines (docs/engines.md): PipelineOptions for the local FnApiRunner (pinned), Dataflow and
portable runners, plus ``plain`` (no Beam: the same stage objects in a Python loop).

The local runner is pinned to ``FnApiRunner`` on purpose: Beam 2.77's default DirectRunner first
tries Prism, which downloads a Go binary from GitHub with no timeout, so it can hang offline.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataflowConfig(_Strict):
    project: str
    region: str = "us-central1"
    temp_location: str  # must be gs://: a local path makes Beam validate a default bucket (~120 s, then fails offline)
    staging_location: str | None = None
    job_name: str | None = None
    machine_type: str | None = None  # e.g. n1-standard-8; GPU stages need an N1 / G2 / A2 / A3 family
    max_num_workers: int | None = None
    disk_size_gb: int | None = None
    gpu_type: str = "nvidia-tesla-t4"  # accelerator for stages with `gpu: true` (resource hint)
    gpu_count: int = 1
    requirements_file: str | None = None  # e.g. deploy/dataflow/requirements.txt
    sdk_container_image: str | None = None  # built from deploy/dataflow/Dockerfile for GPU jobs
    service_account_email: str | None = None
    dry_run: bool = False  # build and validate the job graph offline; nothing is submitted

    @model_validator(mode="after")
    def _gcs_paths(self) -> DataflowConfig:
        for name in ("temp_location", "staging_location"):
            value = getattr(self, name)
            if value is not None and not value.startswith("gs://"):
                raise ValueError(f"{name} must be a gs:// path (got {value!r})")
        return self

    def accelerator_hint(self) -> str:
        return f"type:{self.gpu_type};count:{self.gpu_count};install-nvidia-driver"


class PortableConfig(_Strict):
    job_endpoint: str  # e.g. localhost:8099 for a Flink or Spark job server
    environment_type: Literal["DOCKER", "PROCESS", "EXTERNAL", "LOOPBACK"] = "LOOPBACK"
    environment_config: str | None = None


class RunnerConfig(_Strict):
    engine: Literal["local", "plain", "dataflow", "portable"] = "local"
    workers: int = Field(1, ge=1)  # local only; > 1 needs mode multi_threading or multi_processing
    mode: Literal["in_process", "multi_threading", "multi_processing"] = "in_process"
    dataflow: DataflowConfig | None = None
    portable: PortableConfig | None = None
    beam_args: list[str] = []  # extra raw Beam pipeline flags, passed through
    # Memory the local engines' whole-dataset steps (e.g. minhash_dedup) aim to stay under; past it
    # they spill to local disk (DATAFLYWHEEL_SPILL, default the temp folder).
    memory_budget_mb: int = Field(2048, ge=64)
    # Local engine: run those steps from local disk (true) or with their distributed plans, as on
    # Dataflow (false: e.g. to test those plans on one machine; memory then grows with the corpus).
    spill: bool = True

    @model_validator(mode="after")
    def _sections(self) -> RunnerConfig:
        if self.engine == "dataflow" and self.dataflow is None:
            raise ValueError("engine dataflow needs a 'dataflow:' section (project, temp_location, ...)")
        if self.engine == "portable" and self.portable is None:
            raise ValueError("engine portable needs a 'portable:' section (job_endpoint, ...)")
        return self

    @property
    def spills(self) -> bool:
        """Whether whole-dataset steps run from local disk in bounded memory (the plain engine always;
        the local one unless ``spill: false``), rather than as distributed plans."""
        return self.engine == "plain" or (self.engine == "local" and self.spill)

    @property
    def dry_run(self) -> bool:
        """A Dataflow dry run: the job graph is built and validated, nothing runs."""
        return self.engine == "dataflow" and self.dataflow is not None and self.dataflow.dry_run


def beam_args(cfg: RunnerConfig, job_name: str | None = None) -> list[str]:
    """The Beam command-line flags for this runner config."""
    args: list[str] = []
    if cfg.engine == "local":
        mode = {"in_process": "in_memory"}.get(cfg.mode, cfg.mode)
        args += [f"--direct_num_workers={cfg.workers}", f"--direct_running_mode={mode}"]
    elif cfg.engine == "dataflow":
        d = cfg.dataflow
        if d is None:  # an engine set after validation, e.g. a command's --engine
            raise UserError("engine dataflow needs a 'runner.dataflow' section (project, temp_location, ...)")
        args += ["--runner=DataflowRunner", f"--project={d.project}", f"--region={d.region}",
                 f"--temp_location={d.temp_location}"]
        optional = {"staging_location": d.staging_location, "job_name": d.job_name or _job_name(job_name),
                    "machine_type": d.machine_type, "max_num_workers": d.max_num_workers,
                    "disk_size_gb": d.disk_size_gb, "requirements_file": d.requirements_file,
                    "sdk_container_image": d.sdk_container_image, "service_account_email": d.service_account_email}
        args += [f"--{k}={v}" for k, v in optional.items() if v is not None]
        if d.dry_run:
            args.append("--dry_run=True")
    elif cfg.engine == "portable":
        p = cfg.portable
        if p is None:
            raise UserError("engine portable needs a 'runner.portable' section (job_endpoint, environment_type, "
                            "environment_config): see docs/engines.md")
        args += ["--runner=PortableRunner", f"--job_endpoint={p.job_endpoint}", f"--environment_type={p.environment_type}"]
        if p.environment_config:
            args.append(f"--environment_config={p.environment_config}")
    return args + list(cfg.beam_args)


def _job_name(name: str | None) -> str | None:
    # Dataflow job names: lowercase letters, digits and hyphens, starting with a letter.
    if not name:
        return None
    clean = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return ("dfw-" + clean)[:63]


def make_pipeline(cfg: RunnerConfig, job_name: str | None = None) -> Any:
    """A ``beam.Pipeline`` for ``cfg``; the local engine is always the FnApiRunner."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    if cfg.engine == "plain":
        raise UserError("engine 'plain' runs without Beam; use pipelines.run_plain")
    options = PipelineOptions(beam_args(cfg, job_name))
    if cfg.engine == "local":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    if cfg.engine == "dataflow":
        try:
            import apitools  # noqa: F401 - the [gcp] extra; without it Beam fails late and obscurely
            from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner  # noqa: F401
        except ImportError:
            raise UserError("the dataflow engine needs the gcp extra: pip install 'dataflywheel[gcp]'") from None
    return beam.Pipeline(options=options)
