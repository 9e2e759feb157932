"""The web-curation pipeline: step order and options, the curate command end to end on the demo
pages (both engines) and on the shared WARC samples (malformed ones included, nothing lost)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dataflywheel.cli import main
from dataflywheel.errors import UserError
from dataflywheel.filters.extract import ExtractConfig
from dataflywheel.io import read
from dataflywheel.pipelines.config import load_config
from dataflywheel.pipelines.steps import step_specs
from dataflywheel.pipelines.web import WEB_STEPS, WebSteps, load_web_config, web_run_config

REPO = Path(__file__).resolve().parent.parent
WEB_YAML = REPO / "configs" / "web.yaml"


def test_steps_in_fixed_order_with_defaults_and_skips():
    specs = step_specs(WebSteps(c4=False, langid={"languages": ["de"]}, perplexity={"model": "m"}), WEB_STEPS)
    names = [s.stage for s in specs]
    order = [cls.stage_name for cls in WEB_STEPS.values()]
    assert names == [n for n in order if n not in ("c4", "decontaminate")]  # perplexity on, c4 skipped
    assert specs[1].config == ExtractConfig()  # the stage's own defaults, stated once in its config
    assert next(s for s in specs if s.stage == "langid").config.languages == ["de"]
    assert step_specs(WebSteps(), WEB_STEPS)[3].config.languages == ["en"]  # the web pipeline keeps English


def test_bad_step_option_names_the_step():
    data = {"input": {"paths": "x"}, "output": {"path": "y"}, "steps": {"extract": {"mode": "turbo"}}}
    with pytest.raises(UserError, match=r"^web.yaml: steps\.extract\.mode: .*turbo"):
        web_run_config(data, "web.yaml")
    with pytest.raises(UserError, match=r"steps\.colour: unknown key; allowed: .*minhash_dedup"):
        web_run_config({**data, "steps": {"colour": {}}}, "web.yaml")


def test_demo_runs_the_web_config_itself(monkeypatch):
    """The demo's first job names configs/web.yaml: the same stages, with only the output moved."""
    monkeypatch.chdir(REPO)
    demo = load_config(REPO / "configs" / "demo.yaml").jobs[0]
    web = load_web_config(WEB_YAML).jobs[0]
    assert demo.stages == web.stages and demo.input == web.input
    assert demo.output.path == "runs/demo/web" and web.output.path == "runs/web"


def report_of(out: Path) -> dict:
    return json.loads((out / "_report.json").read_text())


@pytest.mark.parametrize("engine", ["plain", "local"])
def test_curate_demo_pages(tmp_path, engine, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / engine
    assert main(["curate", str(WEB_YAML), "--output", str(out), "--engine", engine]) == 0
    printed = capsys.readouterr().out
    assert "LSH 18 bands x 7 rows" in printed  # the S-curve of the dedup step is printed
    kept = {Path(r["source"]).name: r for r in read(str(out))}
    rejected = {Path(r["source"]).name: (r["rejected"]["stage"], r["rejected"]["reason"])
                for r in read(str(out / "_rejected"))}
    # Three copies of one article: an exact copy on another site and a reposted one with a few words
    # changed. The smallest id survives each dedup step, so which page is kept depends on ids only.
    breads = {"bread.html", "bread-syndicated.html", "bread-reposted.html"}
    assert len(breads & set(kept)) == 1
    assert set(kept) - breads == {"bicycles.html", "gardening.html"}
    assert sorted(rejected.pop(b) for b in breads - set(kept)) == [
        ("exact_dedup", "duplicate"), ("minhash_dedup", "near_duplicate")]
    assert rejected["casino.html"] == ("url_filter", "domain_blocklist")
    assert rejected["german.html"] == ("langid", "language")
    report = report_of(out)
    assert all(s["balanced"] for s in report["stages"])
    by = {s["stage"]: s for s in report["stages"]}
    assert by["langid"]["stats"] == {"lang/en": 6, "lang/de": 1}
    assert by["minhash_dedup"]["stats"] == {"clusters": 1, "rows_in_clusters": 2}


def test_curate_warc_samples_reconciles(shared_data, tmp_path, monkeypatch):
    """All 26 WARC/ARC samples, malformed ones included: every record ends somewhere."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "warc"
    cfg = yaml.safe_load(WEB_YAML.read_text())
    cfg["steps"]["extract"] = {"mode": "fast"}
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["curate", str(path), "--input", str(shared_data / "warc_samples"), "--output", str(out),
                 "--engine", "plain"]) == 0
    stages = report_of(out)["stages"]
    read_stage = stages[0]
    assert read_stage["dead_letter"] > 0 and read_stage["kept"] > 100  # the malformed files are dead letters
    written = sum(1 for _ in read(str(out))) + sum(1 for _ in read(str(out / "_rejected")))
    dead = sum(1 for _ in read(str(out / "_dead_letter"), fmt="jsonl"))
    assert written == read_stage["kept"] - sum(s["dead_letter"] for s in stages[1:])
    assert dead >= 1
