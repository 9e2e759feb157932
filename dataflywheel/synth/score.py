"""Scorers for sampled completions (docs/pairs.md#scorers): one interface writing ``scores.reward``.

Rows come from the ``generate`` stage: a prompt (``prompt`` messages, or ``messages`` when n was 1)
and ``completions``, one dict per sample. Every scorer here writes, on each completion,
``scores[<field>]`` (a float, or None when it could not score) and, when ``set_reward`` is on,
``scores["reward"]``, the value the pair builders read; and it appends its provenance to
``row["meta"]["scorers"]`` (name, kind, model id + fingerprint, settings), so every score can be
audited and a pair re-thresholded without regenerating or rescoring. Score, then decide
(docs/concepts.md#stages-score-then-decide): nothing is filtered here.

A completion ``generate`` marked unusable (``rejected``: overlong, refusal, ...) is not scored by
default (its scores are None and it is counted ``skipped_rejected``): a pair builder must not pick
it, and scoring it would only cost model time.

- ``reward_model``: a reward model trained by ``train/rm.py``, read by ``models/reward_model.RewardModel``
  (the inference side: synth never imports the trainer), every completion of a batch in one call,
  sorted by length inside it; ``RewardModelHandler``
  (``pipelines/reward_handler.py``) runs the same function under Beam's RunInference on GPU workers.
- ``verify``: a rule verifier (``synth/verifiers.py``) against the row's reference answer.
- ``judge`` (``synth/judge.py``): an LLM judge, rubric or pairwise.
"""

from __future__ import annotations

import hashlib
import inspect
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from pydantic import Field

from ..models.fingerprint import model_fingerprint
from ..registry import register
from ..stages import Scorer, StageConfig
from .generate import prompt_messages
from .verifiers import BUILTIN, load_verifier, verifier_reward

Kind = Literal["reward_model", "judge", "verifier"]


class ScoreConfig(StageConfig):
    """What every completion scorer shares."""

    field: str  # the per-completion score name (scores[field]); each scorer states its default
    set_reward: bool = True  # also write scores["reward"], the value pair builders read (on by default)
    score_rejected: bool = False  # score completions generate marked unusable too


def usable(completion: dict) -> bool:
    """A completion generate kept (no ``rejected`` reason) with a text to score."""
    return completion.get("rejected") is None and isinstance(completion.get("text"), str)


def targets(rows: Sequence[dict], score_rejected: bool) -> list[tuple[int, int]]:
    """(row index, completion index) of every completion to score, in order."""
    return [(i, j) for i, row in enumerate(rows) for j, c in enumerate(row.get("completions") or [])
            if score_rejected or usable(c)]


def provenance(name: str, kind: Kind, model_id: str, fingerprint: str | None, settings: dict) -> dict:
    return {"name": name, "kind": kind, "model": {"id": model_id, "fingerprint": fingerprint}, "settings": settings}


def write_scores(rows: Sequence[dict], values: dict[tuple[int, int], float | None], cfg: ScoreConfig,
                 prov: dict, extras: dict[tuple[int, int], dict] | None = None) -> list[dict]:
    """New rows (inputs untouched: a failed batch is retried row by row from them) with
    ``scores[cfg.field]`` (and ``reward``) on every completion, None where nothing was scored, and
    ``prov`` in ``meta.scorers``, replacing an entry of the same name (a re-run rescores)."""
    out = []
    for i, row in enumerate(rows):
        completions = []
        for j, c in enumerate(row.get("completions") or []):
            value = values.get((i, j))
            scores = {**(c.get("scores") or {}), cfg.field: value}
            if cfg.set_reward:
                scores["reward"] = value
            completions.append({**c, **(extras or {}).get((i, j), {}), "scores": scores})
        meta = dict(row.get("meta") or {})
        meta["scorers"] = [s for s in meta.get("scorers") or [] if s.get("name") != prov["name"]] + [prov]
        out.append({**row, "completions": completions, "meta": meta})
    return out


def tally_scores(rows: Sequence[dict], cfg: ScoreConfig) -> Counter:
    """scored / unscorable (a usable completion that got None) / skipped_rejected."""
    counts: Counter = Counter()
    for row in rows:
        for c in row.get("completions") or []:
            if not (cfg.score_rejected or usable(c)):
                counts["skipped_rejected"] += 1
            elif (c.get("scores") or {}).get(cfg.field) is None:
                counts["unscorable"] += 1
            else:
                counts["scored"] += 1
    return counts


# -- reward model -----------------------------------------------------------------------------------


class RewardModelConfig(ScoreConfig):
    model: str  # a folder written by `dataflywheel train rm` (its final/), or a Hub reward model
    field: str = "reward_model"
    forward_batch_size: int = Field(16, ge=1)  # sequences per forward: RewardModel's default (models/reward_model.py)
    chat_template: str | None = None  # the template the RM was trained with, when not saved in its folder
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when visible


class RewardScorer(Protocol):
    """What ``reward_model_scores`` needs: ``RewardModel`` or its RPC proxy under RunInference."""

    def score(self, rows: Sequence[dict]) -> list[float]: ...


def reward_model_scores(rm: RewardScorer, rows: Sequence[dict], cfg: RewardModelConfig, name: str,
                        fingerprint: str | None) -> list[dict]:
    """Score every completion of ``rows`` with one ``rm.score`` call (prompt + completion as a
    conversation, exactly as the RM was trained on pairs); the stage and the RunInference handler
    both call this."""
    todo = targets(rows, cfg.score_rejected)
    items = [{"prompt": prompt_messages(rows[i]), "completion": rows[i]["completions"][j]["text"]} for i, j in todo]
    rewards = rm.score(items) if items else []
    if len(rewards) != len(items):
        raise RuntimeError(f"reward model returned {len(rewards)} rewards for {len(items)} completions")
    settings = {"chat_template": cfg.chat_template, "score_rejected": cfg.score_rejected}
    prov = provenance(name, "reward_model", cfg.model, fingerprint, settings)
    return write_scores(rows, {k: float(r) for k, r in zip(todo, rewards)}, cfg, prov)


@register("reward_model")
class RewardModelScore(Scorer):
    """Reward of each completion under a trained reward model (``scores.reward_model``)."""

    Config = RewardModelConfig
    resources = ("rm", "fingerprint")  # loaded once per worker, never pickled

    def build(self) -> None:
        from ..models.reward_model import RewardModel  # torch: imported on workers, not at config time

        c = self.config
        # RewardModel loads through models.cache.shared: one copy per worker process
        self.rm = RewardModel(c.model, device=c.device, batch_size=c.forward_batch_size,
                              chat_template=c.chat_template)
        self.fingerprint = model_fingerprint(c.model, self.rm.model)

    def score(self, rows: list[dict]) -> list[dict]:
        return reward_model_scores(self.rm, rows, self.config, self.name, self.fingerprint)

    def tally(self, rows: list[dict]) -> dict[str, int]:
        return dict(tally_scores(rows, self.config))


# -- rule verifiers ---------------------------------------------------------------------------------


class VerifyConfig(ScoreConfig):
    verifier: str  # a built-in (exact_match, numeric_match, regex_match) or "module:function"
    options: dict[str, Any] = {}  # keyword arguments of the verifier (normalize, rel_tol, abs_tol, pattern, flags)
    answer_field: str | None = None  # dotted path of the reference; None: verifiers.ANSWER_FIELDS
    field: str = "verifier"


def _source_hash(fn: Callable) -> str | None:
    """Which code scored: a hash of the verifier's source (None when Python cannot show it)."""
    try:
        return "src-" + hashlib.blake2b(inspect.getsource(fn).encode(), digest_size=8).hexdigest()
    except (OSError, TypeError):
        return None


@register("verify")
class Verify(Scorer):
    """A rule verifier's score of each completion against the row's answer (``scores.verifier``).

    A row without a reference scores None (unscorable, not wrong). The verifier is called per row, so
    a row's scores never depend on its batch: ``verifier_reward`` raises when every completion of a
    call raises (a reference that does not parse); that row's completions then score None and carry
    the error (``verifier_error``), counted ``verifier_errors`` in the report, where a broken
    verifier shows as every row failing."""

    Config = VerifyConfig
    # fn: a closure over an imported user function, never pickled (each worker imports it again);
    # prov: the hash of the code the worker scores with
    resources = ("fn", "prov")

    def __init__(self, config: VerifyConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.setup()  # a bad verifier name, import path or option fails at config time

    def build(self) -> None:
        c = self.config
        self.fn = verifier_reward(c.verifier, field=c.answer_field, **dict(c.options))
        code = BUILTIN.get(c.verifier) or load_verifier(c.verifier)
        self.prov = provenance(self.name, "verifier", c.verifier, _source_hash(code),
                               {"options": c.options, "answer_field": c.answer_field,
                                "score_rejected": c.score_rejected})

    def score(self, rows: list[dict]) -> list[dict]:
        c = self.config
        values: dict[tuple[int, int], float | None] = {}
        extras: dict[tuple[int, int], dict] = {}
        for i, row in enumerate(rows):
            todo = targets([row], c.score_rejected)
            if not todo:
                continue
            try:
                got = self.fn([row] * len(todo), [row["completions"][j]["text"] for _, j in todo])
            except Exception as err:  # noqa: BLE001 - a user's verifier: any error is this row's
                got = [None] * len(todo)
                extras.update({(i, j): {"verifier_error": f"{type(err).__name__}: {err}"} for _, j in todo})
            values.update({(i, j): v for (_, j), v in zip(todo, got)})
        return write_scores(rows, values, c, self.prov, extras)

    def tally(self, rows: list[dict]) -> dict[str, int]:
        counts = tally_scores(rows, self.config)
        counts["verifier_errors"] = sum(any("verifier_error" in c for c in r.get("completions") or []) for r in rows)
        return {k: v for k, v in counts.items() if v}
