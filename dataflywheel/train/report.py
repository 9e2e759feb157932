"""Experiment trackers for the training loop: TensorBoard, Weights & Biases and MLflow.

``trackers(...)`` opens the runs named in ``loop.report_to`` and yields one ``log(metrics, step)``.
Every tracker writes under the run's output folder and works offline by default: W&B in offline
mode (``wandb sync`` uploads later), MLflow into a local file store unless ``MLFLOW_TRACKING_URI``
says otherwise. Each package is imported only when named, so none of them is a hard dependency.
"""

from __future__ import annotations

import contextlib
import importlib.util  # binds importlib too
import json
import numbers
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dataflywheel.errors import UserError

Log = Callable[[dict[str, float], int], None]
PARAM_MAX = 6000  # mlflow's cap on a param value (it truncates longer ones itself, with a warning per value)
KEY_MAX = 250  # mlflow's cap on a metric or param name


def _missing(name: str, why: str = "") -> UserError:
    return UserError(f"loop.report_to: {name} is not installed{why}; pip install 'dataflywheel[{name}]'")


def _import(name: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(name, f" ({e})") from None


@contextlib.contextmanager
def _tensorboard(out_dir: Path, run_name: str, config: dict, tags: dict[str, str]) -> Iterator[Log]:
    _import("tensorboard", "tensorboard")  # torch.utils.tensorboard needs it; its own ImportError names no extra
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out_dir / "tensorboard" / run_name))
    try:
        # TensorBoard renders text as markdown: a code block keeps the JSON's indentation
        writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)
        if tags:
            writer.add_text("tags", json.dumps(tags), 0)

        def log(metrics: dict[str, float], step: int) -> None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)

        yield log
    finally:
        writer.close()  # flushes the event file


@contextlib.contextmanager
def _wandb(out_dir: Path, run_name: str, config: dict, tags: dict[str, str]) -> Iterator[Log]:
    wandb = _import("wandb", "wandb")
    mode = os.environ.get("WANDB_MODE", "offline")
    local = mode in ("offline", "dryrun", "disabled")
    if local:
        # init(mode=...) alone leaves wandb's process-wide settings online, and its analytics thread then
        # probes the W&B server; offline in the global settings it sends nothing.
        wandb.setup(settings=wandb.Settings(mode=mode, silent=True))
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dataflywheel"), name=run_name,
                     dir=str(out_dir), config=config, mode=mode, group=tags.get("group"),
                     tags=[f"{k}:{v}"[:64] for k, v in tags.items()],  # W&B tags are short strings
                     reinit="create_new", settings=wandb.Settings(silent=True))
    exit_code = 1  # an exception from the loop marks the run failed
    try:
        yield lambda metrics, step: run.log(metrics, step=step)
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)
        if local:  # finish() returns before wandb-core has flushed the run file; teardown waits for that
            wandb.teardown()


def _mlflow_key(key: str) -> str:
    """A name mlflow accepts: '/' separates path parts; other odd characters become '_'."""
    parts = (re.sub(r"[^\w.\- ]", "_", p) for p in key.split("/"))
    return "/".join(p for p in parts if p.strip("."))[:KEY_MAX] or "_"


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[_mlflow_key(f"{prefix}{key}")] = (value if isinstance(value, str) else json.dumps(value))[:PARAM_MAX]
    return out


@contextlib.contextmanager
def _mlflow(out_dir: Path, run_name: str, config: dict, tags: dict[str, str]) -> Iterator[Log]:
    # mlflow's import starts a thread that fetches its usage-telemetry config: off unless the user opts in
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _import("mlflow", "mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").absolute().as_uri()
    if uri.startswith("file:"):  # mlflow 3.x refuses the (maintenance-mode) file store without this opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # A client of its own, not mlflow.start_run: the fluent API's global URI and active run stay the user's
    client = MlflowClient(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dataflywheel")
    experiment = client.get_experiment_by_name(name)
    run_id = client.create_run(experiment.experiment_id if experiment else client.create_experiment(name),
                               run_name=run_name, tags=tags).info.run_id
    status = "FAILED"
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in _flatten(config).items()])

        def log(metrics: dict[str, float], step: int) -> None:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(_mlflow_key(k), v, now, step) for k, v in metrics.items()])

        yield log
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)


# name -> (the package that must be importable, the tracker)
_BACKENDS: dict[str, tuple[str, Callable[..., contextlib.AbstractContextManager[Log]]]] = {
    "tensorboard": ("tensorboard", _tensorboard), "wandb": ("wandb", _wandb), "mlflow": ("mlflow", _mlflow)}


@contextlib.contextmanager
def trackers(report_to: Sequence[str], out_dir: Path, run_name: str, config: dict, rank: int = 0,
             tags: dict[str, str] | None = None) -> Iterator[Log]:
    """Yield log(metrics, step). report_to: any of "tensorboard", "wandb", "mlflow" (none by default).

    Only rank 0 logs (other ranks get a no-op). Each tracker writes under out_dir: tensorboard/<run_name>,
    wandb/offline-run-* (offline unless WANDB_MODE says otherwise), mlruns (unless MLFLOW_TRACKING_URI
    is set). Non-numeric metric values are skipped. An exception from the body marks the runs failed."""
    names = list(dict.fromkeys(report_to))
    unknown = [n for n in names if n not in _BACKENDS]
    if unknown:
        raise UserError(f"loop.report_to: unknown tracker(s) {unknown}; choose from {sorted(_BACKENDS)}")
    for name in names:  # every rank checks, so a missing package stops all of them alike
        if importlib.util.find_spec(_BACKENDS[name][0]) is None:
            raise _missing(name)
    if rank != 0 or not names:
        yield lambda metrics, step: None
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    # JSON-safe once (paths, enums become strings) so every backend gets the same plain values
    config = json.loads(json.dumps(config, default=str))
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(_BACKENDS[n][1](out_dir, run_name, config, dict(tags or {}))) for n in names]

        def log(metrics: dict[str, float], step: int) -> None:
            numeric = {k: float(v) for k, v in metrics.items()
                       if isinstance(v, numbers.Real) and not isinstance(v, bool)}
            if numeric:
                for each in logs:
                    each(numeric, step)

        yield log
