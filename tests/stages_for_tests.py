"""Stages that only tests use, importable by a CLI subprocess as ``stages_for_tests:Name``."""

from __future__ import annotations

import time

from dataflywheel.stages import Scorer, StageConfig


class SlowConfig(StageConfig):
    delay: float = 0.0  # seconds per batch: keeps a job busy long enough to be killed mid-write
    batch_size: int = 10


class SlowForTests(Scorer):
    """Passes rows through unchanged, sleeping ``delay`` seconds per batch."""

    Config = SlowConfig

    def score(self, rows: list[dict]) -> list[dict]:
        time.sleep(self.config.delay)
        return rows


def short_reply(rows: list[dict], completions: list[str]) -> list[float]:
    """A GRPO reward for tests: 1 for a reply of at most three words, else 0."""
    return [float(len(c.split()) <= 3) for c in completions]
