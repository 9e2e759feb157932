"""The SFT selection pipeline (``dataflywheel select``): step order, select recipes, config errors,
and the command end to end on the demo pool with a tiny model, re-run with another budget to show
that scores and embeddings are reused, not recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dataflywheel.cli import main
from dataflywheel.errors import UserError
from dataflywheel.io import read
from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.pipelines.sft import SFT_STEPS, SelectConfig, load_sft_config, select_stages, sft_run_config

REPO = Path(__file__).resolve().parent.parent
POOL = REPO / "dataflywheel" / "data" / "demo" / "sft_pool.jsonl"
BASE = {"input": {"paths": str(POOL)}, "output": {"path": "out"}}


def stages_of(data: dict) -> list[dict]:
    return sft_run_config(data, "sel.yaml").jobs[0].stages


def test_default_steps_and_order():
    assert [s.stage for s in stages_of(BASE)] == ["exact_dedup", "minhash_dedup"]
    data = {**BASE, "steps": {"ifd": {"model": "m"}, "deita_score": {"model": "m"}, "exact_dedup": False},
            "select": {"method": "top", "field": "ifd", "fraction": 0.1}}
    names = [s.stage for s in stages_of(data)]
    order = [cls.stage_name for cls in SFT_STEPS.values()]
    assert names[:-1] == [n for n in order if n in names]  # the steps keep the fixed order
    assert names == ["minhash_dedup", "ifd", "deita_score", "select_top"]
    assert sft_run_config(BASE, "x").jobs[0].input.kind == "conversation"  # SFT pools are conversations


@pytest.mark.parametrize("method, expected", [
    ("top", [("select_top", {"field": "ifd", "budget": 7})]),
    ("deita", [("diversity", {"method": "repr_filter", "order_by": "deita_score", "budget": 7})]),
    ("instag", [("instag_sample", {"budget": 7})]),
    ("kcenter", [("diversity", {"method": "kcenter", "budget": 7})]),
    ("superfiltering_d", [("score_band", {"field": "ifd", "min_value": 0.9, "max_value": 1.0}),
                          ("select_top", {"field": "ifd", "fraction": 0.2}),
                          ("diversity", {"method": "facility_location", "budget": 7})]),
])
def test_select_recipes_expand_to_stages(method, expected):
    sel = SelectConfig(method=method, budget=7, **({"field": "ifd"} if method == "top" else {}))
    got = [(s.stage, s.config.model_dump(exclude_unset=True, exclude={"name"})) for s in select_stages(sel)]
    assert got == expected


def test_config_errors_name_the_place():
    with pytest.raises(UserError, match=r"^sel.yaml: select: .*method top needs field"):
        stages_of({**BASE, "select": {"method": "top", "budget": 3}})
    with pytest.raises(UserError, match=r"exactly one of budget or fraction"):
        stages_of({**BASE, "select": {"method": "kcenter", "budget": 3, "fraction": 0.5}})
    with pytest.raises(UserError, match=r"^sel.yaml: select\.options\.colour: "):
        stages_of({**BASE, "select": {"method": "kcenter", "budget": 3, "options": {"colour": 1}}})
    with pytest.raises(UserError, match=r"^sel.yaml: steps\.ifd\.model: "):
        stages_of({**BASE, "steps": {"ifd": {}}})
    with pytest.raises(UserError, match=r"^sel.yaml: mixture\.strategy: "):
        stages_of({**BASE, "mixture": {"group_by": "source", "budget": 5, "strategy": "random"}})


def test_shipped_config_loads(monkeypatch):
    monkeypatch.setenv("SELECT_MODEL", "gpt2")
    names = [s.stage for s in load_sft_config(REPO / "configs" / "sft_select.yaml").jobs[0].stages]
    assert names == ["exact_dedup", "minhash_dedup", "ifd", "score_band", "select_top", "diversity"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("lm"), max_positions=512))


def report_of(out: Path) -> dict:
    by = {}
    for stage in json.loads((out / "_report.json").read_text())["stages"]:
        assert stage["balanced"], stage
        by[stage["stage"]] = stage
    return by


def test_select_end_to_end_then_rerun_reuses_scores(tiny_model, tmp_path, monkeypatch):
    """IFD and Deita with a tiny model, Deita's repr filter on MiniLM, a mixture by source; a second
    run with a smaller budget makes no forward pass and embeds nothing."""
    cache = str(tmp_path / "scores.sqlite")
    cfg = {"name": "sel", "runner": {"engine": "local"}, "input": {"paths": str(POOL)},
           "output": {"path": str(tmp_path / "a"), "format": "jsonl"},
           "steps": {"ifd": {"model": tiny_model, "max_ifd": None, "cache": cache, "device": "cpu"},
                     "deita_score": {"model": tiny_model, "cache": cache, "device": "cpu"}},
           "select": {"method": "deita", "budget": 12, "options": {"cache": cache}},
           "mixture": {"group_by": "source", "strategy": "weights", "budget": 9,
                       "weights": {"code": 1, "math": 1, "general": 1}}}
    path = tmp_path / "sel.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["select", str(path)]) == 0
    kept = list(read(str(tmp_path / "a")))
    first = report_of(tmp_path / "a")
    assert len(kept) == 9 and first["mixture"]["kept"] == 9
    assert all({"ifd", "ifd_ppl_ratio", "deita_score", "diversity_rank"} <= set(r["scores"]) for r in kept)
    assert sorted(r["source"] for r in kept) == ["code"] * 3 + ["general"] * 3 + ["math"] * 3
    # Deita's repr filter: of each pair of paraphrases (MiniLM cosine 0.95-0.99), at most one survives
    ids = {r["id"] for r in kept}
    for pair in ({"pool-001", "pool-002"}, {"pool-005", "pool-006"}, {"pool-018", "pool-019"}):
        assert len(pair & ids) <= 1
    assert first["ifd"]["stats"]["pairs_scored"] > 0 and first["diversity"]["stats"]["embedded"] > 0
    # The same pool with another budget: everything comes from the cache.
    cfg["select"]["budget"], cfg["output"]["path"] = 8, str(tmp_path / "b")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["select", str(path)]) == 0
    second = report_of(tmp_path / "b")
    assert second["ifd"]["stats"].get("pairs_scored", 0) == 0 and second["ifd"]["stats"]["cache_hits"] > 0
    assert second["deita_score"]["stats"].get("prompts_scored", 0) == 0
    assert second["diversity"]["stats"]["embedded"] == 0 and second["diversity"]["kept"] == 8
    by_id = {r["id"]: r["scores"]["ifd"] for r in kept}
    again = {r["id"]: r["scores"]["ifd"] for r in read(str(tmp_path / "b"))}
    assert all(again[i] == by_id[i] for i in again.keys() & by_id.keys())  # cached scores are the same numbers
