"""The stage contract: score, then decide. No Beam import here (docs/concepts.md).

- a **Scorer** adds fields (``scores``, ``tags``, ``text``...) to a batch: ``score(rows) -> rows``;
- a **Filter** decides from fields with thresholds: ``keep(row) -> (bool, reason)``;
- a **GlobalStep** needs many rows at once: rows are grouped by ``key(row)`` (one group when it
  returns None) and ``run(group)`` decides for each row of the group.

A class may be both a Scorer and a Filter (score, then decide on the fresh scores); thresholds can
later be re-applied from stored scores by a Filter alone. ``process_batch`` and ``process_group``
are the one place where outcomes are sorted into kept / rejected / dead letter, and both the Beam
wrapper (``pipelines/stage_transform.py``) and the plain loop (``pipelines/job.py``) call them, so
the two engines cannot disagree. Neither trusts them for the row accounting: both engines count
the rows entering and leaving every stage themselves (``stats.py``).
"""

from __future__ import annotations

import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from .io.base import DeadLetter

T = TypeVar("T")
R = TypeVar("R")


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # instance name in reports; defaults to the registered stage name
    batch_size: int = 256  # rows per call of score(); Beam batches are capped at this
    gpu: bool = False  # Dataflow: run this stage on accelerator workers (resource hint)


class Stage:
    """Common base: a config, a name, resources built once per worker, and the report hooks.

    ``resources`` names the attributes ``build()`` fills (models, backends, sandboxes): they are
    built once by ``setup()`` (Beam's ``DoFn.setup``, or the plain loop), or on first use when a
    stage is called directly, are never pickled (Beam ships stages to workers, which build their
    own), and are dropped by ``teardown()``.
    """

    Config: ClassVar[type[StageConfig]] = StageConfig
    stage_name: ClassVar[str] = ""  # set by @register
    resources: ClassVar[tuple[str, ...]] = ()
    # Rows out are new rows by design (e.g. a preference pair made from a prompt's samples): the
    # run checks this stage on counts (in == kept + rejected + dead), not on row identities.
    new_rows: ClassVar[bool] = False

    def __init__(self, config: StageConfig | None = None, **kwargs: Any):
        self.config = config if config is not None else self.Config(**kwargs)
        self.name = self.config.name or self.stage_name or type(self).__name__

    def build(self) -> None:
        """Create every attribute named in ``resources`` (load models here, never per row)."""

    def setup(self) -> None:
        """Build the resources unless they are built (once per worker; idempotent)."""
        if any(name not in self.__dict__ for name in self.resources):
            self.build()

    def teardown(self) -> None:
        """Release what ``build()`` took; a later ``setup()`` builds it again."""
        for name in self.resources:
            self.__dict__.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set: a resource used before setup() is built now.
        if name in type(self).resources:
            self.setup()
            if name in self.__dict__:
                return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self.resources}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def describe(self) -> str | None:
        """A note printed before the run (e.g. the LSH S-curve of a dedup stage), or None."""
        return None

    def summarize(self, stats: dict[str, int]) -> str | None:
        """A note printed after the run from the summed ``tally()`` (e.g. a realized mixture), or None."""
        return None

    def tally(self, rows: list[dict]) -> dict[str, int]:
        """Counts for the run report beyond in/kept/rejected (e.g. rows per language), summed over
        batches. Called on the rows a stage has scored or decided, before they are sorted."""
        return {}


class Scorer(Stage):
    def score(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError


class Filter(Stage):
    def keep(self, row: dict) -> tuple[bool, str | None]:
        raise NotImplementedError


Decision = tuple[dict, "str | BaseException | None"]  # kept (None), rejected (a reason), dead (an exception)


class GlobalStep(Stage):
    # True when ``tally`` needs the whole set (a budget, a per-group plan): a bounded run then leaves
    # the whole run's counts in ``bounded_stats`` and the engines record them once, at the end.
    whole_tally: ClassVar[bool] = False
    bounded_stats: dict[str, int] | None = None
    # Bytes a bounded run writes to local disk per uncompressed input byte: the rows, pickled (about
    # their JSON size), and the step's facts. For the estimate printed before a run.
    spill_factor: ClassVar[float] = 1.3

    def key(self, row: dict) -> str | None:
        """Group key; None puts every row in one group (only for steps that need the whole set)."""
        return None

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        """Yield (row, None) to keep a row or (row, reason) to reject it; every input row once."""
        raise NotImplementedError

    def run_bounded(self, rows: Iterable[dict], memory_mb: int) -> Iterator[Decision] | None:
        """``run`` over a stream of every row, grouping by ``key`` itself, in about ``memory_mb`` of
        memory, spilling to disk past it (``dataflywheel.spill``); None when the step has no such
        execution (the local engines then group in memory). A row whose key raises comes back as
        ``(row, the exception)``: a dead letter, as when grouping in memory. The engines tally the
        decisions chunk by chunk, so a step with this execution needs a ``tally`` that adds up over
        chunks (per-row counts), or sets ``whole_tally`` and ``bounded_stats``."""
        return None


def runs_bounded(stage: Stage) -> bool:
    """Whether ``stage`` is a global step with a bounded-memory execution (``run_bounded``)."""
    return isinstance(stage, GlobalStep) and type(stage).run_bounded is not GlobalStep.run_bounded


@dataclass
class Outcome:
    """What one batch (or group) of rows became."""

    rows_in: int = 0  # rows given to the stage, counted before it ran
    kept: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    dead: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)  # the stage's tally()

    @property
    def rows_out(self) -> int:
        return len(self.kept) + len(self.rejected) + len(self.dead)


def rejected_row(stage: Stage, row: dict, reason: str | None) -> dict:
    return {**row, "rejected": {"stage": stage.name, "reason": reason or "rejected"}}


def dead_row(stage: Stage, row: Any, err: BaseException) -> dict:
    """A row that made a stage raise: kept whole under ``record``, with the error and the row's
    ``id`` (its identity in the run's accounting), so nothing is lost."""
    rid = row.get("id") if isinstance(row, dict) else None
    tb = traceback.extract_tb(err.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    letter = DeadLetter(source=f"id={rid}", stage=stage.name, reason="stage_error",
                        detail=f"{type(err).__name__}: {err}{where}")
    return {**({"id": rid} if rid is not None else {}), **letter.to_row(), "record": row}


def retry_singly(fn: Callable[[list[T]], list[R]], items: list[T],
                 on_error: Callable[[T, Exception], list[R]]) -> list[R]:
    """``fn(items)``; when that raises, ``fn([item])`` item by item, so one bad item does not sink
    its batch. An item that fails alone is replaced by ``on_error(item, err)`` (``[]`` drops it)."""
    try:
        return fn(items)
    except Exception as err:  # noqa: BLE001 - any error: find the items that cause it
        if len(items) == 1:
            return on_error(items[0], err)
    out: list[R] = []
    for item in items:
        try:
            out += fn([item])
        except Exception as err:  # noqa: BLE001
            out += on_error(item, err)
    return out


def _score(stage: Scorer, rows: list[dict], out: Outcome) -> list[dict]:
    def score(batch: list[dict]) -> list[dict]:
        scored = stage.score(batch)
        if len(scored) != len(batch):
            raise RuntimeError(f"stage {stage.name}: score() returned {len(scored)} rows for {len(batch)}")
        return scored

    def dead(row: dict, err: Exception) -> list[dict]:
        out.dead.append(dead_row(stage, row, err))
        return []

    return retry_singly(score, rows, dead)


def _tally(stage: Stage, rows: list[dict]) -> dict[str, int]:
    return dict(stage.tally(rows)) if rows else {}


def process_batch(stage: Stage, rows: list[dict]) -> Outcome:
    """Run a Scorer and/or Filter over a batch; every input row lands in exactly one output."""
    start = time.perf_counter()
    out = Outcome(rows_in=len(rows))
    if isinstance(stage, Scorer) and rows:
        rows = _score(stage, rows, out)
    out.stats = _tally(stage, rows)
    for row in rows:
        if not isinstance(stage, Filter):
            out.kept.append(row)
            continue
        try:
            ok, reason = stage.keep(row)
        except Exception as err:  # noqa: BLE001
            out.dead.append(dead_row(stage, row, err))
            continue
        if ok:
            out.kept.append(row)
        else:
            out.rejected.append(rejected_row(stage, row, reason))
    out.seconds = time.perf_counter() - start
    return out


def process_group(stage: GlobalStep, rows: list[dict]) -> Outcome:
    """Run a GlobalStep on one group; a step that raises dead-letters the whole group."""
    start = time.perf_counter()
    out = Outcome(rows_in=len(rows))
    try:
        decisions = list(stage.run(rows))
        if len(decisions) != len(rows):
            raise RuntimeError(f"stage {stage.name}: run() decided {len(decisions)} rows of {len(rows)}")
    except Exception as err:  # noqa: BLE001
        out.dead.extend(dead_row(stage, row, err) for row in rows)
        decisions = []
    decided = outcome_of(stage, decisions, time.perf_counter() - start)
    out.kept, out.rejected, out.stats, out.seconds = decided.kept, decided.rejected, decided.stats, decided.seconds
    return out


def outcome_of(stage: GlobalStep, decisions: list[Decision], seconds: float, tally: bool = True) -> Outcome:
    """The Outcome of a GlobalStep's (row, reason) decisions: kept, rejected with the reason (a dead
    letter for an exception), tallied over the decided rows (``tally``)."""
    decided = [row for row, reason in decisions if not isinstance(reason, BaseException)] if tally else []
    out = Outcome(rows_in=len(decisions), seconds=seconds, stats=_tally(stage, decided))
    for row, reason in decisions:
        if reason is None:
            out.kept.append(row)
        elif isinstance(reason, BaseException):
            out.dead.append(dead_row(stage, row, reason))
        else:
            out.rejected.append(rejected_row(stage, row, reason))
    return out


def group_rows(stage: GlobalStep, rows: Iterable[dict]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Group rows by ``stage.key``; rows whose key() raises come back as dead letters."""
    groups: dict[str, list[dict]] = defaultdict(list)
    dead = []
    for row in rows:
        try:
            key = stage.key(row)
        except Exception as err:  # noqa: BLE001
            dead.append(dead_row(stage, row, err))
            continue
        groups["" if key is None else str(key)].append(row)
    return groups, dead


def batches(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
