"""The pairs pipeline (``dataflywheel pairs``, pipelines/pairs.py): config expansion and errors, the
shipped configs/pairs.yaml end to end on the Beam runner with a tiny policy and a tiny reward model
trained here, the multi-pair explosion, and exactly-once under injected scorer failures."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from dataflywheel.cli import main
from dataflywheel.errors import UserError
from dataflywheel.io import read
from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.pipelines.pairs import explode_output, pairs_run_config
from dataflywheel.records import validate
from dataflywheel.stages import Scorer, StageConfig

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "dataflywheel" / "data" / "demo" / "arithmetic_prompts.jsonl"
PREFS = REPO / "dataflywheel" / "data" / "demo" / "prefs.jsonl"
GEN = {"backend": {"model": "m"}, "sampling": {"n": 2}}
BASE = {"input": {"paths": str(PROMPTS)}, "output": {"path": "out"}, "generate": GEN,
        "scorers": [{"stage": "verify", "verifier": "numeric_match"}]}


def jobs_of(data: dict) -> dict[str, list[dict]]:
    return {j.name: j.stages for j in pairs_run_config(data, "p.yaml").jobs}


def test_config_expands_to_sample_pairs_and_best_of_n_jobs():
    data = {**BASE, "round": 3, "best_of_n": {"min_score": 1.0}, "pair_quantile": {"quantile": 0.7},
            "scorers": [{"stage": "verify", "verifier": "numeric_match", "set_reward": False},
                        {"stage": "reward_model", "model": "rm"}]}
    run = pairs_run_config(data, "p.yaml")
    jobs = {j.name: j for j in run.jobs}
    assert list(jobs) == ["pairs-sample", "pairs-pairs", "pairs-best_of_n"]
    assert [s.stage for s in jobs["pairs-sample"].stages] == ["generate", "verify", "reward_model"]
    assert [s.stage for s in jobs["pairs-pairs"].stages] == ["pairs", "pair_quantile"]
    assert jobs["pairs-pairs"].stages[0].config.round == jobs["pairs-best_of_n"].stages[0].config.round == 3
    assert jobs["pairs-sample"].input.kind == "prompt" and jobs["pairs-sample"].output.format == "jsonl"
    assert jobs["pairs-pairs"].input.paths == [str(Path("out") / "scored")]
    assert jobs["pairs-best_of_n"].output.path == str(Path("out") / "sft")
    assert list(jobs_of({**BASE, "pairs": False, "best_of_n": {}})) == ["pairs-sample", "pairs-best_of_n"]


@pytest.mark.parametrize("change, message", [
    ({"generate": {**GEN, "sampling": {"n": 1}}}, r"sampling.n must be >= 2"),
    ({"pairs": False}, r"nothing to build"),
    ({"pairs": {"method": "rso"}, "pair_quantile": {}}, r"pair_quantile needs .* not rso"),
    ({"scorers": []}, r"scorers"),
    ({"scorers": [{"stage": "no_such_scorer"}]}, r"^p.yaml: scorers\[0\].stage: unknown stage"),
    ({"scorers": [{"stage": "verify", "verifier": "numeric_match", "colour": 1}]}, r"^p.yaml: scorers\[0\]\.colour"),
    ({"pairs": {"method": "best"}}, r"^p.yaml: pairs\.method"),
])
def test_config_errors_name_the_place(change, message):
    with pytest.raises(UserError, match=message):
        jobs_of({**BASE, **change})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    """A tiny policy and a tiny reward model trained for a few steps by the training stage."""
    from dataflywheel.train.rm import RmConfig, RmLoop, run

    tmp = tmp_path_factory.mktemp("models")
    rows = [json.loads(line) for line in PREFS.read_text().splitlines()]
    texts = [m["content"] for r in rows for k in ("prompt", "chosen", "rejected") for m in r[k]]
    base = build_tiny_causal_lm(tmp / "base", texts=texts, hidden=32, layers=2, heads=2, vocab_size=400)
    cfg = RmConfig(model=str(base), data=[str(PREFS)], output=str(tmp / "rm"), eval_fraction=0.0, max_length=128,
                   loop=RmLoop(lr=1e-3, batch_size=8, max_steps=4, warmup_ratio=0.0, progress=False))
    policy = build_tiny_causal_lm(tmp / "policy", hidden=32, layers=2, heads=2)
    return str(policy), run(cfg)["final"]


def prompts_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:n]))
    return path


def job_report(folder: Path) -> dict:
    return json.loads((folder / "_report.json").read_text())


def rows_of(folder: Path) -> list[dict]:
    return list(read(str(folder))) if folder.exists() and any(folder.glob("part-*")) else []


def ids(folder: Path) -> list[str]:
    return [r.get("id") or r.get("record", {}).get("id") for r in rows_of(folder)]


def reconciles(report: dict) -> tuple[int, int, int, int]:
    """(in, kept, rejected, dead) of a job report, checking in == kept + rejected + dead per stage and overall."""
    stages = report["stages"]
    for s in stages:
        assert s["rows_in"] == s["kept"] + s["rejected_total"] + s["dead_letter"], s
    rejected, dead = sum(s["rejected_total"] for s in stages), sum(s["dead_letter"] for s in stages)
    assert stages[0]["rows_in"] == stages[-1]["kept"] + rejected + dead
    return stages[0]["rows_in"], stages[-1]["kept"], rejected, dead


def test_shipped_config_end_to_end_on_beam(tmp_path, models, monkeypatch):
    policy, rm = models
    monkeypatch.setenv("PAIRS_POLICY", policy)
    monkeypatch.setenv("PAIRS_RM", rm)
    n_prompts = 12
    out = tmp_path / "run"
    assert main(["pairs", str(REPO / "configs" / "pairs.yaml"), "--input", str(prompts_file(tmp_path, n_prompts)),
                 "--output", str(out)]) == 0
    sample = job_report(out / "scored")
    n_in, kept, rejected, dead = reconciles(sample)
    assert n_in == n_prompts
    prompt_ids = set(ids(out / "scored")) | set(ids(out / "scored" / "_rejected")) | set(ids(out / "scored" / "_dead_letter"))
    assert len(prompt_ids) == n_prompts
    for name, kind in (("pairs", "preference"), ("sft", "conversation")):
        folder = out / name
        n_in, kept_out, rej_out, dead_out = reconciles(job_report(folder))
        assert n_in == kept  # every scored prompt reaches each builder
        got = ids(folder)
        assert len(got) == len(set(got)) == kept_out  # each prompt at most once per output
        assert sorted(got + ids(folder / "_rejected") + ids(folder / "_dead_letter")) == sorted(ids(out / "scored"))
        for row in rows_of(folder):
            validate(kind, row)
            meta = row["meta"]
            assert meta["round"] == 0 and meta["policy"] == policy and meta["prompt_id"] == row["id"]
            assert [s["name"] for s in meta["scorers"]] == ["verify", "reward_model"]
            assert meta["sampling"]["n"] == 4 and len(meta["candidates"]) == 4
            if kind == "preference":
                chosen = meta["candidates"][meta["chosen_index"]]
                assert row["scores"]["reward_chosen"] == pytest.approx(chosen["scores"]["reward_model"])
                assert row["scores"]["margin"] > 0
            else:  # best_of_n on the verifier at 1.0: a correct answer only
                assert row["scores"]["verifier"] == 1.0
    # the reward model, not the verifier, sets reward: its scores differ sample to sample, so pairs exist
    assert job_report(out / "pairs")["stages"][-1]["kept"] > 0
    assert [p.suffix for p in (out / "pairs").glob("part-*")] == [".parquet"]


# -- exactly-once under injected failures --------------------------------------------------------


def _draw(seed: int, key: str) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 16**8


class FlakyConfig(StageConfig):
    seed: int = 0
    flaky: float = 0.3  # share of prompts whose first scoring attempt fails its whole batch
    broken: float = 0.1  # share of prompts that always fail: dead letters
    batch_size: int = 3


class FlakyScorerForTests(Scorer):
    """Passes rows through, raising on a seeded share of first attempts (the batch fails and the stage
    wrapper retries row by row) and on a seeded share of rows every time (dead letters)."""

    Config = FlakyConfig

    def __init__(self, config: FlakyConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.seen: set[str] = set()

    def score(self, rows: list[dict]) -> list[dict]:
        c = self.config
        first = {str(r["id"]) for r in rows if _draw(c.seed, str(r["id"])) < c.flaky} - self.seen
        self.seen |= first  # this attempt is every row's first: the retry of each one passes
        if first:
            raise RuntimeError(f"injected: first attempt at {sorted(first)}")
        for row in rows:
            if _draw(c.seed + 1, str(row["id"])) < c.broken:
                raise RuntimeError(f"injected: {row['id']} always fails")
        # a deterministic pseudo-reward per sample, so the builders have something to rank
        return [{**r, "flaky_passed": True, "completions": [
            {**x, "scores": {**(x.get("scores") or {}), "reward": _draw(c.seed, f"{r['id']}/{x['index']}")}}
            for x in r["completions"]]} for r in rows]


def test_exactly_once_with_injected_failures_and_exploded_pairs(tmp_path, models):
    policy, _ = models
    n_prompts = 16
    out = tmp_path / "run"
    data = {"name": "flaky", "round": 2, "input": {"paths": str(prompts_file(tmp_path, n_prompts))},
            "output": {"path": str(out), "format": "jsonl", "rows_per_shard": 5},
            "generate": {"backend": {"model": policy, "options": {"device": "cpu"}, "cache": str(tmp_path / "c.sqlite")},
                         "sampling": {"n": 3, "max_tokens": 4, "seed": 1}, "reject_overlong": False, "batch_size": 5},
            "scorers": [{"stage": f"{__name__}:FlakyScorerForTests", "seed": 7},
                        {"stage": "verify", "verifier": "numeric_match", "set_reward": False},
                        {"stage": f"{__name__}:FlakyScorerForTests", "name": "flaky_late", "seed": 11, "flaky": 0.5}],
            "pairs": {"method": "all_pairs", "near_identical": None, "max_length_ratio": None},
            "best_of_n": {"field": "verifier"}}
    cfg = tmp_path / "pairs.yaml"
    cfg.write_text(json.dumps(data))  # JSON is YAML
    for attempt in range(2):  # the second run replays the whole job over the same output: nothing doubles
        assert main(["pairs", str(cfg)]) == 0
        sample = job_report(out / "scored")
        n_in, kept, rejected, dead = reconciles(sample)
        by = {s["stage"]: s for s in sample["stages"]}
        assert by["generate"]["stats"].get("cache_hits", 0) == (3 * n_prompts if attempt else 0)  # replay: cached
        assert n_in == n_prompts and dead == by["FlakyScorerForTests"]["dead_letter"] + by["flaky_late"]["dead_letter"] > 0
        scored, dead_ids = ids(out / "scored"), ids(out / "scored" / "_dead_letter")
        rejected_ids = ids(out / "scored" / "_rejected")
        # every prompt exactly once across output, rejected and dead letters
        assert sorted(scored + rejected_ids + dead_ids) == sorted(json.loads(line)["id"] for line in
                                                                  prompts_file(tmp_path, n_prompts).read_text().splitlines())
        broken = {i for i in scored + rejected_ids + dead_ids if _draw(8, i) < 0.1 or _draw(12, i) < 0.1}
        assert broken and broken <= set(dead_ids)  # the always-failing rows died, alone, not their batches
        # a transient failure is retried row by row, except in a one-row batch: it has no retry
        assert all("injected" in r["detail"] for r in rows_of(out / "scored" / "_dead_letter"))
        assert len(dead_ids) < len(broken) + 3
        assert all(r["flaky_passed"] for r in rows_of(out / "scored"))
        # all_pairs: one row per prompt in the job, exploded after it; the counts reconcile
        n_in, built, rej, dead_p = reconciles(job_report(out / "pairs"))
        assert n_in == kept
        success = json.loads((out / "pairs" / "_SUCCESS.json").read_text())
        pairs_built = job_report(out / "pairs")["stages"][-1]["stats"].get("pairs_built", 0)
        assert success["exploded"] == {"rows_in": built, "pairs_out": pairs_built} and success["rows"] == pairs_built
        rows = rows_of(out / "pairs")
        assert len(rows) == pairs_built and not any("pairs" in r for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)  # pair ids: <prompt>/<chosen>><rejected>
        per_prompt = Counter(r["meta"]["prompt_id"] for r in rows)
        assert set(per_prompt) | set(ids(out / "pairs" / "_rejected")) <= set(scored)
        for r in rows:
            validate("preference", r)
            assert r["meta"]["round"] == 2 and r["meta"]["method"] == "all_pairs"
        sft = ids(out / "sft")
        assert len(sft) == len(set(sft)) and len(sft) + len(ids(out / "sft" / "_rejected")) == kept
    assert explode_output(str(out / "pairs"), "jsonl", 5) == success  # idempotent: already exploded
