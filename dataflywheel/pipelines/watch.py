"""A Beam run's progress as the launcher sees it (``progress.py`` prints it).

How the reader's counts reach the launcher, by engine:

- local, ``in_process`` / ``multi_threading``, and portable with ``LOOPBACK`` workers: the reader
  runs in this process and adds to the run directly (``progress.reporter`` finds it by token).
  This is the only way for the local FnApiRunner: its ``run()`` returns when the pipeline is done,
  and its metrics exist only then.
- local ``multi_processing``: workers are processes of this machine; each reader rewrites its
  counts to a file in a spool folder the launcher sums.
- Dataflow and portable job servers: ``run()`` returns at once, and the printer thread polls the
  running job's metrics (attempted values of the reader's counters) every 10 s while the main
  thread waits (both talk gRPC, whose clients are thread-safe).

At the end the committed counters give the final line, whatever the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineState

from ..progress import Counts, RunProgress
from ..runner import RunnerConfig
from ..stats import counter_name

POLL_SECONDS = 10.0  # a Dataflow metrics request per poll: not at every redraw of a terminal line


def spool_for(prog: RunProgress | None, runner: RunnerConfig) -> str | None:
    """A spool folder when readers will run in other processes of this machine."""
    if prog is not None and runner.engine == "local" and runner.mode == "multi_processing":
        return prog.spool_folder()
    return None


def reader_counts(result: Any, stage: str, committed: bool = False) -> Counts:
    """(files, bytes, rows) the reader of ``stage`` has counted: attempted values while the pipeline
    runs (a running Dataflow job updates them), committed ones once it is done."""
    if not committed and hasattr(result, "_metrics"):  # a portable result caches its first query: ask again
        result._metrics = None
    got: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(counter_name(stage)))["counters"]:
        value = c.committed if committed and c.committed is not None else c.attempted
        got[c.key.metric.name] = got.get(c.key.metric.name, 0) + (value or 0)
    return got.get("files_done", 0), got.get("bytes_done", 0), got.get("in", 0)


def watch(prog: RunProgress | None, result: Any, stage: str) -> None:
    """Poll a pipeline that ``run()`` left running (Dataflow, a portable job server) for progress."""
    if prog is not None and not PipelineState.is_terminal(result.state):
        prog.sources.append(_every(POLL_SECONDS, lambda: reader_counts(result, stage)))


def finish(prog: RunProgress | None, result: Any, stage: str) -> None:
    """The final counts, from the committed counters of the finished pipeline."""
    if prog is not None:
        prog.at_least(*reader_counts(result, stage, committed=True))


def _every(seconds: float, poll: Callable[[], Counts]) -> Callable[[], Counts]:
    last, value = [float("-inf")], [(0, 0, 0)]

    def throttled() -> Counts:
        if time.monotonic() - last[0] >= seconds:
            last[0], value[0] = time.monotonic(), poll()
        return value[0]

    return throttled
