"""The cross-round best-sample pool: 3 rounds, ties keep the older round, idempotent re-application,
out-of-order rounds, both input forms (best_of_n rows and scored prompt rows), persistence."""

from __future__ import annotations

from dataflywheel.records import validate
from dataflywheel.stages import process_batch
from dataflywheel.synth.best_pool import BestPool
from dataflywheel.synth.pairs import BestOfN


def scored_row(pid: str, rewards: list, round_: int) -> dict:
    comps = [{"index": i, "text": f"{pid} answer r{round_} s{i}", "tokens": 5, "rejected": None,
              "scores": {"reward": r}} for i, r in enumerate(rewards)]
    return {"id": pid, "prompt": [{"role": "user", "content": f"question {pid}"}], "completions": comps,
            "meta": {"round": round_, "generation": {"model": f"policy-r{round_}", "sampling": {"n": len(rewards)}}}}


ROUNDS = {  # prompt -> per-round rewards of its samples
    1: {"a": [0.5, 0.1], "b": [1.0, 2.0], "c": [None, None], "d": [0.3]},
    2: {"a": [0.9, 0.2], "b": [2.0, 0.0], "c": [0.4, 0.7]},
    3: {"a": [0.1, 0.8], "b": [1.5, 1.9], "c": [0.7, 0.2], "e": [0.0]},
}


def best_of_n_rows(round_: int) -> list[dict]:
    """Round rows through the real best_of_n stage (what a pipeline would pool)."""
    out = process_batch(BestOfN(), [scored_row(p, r, round_) for p, r in ROUNDS[round_].items()])
    return out.kept + [r for r in out.rejected]  # rejected rows have no reward: counted, not pooled


def test_pool_across_three_rounds(tmp_path):
    path = tmp_path / "pool.sqlite"
    with BestPool(path) as pool:
        c1 = pool.update(best_of_n_rows(1), 1)
        assert c1 == {"rows": 4, "inserted": 3, "replaced": 0, "kept": 0, "no_reward": 1}
        c2 = pool.update(best_of_n_rows(2), 2)
        # a: 0.9 > 0.5 replaced; b: 2.0 == 2.0 keeps round 1 (older); c: new.
        assert c2 == {"rows": 3, "inserted": 1, "replaced": 1, "kept": 1, "no_reward": 0}
        c3 = pool.update(best_of_n_rows(3), 3)
        # a: 0.8 < 0.9 kept; b: 1.9 < 2.0 kept; c: 0.7 == 0.7 keeps round 2; e: new.
        assert c3 == {"rows": 4, "inserted": 1, "replaced": 0, "kept": 3, "no_reward": 0}
        rows = pool.export()
    got = {r["id"]: (r["meta"]["round"], r["meta"]["chosen_index"], r["scores"]["reward"]) for r in rows}
    assert got == {"a": (2, 0, 0.9), "b": (1, 1, 2.0), "c": (2, 1, 0.7), "d": (1, 0, 0.3), "e": (3, 0, 0.0)}
    for r in rows:
        validate("conversation", r)
        assert r["messages"][-1]["content"].endswith(f"r{r['meta']['round']} s{r['meta']['chosen_index']}")
        assert r["meta"]["policy"] == f"policy-r{r['meta']['round']}"  # provenance of the producing round
    with BestPool(path) as again:  # persisted: a new handle sees the same pool
        assert again.export() == rows and again.rounds() == {1: 2, 2: 2, 3: 1}


def test_pool_is_idempotent_and_order_independent(tmp_path):
    with BestPool(tmp_path / "a.sqlite") as pool:
        for rnd in (1, 2, 3):
            pool.update(best_of_n_rows(rnd), rnd)
        first = pool.export()
        for rnd in (3, 1, 2):  # re-applying any round changes nothing
            counts = pool.update(best_of_n_rows(rnd), rnd)
            assert counts["inserted"] == counts["replaced"] == 0
        assert pool.export() == first
    with BestPool(tmp_path / "b.sqlite") as other:  # rounds arriving out of order: same pool
        for rnd in (3, 2, 1):
            other.update(best_of_n_rows(rnd), rnd)
        assert other.export() == first


def test_pool_takes_scored_prompt_rows_directly(tmp_path):
    with BestPool(tmp_path / "p.sqlite") as pool:
        counts = pool.update([scored_row(p, r, 1) for p, r in ROUNDS[1].items()], 1)
        assert counts == {"rows": 4, "inserted": 3, "replaced": 0, "kept": 0, "no_reward": 1}
        # Duplicated prompt ids within one update: the best sample wins, equal rewards the lower index.
        pool.update([scored_row("z", [0.2, 0.6], 2), scored_row("z", [0.6, 0.1], 2)], 2)
        z = next(r for r in pool.export() if r["id"] == "z")
    assert (z["scores"]["reward"], z["meta"]["chosen_index"]) == (0.6, 0)
