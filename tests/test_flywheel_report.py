"""The flywheel run report (docs/flywheel.md#report): table, HTML charts, escaping, missing parts, CLI.

Run folders are built by hand in the documented layout (rounds.py / round.py): a manifest plus the
stage outputs the charts read, so every expected number below is known by construction.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from dataflywheel.cli import main
from dataflywheel.flywheel import report
from dataflywheel.flywheel.charts import five_numbers
from dataflywheel.io import write_rows


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage(seconds: float, counts: dict | None = None, metrics: dict | None = None) -> dict:
    return {"inputs": "i", "output": "o", "counts": counts or {}, "metrics": metrics or {}, "seconds": seconds,
            "skipped": False}


def _loop_round(k: int, acc: float, scores: list[list[float]], margins: list[float], dpo: bool) -> dict:
    verified = sum(1 for s in scores if max(s) >= 1) / len(scores)
    flat = [x for s in scores for x in s]
    stages = {
        "prompts": _stage(0.1, {"rows": len(scores)}),
        "samples": _stage(4.0, {"sample": {"in": len(scores), "kept": len(scores), "rejected": {}, "dead_letter": 0},
                                "pairs": {"in": len(scores), "kept": len(margins),
                                          "rejected": {"tie": len(scores) - len(margins)}, "dead_letter": 0},
                                "best_of_n": {"in": len(scores), "kept": 3, "rejected": {"below_min": 1}, "dead_letter": 0}},
                          {"prompts": len(scores), "samples": len(flat), "sample_accuracy": sum(flat) / len(flat),
                           "prompts_with_verified": verified, "pair_margins": margins, "mean_tokens": 5.0}),
        "pool": _stage(0.2, {"rows": 3, "inserted": 2, "replaced": 1, "kept": 0, "no_reward": 0, "pool": 10 * k},
                       {"pool_by_round": {str(k): 3}}),
        "curate": _stage(0.3, {"in": 10 * k, "kept": 10 * k - 1, "rejected": {"exact_duplicate": 1}, "stages": {}}),
        "train": _stage(12.5, {"mix": 50 + 10 * k, "seed": 50, "pool": 10 * k, **({"pairs": len(margins)} if dpo else {})},
                        {"sft": {"steps": 5, "train_loss": 1.25}, **({"dpo": {"steps": 3, "train_loss": 0.6}} if dpo else {}),
                         "policy": f"round-{k:03d}/train/sft/final"}),
        "eval": _stage(1.0, {"rows": 20}, {"accuracy": acc, "n": 20, "pass@4": acc + 0.1}),
    }
    return {"round": k, "policy": "p", "policy_hash": "h", "accuracy": acc, "stages": stages}


def make_run(root: Path, name: str = "demo", control: bool = False) -> Path:
    """Round 0 (seed, train, eval) and rounds 1-2: loop rounds (DPO in round 1 only), or control rounds."""
    run = root / "run"
    r0 = {"round": 0, "policy": "p0", "policy_hash": "h0", "accuracy": 0.1,
          "stages": {"seed": _stage(0.5, {"rows": 50}), "train": _stage(20.0, {"mix": 50, "seed": 50, "pool": 0},
                                                                        {"sft": {"steps": 10, "train_loss": 2.5}}),
                     "eval": _stage(1.0, {"rows": 20}, {"accuracy": 0.1, "n": 20, "pass@4": 0.2})}}
    rounds = [r0]
    _jsonl(run / "round-000/train/sft/metrics.jsonl", [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 11)])
    if control:
        for k, acc in ((1, 0.12), (2, 0.11)):
            rounds.append({"round": k, "policy": "p", "policy_hash": "h", "accuracy": acc,
                           "stages": {"train": r0["stages"]["train"], "eval": _stage(1.0, {"rows": 20}, {"accuracy": acc})}})
    else:
        scores = {1: [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], 2: [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 1]]}
        margins = {1: [1.0, 1.0], 2: [1.0, 1.0]}
        for k, acc in ((1, 0.3), (2, 0.45)):
            rounds.append(_loop_round(k, acc, scores[k], margins[k], dpo=k == 1))
            rd = run / f"round-{k:03d}"
            write_rows(rd / "samples/scored",
                   [{"id": f"r{k}-{i}", "completions": [{"index": j, "text": "x", "tokens": 4 + j,
                                                          "scores": {"verifier": v, "reward": v}} for j, v in enumerate(s)]}
                    for i, s in enumerate(scores[k])])
            pair_rows = [{"id": f"p{k}-{i}", "chosen": [], "rejected": [],
                          "scores": {"margin": m, "reward_chosen": 1.0, "reward_rejected": 0.0,
                                     "tokens_chosen": 3 + i, "tokens_rejected": 6 + i}} for i, m in enumerate(margins[k])]
            if k == 2:  # tokens only in the candidates' audit (meta.candidates), as some rows carry them
                for row in pair_rows:
                    del row["scores"]["tokens_chosen"], row["scores"]["tokens_rejected"]
                    row["meta"] = {"chosen_index": 0, "rejected_index": 1,
                                   "candidates": [{"index": 0, "tokens": 2}, {"index": 1, "tokens": 9}]}
            write_rows(rd / "samples/pairs", pair_rows)
            _jsonl(rd / "train/sft/metrics.jsonl", [{"step": s, "loss": 1.5 - 0.05 * s} for s in range(1, 6)])
            if k == 1:
                _jsonl(rd / "train/dpo/metrics.jsonl", [{"step": s, "loss": 0.69 - 0.01 * s} for s in range(1, 4)])
    manifest = {"name": name, "config": {"control": control, "pool": {"field": "verifier"}, "note": "<b>x</b>"},
                "rounds": rounds, "stopped": None, "exports": {}, "card": {"run": name}}
    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


class Charts(HTMLParser):
    """Per ``<svg data-chart=...>``: counts of marks by class and each polyline's point count."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, dict] = {}
        self.current: str | None = None
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.current = a["data-chart"]
            self.charts[self.current] = {"pt": 0, "bar": 0, "box": 0, "lines": []}
        elif self.current and a.get("class") in ("pt", "bar", "box"):
            self.charts[self.current][a["class"]] += 1
        elif self.current and tag == "polyline":
            n = len(a["points"].split())
            assert n == int(a["data-n"])
            self.charts[self.current]["lines"].append(n)
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.titles.append(data)


def parse(html: str) -> Charts:
    p = Charts()
    p.feed(html)
    p.close()
    return p


def test_table_has_one_column_per_round(tmp_path):
    table = report.summary_table(report.load_manifest(make_run(tmp_path)))
    lines = table.splitlines()
    assert lines[1].split() == ["round", "0", "round", "1", "round", "2"]
    width = max(len(label) for label, _ in report.table_rows(report.load_manifest(make_run(tmp_path))))
    rows = {line[:width].strip(): line[width:].split() for line in lines[2:]}
    assert rows["held-out accuracy"] == ["0.100", "0.300", "0.450"]
    assert rows["pass@4"] == ["0.200", "0.400", "0.550"]
    assert rows["prompts verified"] == ["-", "66.7%", "100.0%"]
    assert rows["sample accuracy"] == ["-", "0.417", "0.833"]
    assert rows["pairs kept"] == ["-", "2", "2"]
    assert rows["pool (+new/replaced)"] == ["-", "10", "(+2/1)", "20", "(+2/1)"]
    assert rows["curated kept/in"] == ["-", "9/10", "19/20"]
    assert rows["train rows (seed+pool x n)"] == ["50", "(50+0)", "60", "(50+10x1)", "70", "(50+20x1)"]
    assert rows["dpo steps / loss"] == ["-", "3", "/", "0.6", "-"]
    assert rows["seconds: total"] == ["21.5", "18.1", "18.1"]


def test_html_has_one_svg_per_chart_with_the_right_marks(tmp_path):
    path = Path(report.write_html(make_run(tmp_path)))
    assert path == tmp_path / "run" / "report.html"
    p = parse(path.read_text())
    c = p.charts
    assert list(c) == ["accuracy", "rewards", "margins", "lengths", "kept", "sft_loss", "dpo_loss"]
    # held-out accuracy and pass@4 for 3 rounds; sample accuracy and verified share for the 2 loop rounds
    assert c["accuracy"]["lines"] == [3, 3, 2, 2] and c["accuracy"]["pt"] == 10
    # verifier scores are 0/1: one bin per value, one bar per round in each bin
    assert c["rewards"]["bar"] == 2 * 2
    assert "round 1 1: 41.7%" in p.titles and "round 2 1: 83.3%" in p.titles
    assert c["margins"]["bar"] == 1 * 2  # every margin is 1.0: one bin
    assert c["lengths"]["box"] == 2 * 2  # chosen and rejected per loop round
    assert c["kept"]["bar"] == 5 * 2  # sample, pairs, best_of_n, pool, curate per loop round
    assert "r1 pairs: in 3, kept 2, rejected 1 (1 tie)" in p.titles
    assert c["sft_loss"]["lines"] == [10, 5, 5] and c["dpo_loss"]["lines"] == [3]
    # round 2's lengths came from meta.candidates: chosen 2 tokens, rejected 9
    assert any(t.startswith("r2 chosen: n=2 min 2 ") for t in p.titles)
    assert any(t.startswith("r2 rejected: n=2 min 9 ") for t in p.titles)


def test_text_is_escaped(tmp_path):
    run = make_run(tmp_path, name="<script>alert(1)</script>")
    html = Path(report.write_html(run, tmp_path / "out" / "r.html")).read_text()
    assert "<script" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    parse(html)  # still parses, one svg per chart


def test_missing_parts_render(tmp_path):
    """A control run: no samples, pairs, pool or DPO; the charts say so instead of failing."""
    run = make_run(tmp_path, control=True)
    table = report.summary_table(report.load_manifest(run))
    assert "(control: seed data only)" in table and "pairs kept" in table
    html = Path(report.write_html(run)).read_text()
    p = parse(html)
    assert p.charts["accuracy"]["lines"] == [3, 1]  # held-out accuracy for 3 rounds; pass@4 only in round 0's eval
    for name in ("rewards", "margins", "lengths", "kept", "dpo_loss"):
        assert p.charts[name] == {"pt": 0, "bar": 0, "box": 0, "lines": []}, name
    assert html.count(">no data<") == 4 and html.count(">no stage counts<") == 1
    assert p.charts["sft_loss"]["lines"] == [10]  # the control rounds wrote no metrics.jsonl here


def test_empty_pairs_folder_and_round_zero_only(tmp_path):
    run = make_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    write_rows(run / "round-001/samples/pairs", [])  # a stage that kept no pairs
    c = parse(Path(report.write_html(run)).read_text()).charts
    assert c["lengths"]["box"] == 2  # round 2 only
    assert c["margins"]["bar"] == 2  # round 1 falls back to the manifest's pair_margins
    manifest["rounds"] = manifest["rounds"][:1]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert report.summary_table(manifest).splitlines()[1].split() == ["round", "0"]
    assert parse(Path(report.write_html(run)).read_text()).charts["accuracy"]["lines"] == [1, 1]


def test_loss_curve_thins_and_skips_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 1001)) + '{"step": 10')
    pts = report.loss_curve(path, cap=300)
    assert len(pts) <= 301 and pts[0] == (1.0, 1.0) and pts[-1] == (1000.0, 0.001)
    assert report.loss_curve(tmp_path / "absent.jsonl") == []


def test_curves_follow_each_other():
    curves: dict = {}
    report.append_curve(curves, "round 0", [(1.0, 3.0), (10.0, 2.0)])
    report.append_curve(curves, "round 1", [])  # a round without this phase
    report.append_curve(curves, "round 2", [(1.0, 1.5), (5.0, 1.2)])
    assert curves == {"round 0": [(1.0, 3.0), (10.0, 2.0)], "round 1": [], "round 2": [(11.0, 1.5), (15.0, 1.2)]}


def test_stream_rows_caps(tmp_path):
    write_rows(tmp_path / "d", [{"id": i} for i in range(50)])
    assert [r["id"] for r in report.stream_rows(tmp_path / "d", cap=7)] == list(range(7))
    assert list(report.stream_rows(tmp_path / "nothing")) == []


def test_five_numbers_match_numpy():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert five_numbers(values) == pytest.approx(np.quantile(values, [0, 0.25, 0.5, 0.75, 1]).tolist())


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["report", str(run), "--html", str(tmp_path / "x.html")]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and out.strip().endswith(str(tmp_path / "x.html"))
    assert (tmp_path / "x.html").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and len(err.strip().splitlines()) == 1
