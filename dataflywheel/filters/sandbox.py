"""A killable worker process for calls that may hang or crash (HTML extraction).

trafilatura can run indefinitely on some huge pages and its own timeout does not apply to Python
calls (adbar/trafilatura#704); a thread cannot be killed, a process can. datatrove's answer is the
``ExtractorSandbox``: a child process on a pipe, killed and respawned on timeout. Ours works the
same way, with three differences:

- pages travel to the child in batches (one IPC round trip per batch, not per page), but the
  child answers page by page, so a timeout or crash costs only the page that caused it: pages
  answered before it keep their results, the rest are re-sent to a fresh child;
- the per-page limit counts the child's **CPU** time (Linux ``/proc``), not wall time, so a busy
  machine (many Beam threads, each with its own child, on few cores) does not time out pages that
  are merely waiting for a core. A child that blocks without using CPU is killed after
  ``WALL_FACTOR`` x the limit in wall time. Where ``/proc`` is missing the limit is wall time;
- the child is a fresh interpreter (``subprocess`` running ``_child_entry``), like
  multiprocessing's ``spawn`` but without re-running the parent's ``__main__`` script, which
  ``spawn`` does and which breaks (or recurses) in scripts without an ``if __name__`` guard.
  ``fork`` is never used: in a threaded parent (Beam's workers) it can copy a held lock.

The child raises its own OOM score (best effort, as datatrove does) so the kernel kills it, not
the worker, when memory runs out; a crash is reported as such and the child is respawned. The
child exits when its parent does (a watchdog thread checks the parent pid).
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# The child is killed when a page blocks this many times its CPU limit in wall time: a page that
# sleeps or waits on a lock uses no CPU. 10x leaves room for ~10 children sharing one core.
WALL_FACTOR = 10.0
START_TIMEOUT_S = 120.0  # interpreter start + imports + warm-up; generous because cores may be shared
PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size for unprivileged processes
POLL_S = 0.05  # how often a waiting parent checks the child's CPU time
TIMEOUT, CRASHED, ERROR = "timeout", "extractor_crashed", "extractor_error"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/<pid>/stat time unit
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # so the child imports this same dataflywheel
_LIVE: weakref.WeakSet = weakref.WeakSet()  # sandboxes to stop at interpreter exit


class SandboxError(RuntimeError):
    """The child could not be started (its target failed to import or to warm up)."""


@dataclass
class Answer:
    """One task's outcome: ``value`` when ``error`` is None, else the reason and a detail."""

    value: Any = None
    error: str | None = None
    detail: str = ""


def _raise_oom_score() -> None:
    try:  # raising one's own score needs no privilege; lowering it would
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:  # re-parented: the worker that owned us is gone
            os._exit(0)


def _child_entry(read_fd: int, write_fd: int) -> None:
    """The child's main: read the set-up message, import the target, then answer task batches."""
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    _raise_oom_score()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        target, kwargs, warmup, path = inbox.recv()
        sys.path[:] = path  # the parent's import path: a module:function backend resolves the same
        module, _, attr = target.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        if warmup is not None:  # lazy initialisation must not be charged to the first real page
            fn(*warmup, **kwargs)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        outbox.send(("fatal", -1, f"{type(err).__name__}: {err}"))
        return
    outbox.send(("ready", -1, None))
    while True:
        try:
            tasks = inbox.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if tasks is None:
            return
        for i, task in enumerate(tasks):
            try:
                reply = ("ok", i, fn(*task, **kwargs))
            except Exception as err:  # noqa: BLE001 - a page's error is that page's answer
                reply = ("error", i, f"{type(err).__name__}: {err}")
            try:
                outbox.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError) as err:  # an unpicklable result
                outbox.send(("error", i, f"result cannot be sent: {type(err).__name__}: {err}"))


def _widen(fd: int) -> None:
    """Grow a pipe from 64 KiB to 1 MiB (Linux, best effort): a batch of pages is megabytes, and
    every full buffer is a switch between the two processes."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (ImportError, OSError):
        pass


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


class Sandbox:
    """Runs ``target(*task, **kwargs)`` for each task in one reusable child process.

    ``target`` is a ``module:function`` path, imported by the child. ``start()`` launches the child
    without waiting; ``run(tasks)`` returns one ``Answer`` per task, in order: a value, or
    ``timeout`` / ``extractor_crashed`` / ``extractor_error`` (the function raised). ``stop()``
    ends the child. Thread-safe; not picklable (holds a process).
    """

    def __init__(self, target: str, kwargs: dict | None = None, timeout_s: float = 1.0,
                 warmup: tuple | None = None, start_timeout_s: float = START_TIMEOUT_S):
        self.target, self.kwargs, self.timeout_s = target, dict(kwargs or {}), timeout_s
        self.warmup, self.start_timeout_s = warmup, start_timeout_s
        self.restarts = 0  # children killed after a timeout or lost to a crash
        self._proc: subprocess.Popen | None = None
        self._inbox: Connection | None = None  # answers from the child
        self._outbox: Connection | None = None  # tasks to the child
        self._ready = False
        self._lock = threading.Lock()

    # -- child lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        if self._proc is not None:
            return
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        _widen(to_child_w)
        _widen(from_child_w)
        code = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
                f"from dataflywheel.filters.sandbox import _child_entry; "
                f"_child_entry({to_child_r}, {from_child_w})")
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                          pass_fds=(to_child_r, from_child_w))
        finally:  # the child's ends: closed here so that the child's death reads as EOF
            os.close(to_child_r)
            os.close(from_child_w)
        self._outbox = Connection(to_child_w, readable=False)
        self._inbox = Connection(from_child_r, writable=False)
        self._ready = False
        _LIVE.add(self)
        self._outbox.send((self.target, self.kwargs, self.warmup, list(sys.path)))

    def _wait_ready(self) -> None:
        self.start()
        if self._ready:
            return
        kind, detail = "dead", "exited during start-up"
        try:
            if self._inbox.poll(self.start_timeout_s):
                kind, _, detail = self._inbox.recv()
            else:
                kind, detail = "slow", f"not ready after {self.start_timeout_s:.0f} s"
        except (EOFError, OSError):
            pass
        if kind != "ready":
            self._kill()
            raise SandboxError(f"sandbox child for {self.target} failed to start: {detail}")
        self._ready = True

    def _kill(self) -> None:
        proc, conns = self._proc, (self._inbox, self._outbox)
        self._proc = self._inbox = self._outbox = None
        self._ready = False
        for conn in conns:
            if conn is not None:
                conn.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        with self._lock:
            if self._proc is not None and self._ready:
                try:
                    self._outbox.send(None)
                    self._proc.wait(2)
                except (OSError, ValueError, subprocess.TimeoutExpired):
                    pass
            self._kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- work -----------------------------------------------------------------------------
    def _next(self, index: int) -> Answer:
        """Wait for the child's answer to the page it is on, within the page's CPU limit."""
        conn, pid = self._inbox, self._proc.pid
        wall0, cpu0 = time.monotonic(), _cpu_seconds(pid)
        # no CPU clock for the child (no /proc): the limit is wall time
        wall_limit = self.timeout_s * (WALL_FACTOR if cpu0 is not None else 1.0)
        while True:
            try:
                if conn.poll(POLL_S):
                    kind, i, payload = conn.recv()
                    if i != index:
                        raise RuntimeError(f"sandbox protocol: answer {i} for task {index}")
                    return Answer(value=payload) if kind == "ok" else Answer(error=ERROR, detail=payload)
            except (EOFError, OSError):
                return Answer(error=CRASHED, detail=self._exit_detail())
            if self._proc.poll() is not None:
                return Answer(error=CRASHED, detail=self._exit_detail())
            cpu = _cpu_seconds(pid) if cpu0 is not None else None
            if cpu is not None and cpu - cpu0 > self.timeout_s:
                return Answer(error=TIMEOUT, detail=f"over {self.timeout_s:g} s of CPU")
            if time.monotonic() - wall0 > wall_limit:
                return Answer(error=TIMEOUT, detail=f"over {wall_limit:g} s of wall time")

    def _exit_detail(self) -> str:
        try:
            code = self._proc.wait(1)
        except subprocess.TimeoutExpired:
            return "child closed its pipe"
        return f"child killed by signal {-code}" if code < 0 else f"child exited with code {code}"

    def run(self, tasks: list[tuple]) -> list[Answer]:
        answers: list[Answer] = []
        with self._lock:
            failed_sends = 0
            while len(answers) < len(tasks):
                self._wait_ready()
                base = len(answers)
                rest = tasks[base:]
                try:
                    self._outbox.send(rest)
                except (OSError, ValueError):  # the child died between batches: one more try
                    self._kill()
                    self.restarts += 1
                    failed_sends += 1
                    if failed_sends > 1:
                        raise SandboxError(f"sandbox child for {self.target} keeps dying") from None
                    continue
                for _ in rest:
                    answer = self._next(len(answers) - base)
                    answers.append(answer)
                    if answer.error in (TIMEOUT, CRASHED):
                        self._kill()  # the rest of the batch goes to a fresh child
                        self.restarts += 1
                        break
        return answers

    def __getstate__(self):
        raise TypeError("a Sandbox holds a live process and cannot be pickled")


@atexit.register
def _kill_all() -> None:
    # No lock: a daemon thread may hold one mid-batch while the interpreter exits.
    for box in list(_LIVE):
        proc = box._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
