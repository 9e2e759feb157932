"""Run report: per stage rows in / kept / rejected by reason / dead letter, and the invariant
``in == kept + rejected + dead_letter`` that every run must satisfy (DESIGN §3).

Counts come from Beam metrics (namespace ``dfw/<stage>``) or from the plain loop; either way they
end as a list of ``StageReport`` rows that print as a table and save as JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NAMESPACE_PREFIX = "dfw/"
_SECRET_KEY = re.compile(r"(token|secret|password|api[_-]?key|credential)", re.IGNORECASE)


class ReconcileError(RuntimeError):
    """A stage lost or invented rows: in != kept + rejected + dead_letter."""


@dataclass
class StageReport:
    stage: str
    rows_in: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dead_letter: int = 0
    seconds: float = 0.0  # busy time summed over workers (wall time for the plain loop)
    stats: dict[str, int] = field(default_factory=dict)  # the stage's own counts (Stage.tally)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.kept + self.rejected_total + self.dead_letter

    def add(self, kept: int = 0, rejected: Counter | dict | None = None, dead: int = 0, seconds: float = 0.0,
            stats: dict[str, int] | None = None) -> None:
        rejected = rejected or {}
        for key, n in (stats or {}).items():
            self.stats[key] = self.stats.get(key, 0) + n
        self.kept += kept
        self.dead_letter += dead
        for reason, n in rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.rows_in += kept + sum(rejected.values()) + dead
        self.seconds += seconds


@dataclass
class RunReport:
    name: str
    stages: list[StageReport]
    wall_seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Fail loudly when any stage does not reconcile."""
        bad = [s for s in self.stages if not s.balanced]
        if bad:
            lines = [f"{s.stage}: in {s.rows_in} != kept {s.kept} + rejected {s.rejected_total} + dead {s.dead_letter}"
                     for s in bad]
            raise ReconcileError("row counts do not reconcile: " + "; ".join(lines))

    def to_dict(self) -> dict[str, Any]:
        stages = [{**asdict(s), "rejected_total": s.rejected_total, "balanced": s.balanced} for s in self.stages]
        return {"name": self.name, "wall_seconds": round(self.wall_seconds, 3), "stages": stages,
                "outputs": self.outputs, "config": redact(self.config)}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        os.replace(tmp, path)
        return path

    def table(self) -> str:
        head = ("stage", "in", "kept", "rejected", "dead", "busy s", "ok")
        rows = [(s.stage, s.rows_in, s.kept, s.rejected_total, s.dead_letter, f"{s.seconds:.2f}",
                 "yes" if s.balanced else "NO") for s in self.stages]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        fmt = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
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


def reports_from_beam(result: Any, stage_names: list[str]) -> list[StageReport]:
    """Read our counters back from a finished Beam pipeline result, in pipeline order."""
    from apache_beam.metrics.metric import MetricsFilter

    by_stage: dict[str, StageReport] = {n: StageReport(n) for n in stage_names}
    for c in result.metrics().query(MetricsFilter())["counters"]:
        ns = c.key.metric.namespace
        if not ns.startswith(NAMESPACE_PREFIX):
            continue
        report = by_stage.get(ns[len(NAMESPACE_PREFIX):])
        if report is None:  # another transform's metrics (e.g. dfw/components)
            continue
        name, value = c.key.metric.name, c.committed if c.committed is not None else c.attempted
        if name == "in":
            report.rows_in += value
        elif name == "kept":
            report.kept += value
        elif name == "dead_letter":
            report.dead_letter += value
        elif name.startswith("rejected/"):
            reason = name[len("rejected/"):]
            report.rejected[reason] = report.rejected.get(reason, 0) + value
        elif name == "busy_ms":
            report.seconds += value / 1000.0
        elif name.startswith("stat/"):
            key = name[len("stat/"):]
            report.stats[key] = report.stats.get(key, 0) + value
    return list(by_stage.values())


def redact(obj: Any) -> Any:
    """Mask values of secret-looking keys (tokens, keys, passwords) before anything is written."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
