"""The run report and the row accounting every run must pass (docs/concepts.md#row-accounting).

Each engine counts, for every stage, the rows *entering* it (before the stage runs) and the rows
leaving it as kept / rejected (by reason) / dead letter, and keeps an order-independent checksum
of each set's row identities: the sum mod 2^64 of the 64-bit xxh3 hash of each row's ``id``. The
stage's own code counts nothing that is checked. A run passes when, for every stage,

- in == kept + rejected + dead letter, and the checksums of the rows in and out agree (a stage
  whose output rows are new by design, ``Stage.new_rows``, is checked on counts only);
- its rows in are the previous stage's kept rows (the reader's for the first stage);

and the rows written are the last stage's kept rows (and every rejected / dead row), by count and
checksum. A mismatch fails the run with one line naming the stage and the numbers.

Beam counters are int64, so each checksum travels as two counters of 32-bit halves (each a sum of
values below 2^32: no overflow below 2^31 batches) and is put together when the report is read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .records import MASK64, checksum, row_key

NAMESPACE_PREFIX = "dfw/"
FILE_PROBLEMS = "file_problems"  # the reader's count of file-level dead letters (the job then lists them)
MASK32 = (1 << 32) - 1
OUTS = ("in", "kept", "rejected", "dead")  # the row sets of a stage that carry a checksum
_SECRET_KEY = re.compile(r"(token|secret|password|api[_-]?key|credential)", re.IGNORECASE)
__all__ = ["MASK64", "RunReport", "StageReport", "checksum", "row_key"]


class ReconcileError(RuntimeError):
    """The rows of a run do not add up: a stage lost, replaced or invented rows."""


def split64(value: int) -> tuple[int, int]:
    return value & MASK32, value >> 32


def join64(lo: int, hi: int) -> int:
    return ((hi << 32) + lo) & MASK64


@dataclass
class StageReport:
    stage: str
    rows_in: int = 0  # counted before the stage ran, not derived from what it emitted
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dead_letter: int = 0  # input records lost (a reader's file-level letter may stand for many)
    seconds: float = 0.0  # busy time summed over workers
    stats: dict[str, int] = field(default_factory=dict)  # the stage's own counts (Stage.tally)
    ids: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTS, 0))  # checksums per row set
    new_rows: bool = False  # rows out are new by design (a reader; pairs from samples): counts only
    problems: list[str] = field(default_factory=list)  # file-level problems (the reader)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def rows_out(self) -> int:
        return self.kept + self.rejected_total + self.dead_letter

    @property
    def ids_out(self) -> int:
        return (self.ids["kept"] + self.ids["rejected"] + self.ids["dead"]) & MASK64

    def count(self, which: str, rows: list[dict], n: int | None = None) -> None:
        """Count ``rows`` into a row set: ``in``, ``kept``, ``rejected`` (by reason) or ``dead``
        (``n``: the records they stand for, when not one each)."""
        self.ids[which] = (self.ids[which] + checksum(rows)) & MASK64
        size = len(rows) if n is None else n
        if which == "in":
            self.rows_in += size
        elif which == "kept":
            self.kept += size
        elif which == "dead":
            self.dead_letter += size
        else:
            for row in rows:
                reason = row["rejected"]["reason"]
                self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def add_stats(self, stats: dict[str, int], seconds: float = 0.0) -> None:
        for key, n in stats.items():
            self.stats[key] = self.stats.get(key, 0) + n
        self.seconds += seconds

    def mismatches(self) -> list[str]:
        """This stage's own accounting problems, one line each."""
        out = []
        if self.rows_in != self.rows_out:
            out.append(f"stage {self.stage}: {self.rows_in} rows in != {self.rows_out} out "
                       f"(kept {self.kept} + rejected {self.rejected_total} + dead letter {self.dead_letter})")
        elif not self.new_rows and self.ids["in"] != self.ids_out:
            out.append(f"stage {self.stage}: the {self.rows_out} rows out are not the {self.rows_in} rows in "
                       f"(id checksum in {self.ids['in']:016x}, out {self.ids_out:016x}): "
                       "a row was lost, replaced or emitted twice")
        return out

    @property
    def balanced(self) -> bool:
        return not self.mismatches()


@dataclass
class RunReport:
    name: str
    stages: list[StageReport]
    wall_seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)  # each output folder's _SUCCESS.json
    config: dict[str, Any] = field(default_factory=dict)
    job_graph: Any = None  # a Dataflow dry run: the pipeline proto that was built (not saved)

    def mismatches(self) -> list[str]:
        """Every accounting problem of the run, one line each (empty: the run reconciles)."""
        lines = [line for s in self.stages for line in s.mismatches()]
        for prev, s in zip(self.stages, self.stages[1:]):
            if s.rows_in != prev.kept or s.ids["in"] != prev.ids["kept"]:
                lines.append(f"stage {s.stage}: {s.rows_in} rows in (id checksum {s.ids['in']:016x}) are not the "
                             f"{prev.kept} rows {prev.stage} kept ({prev.ids['kept']:016x})")
        if self.stages and self.outputs.get("kept") is not None:
            lines += self._written_mismatches()
        return lines

    def _written_mismatches(self) -> list[str]:
        last = self.stages[-1]
        expected = {"kept": (last.kept, last.ids["kept"]),
                    "rejected": (sum(s.rejected_total for s in self.stages),
                                 sum(s.ids["rejected"] for s in self.stages) & MASK64),
                    "dead_letter": (None, sum(s.ids["dead"] for s in self.stages) & MASK64)}
        lines = []
        for which, (rows, ids) in expected.items():
            info = self.outputs.get(which)
            if info is None:  # not written (write_rejected: false)
                continue
            got_ids = int(info.get("ids", "0"), 16)
            if (rows is not None and info["rows"] != rows) or got_ids != ids:
                want = f"{rows} rows" if rows is not None else "rows"
                lines.append(f"output {which}: {info['rows']} rows written (id checksum {got_ids:016x}) are not "
                             f"the {want} the stages sent there ({ids:016x})")
        return lines

    def check(self) -> None:
        """Raise ReconcileError naming the first problem (and how many more) if the run does not add up."""
        lines = self.mismatches()
        if lines:
            more = f" (+{len(lines) - 1} more in the report)" if len(lines) > 1 else ""
            raise ReconcileError(f"job {self.name}: {lines[0]}{more}")

    def to_dict(self) -> dict[str, Any]:
        stages = []
        for s in self.stages:
            d = {k: v for k, v in asdict(s).items() if k != "ids"}
            d["ids"] = {k: f"{v:016x}" for k, v in s.ids.items()}
            stages.append({**d, "rejected_total": s.rejected_total, "balanced": s.balanced})
        problems = self.mismatches()
        return {"name": self.name, "wall_seconds": round(self.wall_seconds, 3), "stages": stages,
                "outputs": self.outputs, "reconciled": not problems, "problems": problems,
                "config": redact(self.config)}

    def save(self, path: str | os.PathLike) -> str:
        """Write the report as JSON, atomically, to a local path or an object-store URL."""
        from .io import fs

        fs.write_text(path, json.dumps(self.to_dict(), indent=2, default=str))
        return os.fspath(path)

    def table(self) -> str:
        head = ("stage", "in", "kept", "rejected", "dead", "busy s", "ok")
        rows = [(s.stage, s.rows_in, s.kept, s.rejected_total, s.dead_letter, f"{s.seconds:.2f}",
                 "yes" if s.balanced else "NO") for s in self.stages]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        fmt = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        problems = [f"  {s.stage}: {p}" for s in self.stages for p in s.problems]
        if problems:
            lines += ["file problems:", *problems]
        reasons = [f"  {s.stage}: " + ", ".join(f"{r}={n}" for r, n in sorted(s.rejected.items(), key=lambda x: -x[1]))
                   for s in self.stages if s.rejected]
        if reasons:
            lines += ["rejected by reason:", *reasons]
        stats = [f"  {s.stage}: " + ", ".join(f"{k}={n}" for k, n in sorted(s.stats.items(), key=lambda x: (-x[1], x[0])))
                 for s in self.stages if s.stats]
        if stats:
            lines += ["counts:", *stats]
        lines.append(f"wall time {self.wall_seconds:.2f} s")
        return "\n".join(lines)


def counter_name(stage: str) -> str:
    return NAMESPACE_PREFIX + stage


def redact(obj: Any) -> Any:
    """Mask values of secret-looking keys (tokens, keys, passwords) before anything is written."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):  # a credential inside a URL, or the value of one from the environment
        from .io.fs import redact as redact_text

        return redact_text(obj)
    return obj
