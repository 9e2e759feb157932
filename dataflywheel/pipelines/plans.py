"""Which Beam plan runs each global step.

Every ``GlobalStep`` runs as key -> GroupByKey -> ``run(group)`` (``GroupPlan``) unless a plan that
scales better is registered here for its class: MinHash dedup groups by LSH band keys rather than
putting the whole dataset in one group. A registered plan must decide every row exactly as the
step's ``run`` does (tests run both engines on the same rows); the stage itself never knows Beam.
"""

from __future__ import annotations

from collections.abc import Callable

import apache_beam as beam

from ..filters.dedup.stage import MinHashDedup
from ..stages import GlobalStep
from .dedup import MinHashDedupTransform
from .stage_transform import GroupPlan

PLANS: dict[type[GlobalStep], Callable[[GlobalStep], beam.PTransform]] = {
    MinHashDedup: MinHashDedupTransform,
}


def plan_for(stage: GlobalStep) -> beam.PTransform:
    """The registered plan of the stage's class (or of its nearest registered base), else ``GroupPlan``."""
    for cls in type(stage).__mro__:
        if cls in PLANS:
            return PLANS[cls](stage)
    return GroupPlan(stage)
