"""Beam's portable runner for tests: the Python job service and an EXTERNAL worker pool, each a
separate process (docs/engines.md). Stages are pickled, sent over the Fn API and set up in the
pool's worker processes, the boundary Flink, Spark and Dataflow Runner v2 use. The fixture is
session-scoped: the two services start once; each job still gets fresh worker processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataflywheel.runner import PortableConfig, RunnerConfig

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def service_env() -> dict[str, str]:
    """The pool starts workers as bare ``python``: without this venv first on PATH a worker dies
    with "No module named apache_beam" and the job hangs ~300 s. PYTHONPATH makes the workers
    import this checkout's dataflywheel (and tests/ for stages defined in test modules). One torch
    thread, as the tests' own process uses (conftest.py): the same numbers, no contention on 2 cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    extra = [str(REPO), str(REPO / "tests")]
    env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the whole group has exited
        pass


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("localhost", port), timeout=1):
            return True
    except OSError:
        return False


class Services:
    """The job service and the worker pool: started, awaited and stopped together."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.job_port, self.pool_port = free_port(), free_port()
        self.procs: dict[str, tuple[subprocess.Popen, Path, int]] = {}

    def start(self) -> None:
        commands = {
            "job_service": (["-m", "apache_beam.runners.portability.local_job_service_main",
                             "--port", str(self.job_port)], self.job_port),
            "worker_pool": (["-m", "apache_beam.runners.worker.worker_pool_main",
                             "--service_port", str(self.pool_port)], self.pool_port),
        }
        env = service_env()
        for name, (args, port) in commands.items():
            log = self.logs / f"{name}.log"
            with log.open("wb") as out:  # the child keeps its own handle
                # Its own session (one killpg also ends the workers the pool forks) and folder (a
                # relative path a worker resolves lands there, not in the repo).
                proc = subprocess.Popen([sys.executable, *args], cwd=self.logs, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs[name] = (proc, log, port)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        waiting = dict(self.procs)
        while waiting:
            for name, (proc, _, port) in list(waiting.items()):
                if proc.poll() is not None:
                    self.fail(f"{name} exited with code {proc.returncode} before listening on port {port}")
                if listening(port):
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                self.fail(f"{', '.join(waiting)} not listening after {timeout:.0f} s")
            time.sleep(0.2)

    def fail(self, why: str) -> None:
        logs = "\n".join(f"--- {name} ({log}):\n{tail(log)}" for name, (_, log, _) in self.procs.items())
        pytest.fail(f"Beam portable services: {why}\n{logs}", pytrace=False)

    def stop(self) -> None:
        """SIGTERM each process group, then SIGKILL what is left of it (the pool's workers too)."""
        for proc, _, _ in self.procs.values():
            signal_group(proc, signal.SIGTERM)
        for proc, _, _ in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            signal_group(proc, signal.SIGKILL)
            proc.wait()

    def runner(self) -> RunnerConfig:
        return RunnerConfig(engine="portable", portable=PortableConfig(
            job_endpoint=f"localhost:{self.job_port}", environment_type="EXTERNAL",
            environment_config=f"localhost:{self.pool_port}"))


@pytest.fixture(scope="session")
def portable_runner(tmp_path_factory) -> Iterator[RunnerConfig]:
    """A ``RunnerConfig`` for engine portable, backed by live services for the whole session."""
    services = Services(tmp_path_factory.mktemp("beam-portable"))
    try:
        services.start()
        services.wait_ready()
        yield services.runner()
    finally:
        services.stop()
