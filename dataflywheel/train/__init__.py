"""Training stage (docs/training.md): SFT with packing, reward model, DPO and GRPO on one loop; `dataflywheel train`."""

from __future__ import annotations

import importlib
from types import ModuleType

ALGORITHMS = {"sft": "SftConfig", "rm": "RmConfig", "dpo": "DpoConfig", "grpo": "GrpoConfig"}  # module: config class


def algorithm(name: str) -> tuple[ModuleType, type]:
    """(the algorithm's module, with its ``run``; its config class), imported on first use (torch)."""
    module = importlib.import_module(f".{name}", __name__)
    return module, getattr(module, ALGORITHMS[name])
