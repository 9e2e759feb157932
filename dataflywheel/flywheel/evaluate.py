"""A round's evaluation on held-out prompts (docs/flywheel.md#evaluation).

The policy answers every held-out prompt greedily. Then, as configured:
- ``accuracy`` (and pass@k): the answers checked by the verifier, for prompts with answers;
- ``mean_reward``: the answers scored by a *fixed* evaluation reward model (not the one the rounds
  train against, which the policy learns to please);
- ``win_rate`` against round 0's answers to the same prompts: by an LLM judge (MT-Bench's pairwise
  prompt, every comparison in both orders so position bias cancels; a tie is half a win), or else by
  the evaluation reward model (the higher reward wins);
- ``lc_win_rate``: the length-controlled win rate (AlpacaEval 2's LC, Dubois et al. 2024): a
  logistic regression of the per-prompt win on tanh(length difference / its std), read at equal
  length. A policy that wins only by writing more loses that part of its win rate;
- ``mean_tokens``: answer length, so length inflation is visible round over round.
"""

from __future__ import annotations

import math
from typing import Any

from ..io import write_rows
from ..synth.backends.base import Sampling
from .config import FlywheelConfig
from .round import mean_of, rows_hash

LC_RIDGE = 1e-2  # a weak L2 penalty: an all-wins (separable) round still gets a finite LC estimate


def lc_win_rate(wins: list[float], length_diff: list[float]) -> float | None:
    """P(win) at equal length from ``logit P = a + b·tanh(Δ/sd(Δ))`` (AlpacaEval 2's length term,
    without its per-instruction term: one baseline, one model), fitted by Newton's method on the
    soft labels ``wins`` (1 win, 0.5 tie, 0 loss). Returns sigmoid(a)."""
    pairs = [(w, d) for w, d in zip(wins, length_diff) if w is not None]
    if not pairs:
        return None
    n = len(pairs)
    mean = sum(d for _, d in pairs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for _, d in pairs) / max(1, n - 1))
    xs = [math.tanh(d / sd) if sd > 0 else 0.0 for _, d in pairs]
    a = b = 0.0
    for _ in range(100):
        ga, gb = -LC_RIDGE * a, -LC_RIDGE * b  # gradient and Hessian of the penalized log-likelihood
        haa, hab, hbb = LC_RIDGE, 0.0, LC_RIDGE
        for (w, _), x in zip(pairs, xs):
            p = 1 / (1 + math.exp(-(a + b * x)))
            ga += w - p
            gb += (w - p) * x
            v = p * (1 - p)
            haa, hab, hbb = haa + v, hab + v * x, hbb + v * x * x
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if abs(da) + abs(db) < 1e-10:
            break
    return 1 / (1 + math.exp(-a))


def _greedy(cfg: FlywheelConfig, policy: str, rows: list[dict]) -> tuple[Any, dict[str, Any]]:
    from ..synth.backends.base import Request
    from ..synth.backends.transformers import TransformersBackend
    from ..synth.generate import prompt_messages

    backend = TransformersBackend(str(policy), batch_size=cfg.batch_size, device="cpu")
    greedy = Sampling(n=1, temperature=0.0, max_tokens=cfg.sampling.max_tokens, seed=0)
    reqs = [Request(r["id"], messages=tuple(prompt_messages(r)), sampling=greedy) for r in rows]
    return backend, {res.request_id: res.samples[0] for res in backend.generate(reqs)}


def _accuracy(cfg: FlywheelConfig, backend: Any, rows: list[dict], texts: list[str]) -> tuple[list, dict]:
    from ..synth.backends.base import Request
    from ..synth.generate import prompt_messages
    from ..synth.verifiers import verifier_reward

    check = verifier_reward(cfg.prompts.verifier)
    scores = check(rows, texts)
    metrics: dict[str, Any] = {"accuracy": mean_of([s or 0.0 for s in scores])}
    if cfg.eval.pass_at:
        k = cfg.eval.pass_at
        sampled = cfg.sampling.model_copy(update={"n": k, "seed": cfg.seed + 7})
        reqs = [Request(r["id"], messages=tuple(prompt_messages(r)), sampling=sampled) for r in rows]
        got = {res.request_id: [s.text for s in res.samples] for res in backend.generate(reqs)}
        hits = [max((v or 0.0) for v in check([r] * k, got[r["id"]])) for r in rows]
        metrics[f"pass@{k}"] = mean_of(hits)
    return scores, metrics


def judge_wins(cfg: FlywheelConfig, rows: list[dict], ours: list[str], base: list[str]) -> list[float | None]:
    """Per prompt, our answer's win rate against the baseline's by the LLM judge, both orders."""
    from ..synth.judge import Judge, JudgeConfig

    judge = Judge(JudgeConfig(backend=cfg.eval.judge, mode="pairwise", samples=cfg.eval.judge_samples,
                              name="eval_judge"))
    judge.setup()
    games = [{"id": r["id"], "messages": r["messages"], "completions": [{"text": a}, {"text": b}]}
             for r, a, b in zip(rows, ours, base)]
    return [g["completions"][0]["scores"]["judge"] for g in judge.score(games)]


def reward_win(ours: float | None, theirs: float | None) -> float | None:
    """The evaluation RM as judge of one prompt: 1 when ours has the higher reward, 0.5 on a tie."""
    if ours is None or theirs is None:
        return None
    return 0.5 if ours == theirs else float(ours > theirs)


def evaluate(cfg: FlywheelConfig, policy: str, rows: list[dict], baseline: list[dict] | None) -> tuple[list[dict], dict]:
    """Greedy answers to the held-out ``rows`` and their metrics; ``baseline``: round 0's results
    (None in round 0 itself)."""
    backend, samples = _greedy(cfg, policy, rows)
    texts = [samples[r["id"]].text for r in rows]
    results = [{"id": r["id"], "completion": t, "tokens": samples[r["id"]].tokens} for r, t in zip(rows, texts)]
    metrics: dict[str, Any] = {"n": len(rows), "mean_tokens": mean_of([x["tokens"] for x in results])}
    if cfg.prompts.verifier is not None:
        scores, found = _accuracy(cfg, backend, rows, texts)
        metrics.update(found)
        for res, r, s in zip(results, rows, scores):
            res.update(answer=r.get("answer"), correct=s)
    del backend
    if cfg.eval.reward_model is not None:
        from ..models.reward_model import score_rows

        rewards = score_rows(cfg.eval.reward_model, [{"messages": [*r["messages"], {"role": "assistant", "content": t}]}
                                                     for r, t in zip(rows, texts)], device="cpu")
        metrics["mean_reward"] = mean_of(rewards)
        for res, value in zip(results, rewards):
            res["reward"] = value
    if baseline is not None:
        base = {b["id"]: b for b in baseline}
        missing = [r["id"] for r in rows if r["id"] not in base]
        if missing:
            raise ValueError(f"round 0's evaluation has no answer for held-out prompt {missing[0]}")
        if cfg.eval.judge is not None:
            wins = judge_wins(cfg, rows, texts, [base[r["id"]]["completion"] for r in rows])
        else:  # the evaluation reward model as the judge
            wins = [reward_win(res.get("reward"), base[res["id"]].get("reward")) for res in results]
        diffs = [res["tokens"] - base[res["id"]]["tokens"] for res in results]
        for res, w in zip(results, wins):
            res["win"] = w
        metrics.update(win_rate=mean_of(wins), lc_win_rate=lc_win_rate(wins, diffs), mean_token_diff=mean_of(diffs),
                       judged=sum(w is not None for w in wins))
    return results, metrics


def stage_eval(cfg: FlywheelConfig, policy: str, heldout: list[dict], out: str, baseline: list[dict] | None) -> dict:
    results, metrics = evaluate(cfg, policy, heldout, baseline)
    write_rows(out, results)
    return {"counts": {"rows": len(results)}, "metrics": metrics, "hash": rows_hash(results, cfg.output)}
