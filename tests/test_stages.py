"""The stage contract in a plain loop: every row lands in exactly one of kept / rejected / dead."""

from collections.abc import Iterator

from dataflywheel.filters.basic import ExactDedup, Length
from dataflywheel.stages import Filter, GlobalStep, Scorer, group_rows, process_batch, process_group


class Upper(Scorer):
    def score(self, rows):
        return [{**r, "text": r["text"].upper()} for r in rows]


class Fragile(Scorer, Filter):
    """Raises on rows marked bad, in score or in keep."""

    def score(self, rows):
        if any(r.get("bad") == "score" for r in rows):
            raise ValueError("cannot score")
        return [{**r, "scores": {"n": len(r["text"])}} for r in rows]

    def keep(self, row):
        if row.get("bad") == "keep":
            raise KeyError("boom")
        return (row["scores"]["n"] > 2, "short")


def rows(*texts, **extra):
    return [{"id": f"r{i}", "text": t, **extra} for i, t in enumerate(texts)]


def test_scorer_keeps_everything():
    out = process_batch(Upper(), rows("a", "b"))
    assert [r["text"] for r in out.kept] == ["A", "B"] and not out.rejected and not out.dead


def test_failing_row_is_isolated_as_dead_letter():
    batch = rows("long one", "xy") + [{"id": "bad1", "text": "zzzz", "bad": "score"}, {"id": "bad2", "text": "zzzz", "bad": "keep"}]
    out = process_batch(Fragile(), batch)
    assert [r["id"] for r in out.kept] == ["r0"]
    assert [(r["id"], r["rejected"]) for r in out.rejected] == [("r1", {"stage": "Fragile", "reason": "short"})]
    dead = {d["record"]["id"]: d for d in out.dead}
    assert set(dead) == {"bad1", "bad2"}
    assert dead["bad1"]["reason"] == "stage_error" and "ValueError: cannot score" in dead["bad1"]["detail"]
    assert dead["bad1"]["stage"] == "Fragile"
    assert out.rows_in == len(batch)


def test_single_row_batch_that_raises_is_dead_not_a_crash():
    out = process_batch(Fragile(), [{"id": "x", "text": "abc", "bad": "score"}])
    assert len(out.dead) == 1 and out.rows_in == 1


def test_length_scores_then_filters():
    stage = Length(min_words=2, max_words=3)
    out = process_batch(stage, rows("one", "one two", "one two three four"))
    assert [r["scores"]["n_words"] for r in out.kept] == [2]
    assert sorted(r["rejected"]["reason"] for r in out.rejected) == ["too_long", "too_short"]


def test_exact_dedup_keeps_smallest_id_per_normalized_text():
    stage = ExactDedup()
    data = [{"id": "b", "text": "Hello  World"}, {"id": "a", "text": "hello world"}, {"id": "c", "text": "other"}]
    groups, dead = group_rows(stage, data)
    assert len(groups) == 2 and not dead
    outs = [process_group(stage, g) for g in groups.values()]
    kept = sorted(r["id"] for o in outs for r in o.kept)
    rejected = [r for o in outs for r in o.rejected]
    assert kept == ["a", "c"]
    assert [(r["id"], r["meta"]["duplicate_of"], r["rejected"]["reason"]) for r in rejected] == [("b", "a", "duplicate")]


class Broken(GlobalStep):
    def key(self, row):
        if row["id"] == "nokey":
            raise ValueError("no key")
        return "k"

    def run(self, rows) -> Iterator:
        raise RuntimeError("global failure")


def test_global_step_failures_are_dead_letters():
    groups, dead = group_rows(Broken(), [{"id": "nokey", "text": "x"}, {"id": "a", "text": "y"}])
    assert [d["record"]["id"] for d in dead] == ["nokey"]
    out = process_group(Broken(), groups["k"])
    assert [d["record"]["id"] for d in out.dead] == ["a"] and out.rows_in == 1


def test_stage_config_rejects_unknown_keys():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Length(min_word=3)
