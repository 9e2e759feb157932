"""The stage contract (DESIGN §3): score, then decide. No Beam import here.

- a **Scorer** adds fields (``scores``, ``tags``, ``text``...) to a batch: ``score(rows) -> rows``;
- a **Filter** decides from fields with thresholds: ``keep(row) -> (bool, reason)``;
- a **GlobalStep** needs many rows at once: rows are grouped by ``key(row)`` (one group when it
  returns None) and ``run(group)`` decides for each row of the group.

A class may be both a Scorer and a Filter (score, then decide on the fresh scores); thresholds can
later be re-applied from stored scores by a Filter alone. ``process_batch`` and ``process_group``
are the one place where outcomes are sorted into kept / rejected / dead letter, and both the Beam
wrapper (``pipelines/stage_transform.py``) and the plain loop (``run_local``) call them, so the
two engines cannot disagree.
"""

from __future__ import annotations

import time
import traceback
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .io.base import DeadLetter


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # instance name in reports; defaults to the registered stage name
    batch_size: int = 256  # rows per call of score(); Beam batches are capped at this
    gpu: bool = False  # Dataflow: run this stage on accelerator workers (resource hint)


class Stage:
    """Common base: a config, a name, and the once-per-worker hooks."""

    Config: ClassVar[type[StageConfig]] = StageConfig
    stage_name: ClassVar[str] = ""  # set by @register

    def __init__(self, config: StageConfig | None = None, **kwargs: Any):
        self.config = config if config is not None else self.Config(**kwargs)
        self.name = self.config.name or self.stage_name or type(self).__name__

    def setup(self) -> None:
        """Load models here: called once per worker (Beam DoFn.setup), never per row."""

    def teardown(self) -> None:
        """Release what setup() took."""

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


class GlobalStep(Stage):
    def key(self, row: dict) -> str | None:
        """Group key; None puts every row in one group (only for steps that need the whole set)."""
        return None

    def run(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        """Yield (row, None) to keep a row or (row, reason) to reject it; every input row once."""
        raise NotImplementedError

    def beam_transform(self) -> Any:
        """Optional Beam plan replacing key -> GroupByKey -> run, for a step that scales better
        another way (MinHash dedup: band keys, not one group). A PTransform from batches to a dict
        of ``kept`` / ``rejected`` / ``dead_letter`` batches, deciding exactly as ``run`` does."""
        return None


@dataclass
class Outcome:
    """What one batch (or group) of rows became."""

    kept: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    dead: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)  # the stage's tally()

    @property
    def rows_in(self) -> int:
        return len(self.kept) + len(self.rejected) + len(self.dead)


def rejected_row(stage: Stage, row: dict, reason: str | None) -> dict:
    return {**row, "rejected": {"stage": stage.name, "reason": reason or "rejected"}}


def dead_row(stage: Stage, row: Any, err: BaseException) -> dict:
    """A row that made a stage raise: kept whole, with the error, so nothing is lost."""
    rid = row.get("id") if isinstance(row, dict) else None
    tb = traceback.extract_tb(err.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    letter = DeadLetter(source=f"id={rid}", stage=stage.name, reason="stage_error",
                        detail=f"{type(err).__name__}: {err}{where}")
    return {**letter.to_row(), "record": row}


def _score(stage: Scorer, rows: list[dict], out: Outcome) -> list[dict]:
    try:
        scored = stage.score(rows)
        if len(scored) != len(rows):
            raise RuntimeError(f"stage {stage.name}: score() returned {len(scored)} rows for {len(rows)}")
        return scored
    except Exception as err:  # noqa: BLE001 - any error of a stage on a row is a dead letter
        if len(rows) == 1:
            out.dead.append(dead_row(stage, rows[0], err))
            return []
    # The batch failed: score rows one by one so only the bad ones become dead letters.
    return [row for one in rows for row in _score(stage, [one], out)]


def _tally(stage: Stage, rows: list[dict]) -> dict[str, int]:
    return dict(stage.tally(rows)) if rows else {}


def process_batch(stage: Stage, rows: list[dict]) -> Outcome:
    """Run a Scorer and/or Filter over a batch; every input row lands in exactly one output."""
    start = time.perf_counter()
    out = Outcome()
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
    out = Outcome()
    try:
        decisions = list(stage.run(rows))
        if len(decisions) != len(rows):
            raise RuntimeError(f"stage {stage.name}: run() decided {len(decisions)} rows of {len(rows)}")
    except Exception as err:  # noqa: BLE001
        out.dead.extend(dead_row(stage, row, err) for row in rows)
        decisions = []
    out.stats = _tally(stage, [row for row, _ in decisions])
    for row, reason in decisions:
        if reason is None:
            out.kept.append(row)
        else:
            out.rejected.append(rejected_row(stage, row, reason))
    out.seconds = time.perf_counter() - start
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
