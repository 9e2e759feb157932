"""`dataflywheel validate`: which command a config file is for, and whether it loads as one."""

from __future__ import annotations

from .errors import UserError

CONFIG_KINDS = ("run", "curate", "select", "pairs", "synth", "rounds", "train-sft", "train-rm", "train-dpo", "train-grpo")


def config_kind(data: object) -> str | None:
    """Which command a config file is for, from its keys (None: cannot tell)."""
    if not isinstance(data, dict):
        return None
    keys = set(data)
    if "policy" in keys:
        return "rounds"
    if {"method", "seeds"} <= keys:
        return "synth"
    if "generate" in keys:
        return "pairs"
    if keys & {"select", "mixture"} or set(data.get("steps") or {}) & {"ifd", "deita_score", "instag_tag"}:
        return "select"
    if "steps" in keys:
        return "curate"
    if keys & {"jobs", "stages"}:
        return "run"
    return None


def validate(path: str, kind: str | None = None) -> str:
    """Load ``path`` as a ``kind`` config (guessed from its keys when None); the line saying what it is.
    Raises UserError with one line per problem."""
    from .config import read_yaml

    kind = kind or config_kind(read_yaml(path))
    if kind is None:
        raise UserError(f"{path}: cannot tell which command this config is for; pass --as ({', '.join(CONFIG_KINDS)})")
    if kind.startswith("train-"):
        from .train import algorithm
        from .train.config import load_train_config

        name = kind.split("-", 1)[1]
        load_train_config(path, algorithm(name)[1])
        return f"{path}: ok: a train {name} config"
    if kind == "synth":
        from .pipelines.synth import load_synth_config

        return f"{path}: ok: a synth config ({load_synth_config(path).method})"
    if kind == "rounds":
        from .flywheel.config import load_flywheel_config

        cfg = load_flywheel_config(path)
        return f"{path}: ok: a rounds config ({cfg.rounds} rounds, training {cfg.train.algorithm})"
    from .pipelines.config import load_config, load_front_end

    cfg = load_config(path) if kind == "run" else load_front_end(kind, path)
    names = ", ".join(f"{j.name} ({', '.join(s.stage for s in j.stages) or 'no stages'})" for j in cfg.jobs)
    return f"{path}: ok: a {kind} config; engine {cfg.runner.engine}; jobs: {names}"
