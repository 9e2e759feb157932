"""``dataflywheel report RUN``: a flywheel run's rounds side by side, and an HTML report with plots
(docs/flywheel.md#report).

Everything comes from the run folder: the run's ``manifest.json`` (every round's stage counts,
metrics and wall times, see rounds.py) for the table and the per-round numbers, and the stages'
outputs for the distributions: ``samples/scored`` (every sample's scores), ``samples/pairs``
(margins, chosen/rejected lengths) and ``train/{sft,dpo}/metrics.jsonl`` (loss per step). Those
files can be large, so they are streamed and capped (``MAX_ROWS``, ``MAX_POINTS``). The HTML is one
self-contained file (inline CSS and SVG from charts.py, no script), so it can be attached to a CI
run or mailed. A part a run does not have (no DPO, no pairs, a control run) shows as "-" in the table
and as a chart saying "no data", never as an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from html import escape
from itertools import islice
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import fs
from . import charts
from .charts import fmt

MAX_ROWS = 2000  # rows read per round per output for the distributions (a few MB of JSONL)
MAX_POINTS = 300  # points per training curve (a long run is thinned evenly, the last step kept)
STAGE_ORDER = ("seed", "prompts", "samples", "pool", "curate", "train", "eval")
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1000px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}
svg{display:block;margin:1em 0}.note{color:#666}"""


# ---- the manifest ---------------------------------------------------------------------------------

def load_manifest(run_dir: str | Path) -> dict:
    """The run's manifest.json (local or in a bucket); a UserError (one line) when the folder is not a flywheel run."""
    path = fs.join(run_dir, "manifest.json")
    try:
        manifest = json.loads(fs.read_text(path))
    except FileNotFoundError:
        raise UserError(f"{run_dir}: no manifest.json; not a flywheel run folder (`dataflywheel rounds` writes one)") from None
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("rounds"), list):
        raise UserError(f"{path}: no 'rounds' list; not a flywheel run manifest")
    return manifest


def _get(record: dict, *keys: str) -> Any:
    """``record["stages"][k0][k1]...``, or None where any level is missing."""
    node: Any = record.get("stages") or {}
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _mean(xs: list | None) -> float | None:
    xs = [float(x) for x in xs or [] if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pass_keys(rounds: list[dict]) -> list[str]:
    keys = {k for r in rounds for k in (_get(r, "eval", "metrics") or {}) if k.startswith("pass@")}
    return sorted(keys, key=lambda k: int(k[5:]) if k[5:].isdigit() else 0)


def _accuracy(record: dict) -> float | None:
    acc = record.get("accuracy")
    return acc if acc is not None else _get(record, "eval", "metrics", "accuracy")


def _steps_loss(phase: dict | None) -> str:
    if not phase:
        return "-"
    return f"{fmt(phase.get('steps'))} / {fmt(phase.get('train_loss'), 4)}"


def _pool(record: dict) -> str:
    c = _get(record, "pool", "counts")
    if not c:
        return "-"
    return f"{c.get('pool', '-')} (+{c.get('inserted', 0)}/{c.get('replaced', 0)})"


def _ratio(kept: Any, n_in: Any) -> str:
    return "-" if kept is None else f"{kept}/{n_in if n_in is not None else '-'}"


PREFERENCE = (("mean_reward", "held-out mean reward (eval RM)"), ("win_rate", "win rate vs round 0"),
              ("lc_win_rate", "length-controlled win rate vs round 0"), ("mean_tokens", "held-out answer tokens"))


def table_rows(manifest: dict) -> list[tuple[str, list[str]]]:
    """The summary as (label, one cell per round): shared by the terminal table and the HTML."""
    rounds = manifest.get("rounds") or []

    def row(label: str, fn) -> tuple[str, list[str]]:
        return label, [fn(r) for r in rounds]

    field = ((manifest.get("config") or {}).get("pool") or {}).get("field") or "verifier"
    verified = field == "verifier"

    rows = [row("held-out accuracy", lambda r: _acc(_accuracy(r)))]
    rows += [row(k, lambda r, k=k: _acc(_get(r, "eval", "metrics", k))) for k in _pass_keys(rounds)]
    rows += [row(label, lambda r, key=key: _acc(_get(r, "eval", "metrics", key))) for key, label in PREFERENCE
             if any(_get(r, "eval", "metrics", key) is not None for r in rounds)]
    rows += [
        row("prompts", lambda r: fmt(_get(r, "samples", "metrics", "prompts") or _get(r, "prompts", "counts", "rows"))),
        row("samples", lambda r: fmt(_get(r, "samples", "metrics", "samples"))),
        # with a verifier these are accuracies; with a reward model, the mean score and the share of
        # prompts with a sample at or above pool.min_score
        row("prompts verified" if verified else "prompts with a sample >= pool.min_score",
            lambda r: _share(_get(r, "samples", "metrics", "prompts_with_verified"))),
        row("sample accuracy" if verified else f"mean sample {field}",
            lambda r: _acc(_get(r, "samples", "metrics", "sample_accuracy"))),
        row("mean sample tokens", lambda r: fmt(_get(r, "samples", "metrics", "mean_tokens"))),
        row("pairs kept", lambda r: fmt(_get(r, "samples", "counts", "pairs", "kept"))),
        row("mean pair margin", lambda r: fmt(_mean(_get(r, "samples", "metrics", "pair_margins")))),
        row("best-of-N rows", lambda r: fmt(_get(r, "samples", "counts", "best_of_n", "kept"))),
        row("pool (+new/replaced)", _pool),
        row("curated kept/in", lambda r: _ratio(_get(r, "curate", "counts", "kept"), _get(r, "curate", "counts", "in"))),
        row("train rows (seed+pool x n)", _mix),
        row("sft steps / loss", lambda r: _steps_loss(_get(r, "train", "metrics", "sft"))),
        row("dpo steps / loss", lambda r: _steps_loss(_get(r, "train", "metrics", "dpo"))),
    ]
    names = [s for s in STAGE_ORDER if any(s in (r.get("stages") or {}) for r in rounds)]
    names += sorted({s for r in rounds for s in (r.get("stages") or {})} - set(names))
    rows += [row(f"seconds: {s}", lambda r, s=s: _secs(_get(r, s, "seconds"))) for s in names]
    rows.append(row("seconds: total", lambda r: _secs(sum(float(m.get("seconds") or 0) for m in
                                                          (r.get("stages") or {}).values()))))
    return rows


def _acc(x: float | None) -> str:
    """Accuracies to 3 decimals, as `dataflywheel rounds` prints them."""
    return "-" if x is None else f"{x:.3f}"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _mix(record: dict) -> str:
    c = _get(record, "train", "counts")
    if not c:
        return "-"
    mix, seed, pool = c.get("mix"), c.get("seed"), c.get("pool") or 0
    if not pool or not isinstance(mix, int) or not isinstance(seed, int):
        return f"{fmt(mix)} ({fmt(seed)}+{pool})"
    return f"{mix} ({seed}+{pool}x{round((mix - seed) / pool)})"  # the pool is repeated to its share (training_mix)


def summary_table(manifest: dict) -> str:
    """The rounds side by side, one column per round, for a terminal."""
    rounds = manifest.get("rounds") or []
    rows = table_rows(manifest)
    head = ["", *(f"round {r.get('round', i)}" for i, r in enumerate(rounds))]
    width0 = max(len(head[0]), *(len(label) for label, _ in rows))
    widths = [max(len(head[j + 1]), *(len(cells[j]) for _, cells in rows)) for j in range(len(rounds))]
    lines = [f"run {manifest.get('name', '?')}: {len(rounds)} round(s)"
             + (" (control: seed data only)" if (manifest.get("config") or {}).get("control") else "")]
    lines.append("  ".join([head[0].ljust(width0), *(h.rjust(w) for h, w in zip(head[1:], widths))]).rstrip())
    for label, cells in rows:
        lines.append("  ".join([label.ljust(width0), *(c.rjust(w) for c, w in zip(cells, widths))]))
    if manifest.get("stopped"):
        lines.append(f"stopped: {manifest['stopped']}")
    return "\n".join(lines)


# ---- stage outputs (streamed) ---------------------------------------------------------------------

def stream_rows(folder: str | Path, cap: int = MAX_ROWS) -> Iterator[dict]:
    """Up to ``cap`` rows of a pipeline output folder (or file); nothing when it is absent or empty."""
    from ..io import read

    if not fs.exists(folder):
        return iter(())
    try:
        rows = (r for r in read(str(folder)) if isinstance(r, dict))
        return islice(rows, cap)
    except UserError:  # a folder with no data files: a stage that kept nothing
        return iter(())


def reward_values(folder: str | Path, field: str) -> list[float]:
    """Every sample's ``field`` score (else ``reward``) from a ``samples/scored`` folder."""
    out = []
    for row in stream_rows(folder):
        for c in row.get("completions") or []:
            scores = c.get("scores") or {}
            value = scores.get(field, scores.get("reward"))
            if isinstance(value, (int, float)):
                out.append(float(value))
    return out


def pair_stats(folder: str | Path) -> dict[str, list[float]]:
    """Margins and chosen / rejected lengths in tokens from a ``samples/pairs`` folder."""
    out: dict[str, list[float]] = {"margin": [], "chosen": [], "rejected": []}
    for row in stream_rows(folder):
        scores = row.get("scores") or {}
        if isinstance(scores.get("margin"), (int, float)):
            out["margin"].append(float(scores["margin"]))
        meta = row.get("meta") or {}
        cands = {c.get("index"): c for c in meta.get("candidates") or [] if isinstance(c, dict)}
        for side in ("chosen", "rejected"):
            tokens = scores.get(f"tokens_{side}")
            if tokens is None:  # older rows: the candidate's audit entry
                tokens = (cands.get(meta.get(f"{side}_index")) or {}).get("tokens")
            if isinstance(tokens, (int, float)):
                out[side].append(float(tokens))
    return out


def loss_curve(path: str | Path, cap: int = MAX_POINTS, key: str = "loss") -> list[tuple[float, float]]:
    """(step, ``key``) per logged step of a train loop's metrics.jsonl (train/loop.py), thinned to ``cap``."""
    if not fs.isfile(path):
        return []
    points = []
    with fs.open_file(path, "r", encoding="utf-8") as fh:
        for line in fh:
            try:
                m = json.loads(line)
            except ValueError:  # a line torn by a kill: the loop trims it on resume
                continue
            if isinstance(m, dict) and isinstance(m.get(key), (int, float)) and "step" in m:
                points.append((float(m["step"]), float(m[key])))
    if len(points) > cap:
        every = -(-len(points) // cap)
        points = points[::every] if points[::every][-1] == points[-1] else [*points[::every], points[-1]]
    return points


def append_curve(curves: dict[str, list[tuple[float, float]]], label: str, points: list[tuple[float, float]]) -> None:
    """Add a round's (step, loss) curve after the previous rounds' on one step axis: each round
    restarts its step count, and side by side the short later rounds would hide under round 0."""
    start = max((pts[-1][0] for pts in curves.values() if pts), default=0.0)
    curves[label] = [(start + x, y) for x, y in points]


# ---- the HTML -------------------------------------------------------------------------------------

def _round_dir(run: str, record: dict) -> str:
    return fs.join(run, f"round-{int(record.get('round', 0)):03d}")


def kept_bars(rounds: list[dict]) -> list[tuple[str, int, int, str]]:
    """(label, in, kept, why) per filtering stage per round, from the manifest's counts."""
    bars = []
    for r in rounds:
        k = r.get("round")
        for job in ("sample", "pairs", "best_of_n"):
            c = _get(r, "samples", "counts", job)
            if isinstance(c, dict) and "in" in c:
                why = ", ".join(f"{n} {reason}" for reason, n in sorted((c.get("rejected") or {}).items()))
                bars.append((f"r{k} {job}", int(c["in"] or 0), int(c.get("kept") or 0), why))
        c = _get(r, "pool", "counts")
        if isinstance(c, dict) and "rows" in c:
            new = int(c.get("inserted") or 0) + int(c.get("replaced") or 0)
            bars.append((f"r{k} pool", int(c["rows"]), new,
                         f"{c.get('kept', 0)} worse than the pooled sample, {c.get('no_reward', 0)} without a reward"))
        c = _get(r, "curate", "counts")
        if isinstance(c, dict) and "in" in c:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted((c.get("rejected") or {}).items()))
            bars.append((f"r{k} curate", int(c["in"] or 0), int(c.get("kept") or 0), why))
    return bars


def charts_for(run: str, manifest: dict) -> list[tuple[str, str]]:
    """(section heading, svg) for every chart of the report, in order."""
    rounds = manifest.get("rounds") or []
    field = ((manifest.get("config") or {}).get("pool") or {}).get("field") or "reward"
    acc: dict[str, list[tuple[float, float]]] = {"held-out accuracy": []}
    for key in _pass_keys(rounds):
        acc[f"held-out {key}"] = []
    acc["sample accuracy"], acc["prompts verified"] = [], []
    rewards, margins, lengths = {}, {}, []
    sft: dict[str, list[tuple[float, float]]] = {}
    dpo: dict[str, list[tuple[float, float]]] = {}
    prefs: dict[str, list[tuple[float, float]]] = {label: [] for key, label in PREFERENCE[:3]}
    logps: dict[str, list[tuple[float, float]]] = {}
    for r in rounds:
        k = r.get("round", 0)
        folder = _round_dir(run, r)
        for label, value in [("held-out accuracy", _accuracy(r)),
                             *((f"held-out {p}", _get(r, "eval", "metrics", p)) for p in _pass_keys(rounds)),
                             ("sample accuracy", _get(r, "samples", "metrics", "sample_accuracy")),
                             ("prompts verified", _get(r, "samples", "metrics", "prompts_with_verified"))]:
            if isinstance(value, (int, float)):
                acc[label].append((float(k), float(value)))
        if "samples" in (r.get("stages") or {}):
            rewards[f"round {k}"] = reward_values(fs.join(folder, "samples", "scored"), field)
            pairs = pair_stats(fs.join(folder, "samples", "pairs"))
            margins[f"round {k}"] = pairs["margin"] or [float(x) for x in
                                                        _get(r, "samples", "metrics", "pair_margins") or []]
            lengths += [(f"r{k}", "chosen", pairs["chosen"]), (f"r{k}", "rejected", pairs["rejected"])]
        for curves, phase in ((sft, "sft"), (dpo, "dpo")):
            append_curve(curves, f"round {k}", loss_curve(fs.join(folder, "train", phase, "metrics.jsonl")))
        for key, label in PREFERENCE[:3]:
            value = _get(r, "eval", "metrics", key)
            if isinstance(value, (int, float)):
                prefs[label].append((float(k), float(value)))
        start = max((pts[-1][0] for pts in logps.values() if pts), default=0.0)
        for side in ("chosen", "rejected"):  # DPO's failure mode: both falling together
            points = loss_curve(fs.join(folder, "train", "dpo", "metrics.jsonl"), key=f"logps/{side}")
            logps[f"r{k} {side}"] = [(start + x, y) for x, y in points]
    steps = "step (rounds one after another)"
    out = [
        ("Held-out accuracy per round",
         charts.line_chart("accuracy", "held-out accuracy per round", acc, "round", "accuracy", (0.0, 1.0))),
        ("Reward distribution per round",
         charts.histogram("rewards", f"sample scores ({field}) per round", rewards, xlabel=field)),
        ("Pair margins per round", charts.histogram("margins", "pair margin (chosen - rejected reward)", margins,
                                                    xlabel="margin")),
        ("Pair lengths per round", charts.box_chart("lengths", "chosen / rejected length (tokens)", lengths, "tokens")),
        ("Rows kept per stage", charts.kept_bars("kept", "rows in / kept / rejected per stage", kept_bars(rounds))),
        ("SFT training loss", charts.line_chart("sft_loss", "SFT loss per step", sft, steps, "loss", dots=False)),
        ("DPO training loss", charts.line_chart("dpo_loss", "DPO loss per step", dpo, steps, "loss", dots=False)),
    ]
    if any(prefs.values()):
        out.insert(1, ("Held-out reward and win rate per round",
                       charts.line_chart("preference", "eval RM mean reward; win rates vs round 0", prefs, "round",
                                         "value")))
    if any(logps.values()):
        out.append(("DPO chosen / rejected log-probs", charts.line_chart(
            "dpo_logps", "summed log-prob of chosen and rejected per DPO step", logps, steps, "log-prob", dots=False)))
    return out


def _html_table(manifest: dict) -> str:
    rounds = manifest.get("rounds") or []
    head = "".join(f"<th>round {escape(str(r.get('round', i)))}</th>" for i, r in enumerate(rounds))
    body = "".join(f"<tr><td>{escape(label)}</td>{''.join(f'<td>{escape(c)}</td>' for c in cells)}</tr>"
                   for label, cells in table_rows(manifest))
    return f'<table class="summary"><tr><th></th>{head}</tr>{body}</table>'


def render_html(run: str, manifest: dict) -> str:
    """The report as one HTML string."""
    name = str(manifest.get("name", fs.basename(run)))
    parts = ["<!doctype html>", '<html><head><meta charset="utf-8">',
             f"<title>dataflywheel report: {escape(name)}</title><style>{STYLE}</style></head><body>",
             f"<h1>Flywheel run {escape(name)}</h1>",
             f'<p class="note">run folder {escape(str(run))}; {len(manifest.get("rounds") or [])} round(s)'
             + ("; control run (seed data only)" if (manifest.get("config") or {}).get("control") else "") + "</p>"]
    if manifest.get("stopped"):
        parts.append(f"<p>stopped: {escape(str(manifest['stopped']))}</p>")
    parts += ["<h2>Rounds side by side</h2>", _html_table(manifest)]
    for heading, svg in charts_for(run, manifest):
        parts += [f"<h2>{escape(heading)}</h2>", svg]
    for key in ("exports", "card", "config"):
        if manifest.get(key):
            text = json.dumps(manifest[key], indent=2, sort_keys=True, default=str)
            parts += [f"<h2>{escape(key)}</h2>", f"<pre>{escape(text)}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(run_dir: str | Path, out: str | Path | None = None) -> str:
    """Write the report (default ``RUN/report.html``, local or in a bucket) and return its path."""
    run = os.fspath(run_dir)
    manifest = load_manifest(run)
    path = os.fspath(out) if out is not None else fs.join(run, "report.html")
    fs.write_text(path, render_html(run, manifest))  # atomic: a reader never sees half a report
    return path
