"""Progress of long runs on stderr: inputs done / total (files and bytes), rows read, rows/s, ETA.

Off unless a command turns it on (``configure``: the CLI does unless ``--quiet``), so library calls
and tests print nothing. On a terminal one line is redrawn in place every second and cleared at the
end; otherwise (CI logs) a plain line every 10 s and a final one. A background thread prints, so
the readers only bump counters: per batch and per file, never per row.

No Beam here (the layering rule): the Beam layer feeds a ``RunProgress`` through ``reporter`` (the
run itself when a reader runs in the launcher process, a spool file from a local worker process)
or by polling a running pipeline's metrics (``RunProgress.sources``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

log = logging.getLogger(__name__)

Counts = tuple[int, int, int]  # files, bytes, rows


@dataclass
class Settings:
    enabled: bool = False
    interval: float | None = None  # seconds between lines; None: 1 on a terminal, 10 otherwise
    tty: bool | None = None  # None: whether the stream is a terminal
    stream: TextIO | None = None  # None: sys.stderr when a run starts


_settings = Settings()
_scopes: list[str] = []
_live: dict[str, RunProgress] = {}


def configure(enabled: bool = True, *, interval: float | None = None, tty: bool | None = None,
              stream: TextIO | None = None) -> None:
    """Turn progress lines on (or off) for the runs of this process."""
    global _settings
    _settings = Settings(enabled, interval, tty, stream)


@contextmanager
def configured(enabled: bool = True, **options) -> Iterator[None]:
    """``configure`` for what runs inside, then the settings from before."""
    global _settings
    before = _settings
    configure(enabled, **options)
    try:
        yield
    finally:
        _settings = before


@contextmanager
def scope(label: str) -> Iterator[None]:
    """Prefix the progress lines of what runs inside with ``label`` (the flywheel's ``round-001/curate``)."""
    _scopes.append(label)
    try:
        yield
    finally:
        _scopes.pop()


def enabled() -> bool:
    return _settings.enabled


def note(line: str | None) -> None:
    """Print one line beside the progress lines (when they are on)."""
    if line and _settings.enabled:
        print(_prefixed(line), file=_settings.stream or sys.stderr, flush=True)


def _prefixed(label: str) -> str:
    return ": ".join([*_scopes, label] if label else _scopes)


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def human_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def input_size(path: str) -> int:
    """Bytes of one input: a file, or every file below a folder (an HF dataset folder); 0 when unknown."""
    from .errors import UserError
    from .io import fs

    try:
        if fs.isdir(path):
            return sum(fs.size(fs.join(folder, name)) for folder, names in fs.walk_files(path) for name in names)
        return fs.size(path)
    except (OSError, ValueError, UserError) as err:  # progress must never fail a run
        log.debug("no size for %s: %s", path, err)
        return 0


class Ticker:
    """Prints ``render()`` from a background thread: redrawn in place on a terminal, plain lines otherwise."""

    def __init__(self, render: Callable[[], str], settings: Settings | None = None):
        s = settings or _settings
        self.render, self.stream = render, s.stream or sys.stderr
        self.tty = s.tty if s.tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = s.interval or (1.0 if self.tty else 10.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dataflywheel-progress", daemon=True)
        self._shown = 0  # width of the line on screen (terminal mode)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.show(self.render())
            except Exception:  # a failed poll must not end the thread or the run
                log.debug("progress line failed", exc_info=True)

    def show(self, line: str) -> None:
        if self.tty:  # a wrapped line cannot be redrawn with \r: keep it within the terminal
            line = line[: shutil.get_terminal_size().columns - 1]
            self.stream.write("\r" + line + " " * max(0, self._shown - len(line)))
            self._shown = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, final: str | None = None) -> None:
        """Stop; on a terminal clear the line, otherwise print ``final`` when given."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.tty:
            if self._shown:
                self.stream.write("\r" + " " * self._shown + "\r")
                self.stream.flush()
        elif final is not None:
            self.show(final)


class RunProgress:
    """The counters of one pipeline run, safe to update from any thread; ``line()`` formats them.

    ``add`` counts what readers in this process did; ``sources`` are polled before each line for
    absolute counts seen elsewhere (the spool of local worker processes, a running pipeline's
    metrics) and each number shown is the larger of the two views."""

    def __init__(self, total_files: int, total_bytes: int, label: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.total_files, self.total_bytes, self.label = total_files, total_bytes, label
        self.sizes: dict[str, int] = {}
        self.sources: list[Callable[[], Counts]] = []
        self.token = uuid.uuid4().hex  # how a reader in this process finds the run (``reporter``)
        self.spool: str | None = None
        self._own, self._seen = [0, 0, 0], [0, 0, 0]
        self._lock = threading.Lock()
        self._clock = clock
        self.started = clock()

    @classmethod
    def of_inputs(cls, files: list[str], label: str = "") -> RunProgress:
        sizes = {path: input_size(path) for path in files}
        prog = cls(len(files), sum(sizes.values()), label)
        prog.sizes = sizes
        return prog

    def add(self, files: int = 0, bytes: int = 0, rows: int = 0) -> None:
        with self._lock:
            self._own[0] += files
            self._own[1] += bytes
            self._own[2] += rows

    def file_done(self, path: str) -> None:
        self.add(files=1, bytes=self.sizes[path] if path in self.sizes else input_size(path))

    def flush(self) -> None:
        """Nothing to write: the run lives in this process (a reporter's interface)."""

    def at_least(self, files: int = 0, bytes: int = 0, rows: int = 0) -> None:
        """Counts seen elsewhere (absolute, not increments)."""
        with self._lock:
            self._seen = [max(a, b) for a, b in zip(self._seen, (files, bytes, rows))]

    def counts(self) -> Counts:
        with self._lock:
            files, size, rows = (max(a, b) for a, b in zip(self._own, self._seen))
        return files, size, rows

    def refresh(self) -> None:
        for source in self.sources:
            try:
                self.at_least(*source())
            except Exception:  # e.g. a metrics request that timed out: the next line tries again
                log.debug("progress source failed", exc_info=True)

    def render(self) -> str:
        self.refresh()
        return self.line()

    def line(self, final: bool = False) -> str:
        files, size, rows = self.counts()
        elapsed = max(self._clock() - self.started, 1e-9)
        parts = [f"files {files}/{self.total_files}", f"{human_bytes(size)}/{human_bytes(self.total_bytes)}",
                 f"{rows:,} rows", f"{rows / elapsed:,.0f} rows/s"]
        if final:
            parts.append(f"done in {human_duration(elapsed)}")
        else:  # by bytes when sizes are known (files differ in size), else by files
            done = size / self.total_bytes if self.total_bytes else files / max(1, self.total_files)
            parts.append("inputs read" if done >= 1 else f"ETA {human_duration(elapsed * (1 - done) / done)}"
                         if done > 0 else "ETA ?")
        text = ", ".join(parts)
        return f"{self.label}: {text}" if self.label else text

    def spool_folder(self) -> str:
        """A local folder where readers in worker processes of this machine report (``reporter``)."""
        if self.spool is None:
            self.spool = tempfile.mkdtemp(prefix="dataflywheel-progress-")
            self.sources.append(lambda: read_spool(self.spool or ""))
        return self.spool


@contextmanager
def run(files: list[str], label: str = "", enabled: bool = True) -> Iterator[RunProgress | None]:
    """The progress of one run over the input ``files``, printed while inside (None when off).
    Ends with a line with the final counts (plain mode) when the run succeeds."""
    if not (enabled and _settings.enabled):
        yield None
        return
    prog = RunProgress.of_inputs(files, _prefixed(label))
    _live[prog.token] = prog
    ticker = Ticker(prog.render).start()
    final = None
    try:
        yield prog
        prog.refresh()
        final = prog.line(final=True)
    finally:
        _live.pop(prog.token, None)
        ticker.close(final)
        if prog.spool:
            shutil.rmtree(prog.spool, ignore_errors=True)


class _Spool:
    """A reader's counts in a worker process: rewritten to one small file at most once a second."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex}.json")
        self.counts, self.written = [0, 0, 0], 0.0

    def add(self, files: int = 0, bytes: int = 0, rows: int = 0) -> None:
        self.counts = [self.counts[0] + files, self.counts[1] + bytes, self.counts[2] + rows]
        if time.monotonic() - self.written >= 1.0:
            self.flush()

    def flush(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.counts, fh)
        os.replace(tmp, self.path)  # the launcher never reads half a file
        self.written = time.monotonic()


def read_spool(folder: str) -> Counts:
    """The sum of the counts in a spool folder (every worker's reader)."""
    total = [0, 0, 0]
    for name in os.listdir(folder):
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as fh:
                    total = [a + b for a, b in zip(total, json.load(fh))]
            except (OSError, ValueError):
                continue
    return total[0], total[1], total[2]


def reporter(token: str | None, spool: str | None = None) -> RunProgress | _Spool | None:
    """Where a reader reports: the run itself when it lives in this process (the launcher), else a
    spool file when the launcher gave a folder of this machine, else nothing (remote workers: the
    launcher polls the pipeline's metrics)."""
    if token is None:
        return None
    live = _live.get(token)
    if live is not None:
        return live
    if spool and os.path.isdir(spool):
        return _Spool(spool)
    return None


class StepProgress:
    """Training steps as a progress line: ``step 12/40, 1.5 steps/s, ETA 19s``."""

    def __init__(self, total: int, start: int = 0, label: str = "", clock: Callable[[], float] = time.monotonic):
        self.total, self.start, self.step, self.label = total, start, start, label
        self._clock = clock
        self.started = clock()

    def line(self, final: bool = False) -> str:
        elapsed = max(self._clock() - self.started, 1e-9)
        done = self.step - self.start
        parts = [f"step {self.step}/{self.total}", f"{done / elapsed:.2f} steps/s"]
        if final:
            parts.append(f"done in {human_duration(elapsed)}")
        else:
            parts.append(f"ETA {human_duration(elapsed * (self.total - self.step) / done)}" if done else "ETA ?")
        text = ", ".join(parts)
        return f"{self.label}: {text}" if self.label else text


@contextmanager
def steps(total: int, start: int = 0, label: str = "", enabled: bool = True) -> Iterator[StepProgress | None]:
    """A training loop's progress line (set ``.step``), printed while inside; None when off."""
    if not (enabled and _settings.enabled):
        yield None
        return
    prog = StepProgress(total, start, _prefixed(label))
    ticker = Ticker(prog.line).start()
    final = None
    try:
        yield prog
        final = prog.line(final=True)
    finally:
        ticker.close(final)
