"""The base-class logic of every backend (backends/base.py): unit expansion with per-sample seeds,
cache keys, the cache lookup and store, re-assembly in request order, and the counts. The backend
here is a deterministic test double, ``EchoTestBackend``; a dict stands in for the sqlite cache."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dataflywheel.synth.backends.base import Backend, Request, Sample, Sampling, cache_key, sample_seed, units


class EchoTestBackend(Backend):
    """Test double: sample text = prompt|index|seed; fails the prompts in ``fail``; records each call."""

    name = "echo-test"

    def __init__(self, *args, fail: tuple[str, ...] = (), short_by: int = 0, **kw):
        super().__init__(*args, **kw)
        self.calls: list[list[tuple[str, int]]] = []
        self.fail, self.short_by = fail, short_by

    def _complete(self, todo):
        self.calls.append([(u.request.id, u.index) for u in todo])
        out = []
        for u in todo:
            text = u.request.prompt or u.request.messages[-1]["content"]
            if text in self.fail:
                out.append(Sample(text="", finish_reason="error", error="asked to fail"))
            else:
                out.append(Sample(text=f"{text}|{u.index}|{u.seed}", finish_reason="stop", tokens=len(text)))
        return out[: len(out) - self.short_by]


class DictTestCache:
    def __init__(self):
        self.store: dict[str, Sample] = {}

    def get_many(self, keys):
        return {k: self.store[k] for k in keys if k in self.store}

    def put_many(self, items):
        for k, s in items:
            self.store.setdefault(k, s)


def req(rid: str, prompt: str, **sampling) -> Request:
    return Request(rid, prompt=prompt, sampling=Sampling(**sampling))


def test_request_needs_exactly_one_of_messages_or_prompt():
    with pytest.raises(ValueError):
        Request("x")
    with pytest.raises(ValueError):
        Request("x", messages=[{"role": "user", "content": "a"}], prompt="a")
    r = Request("x", messages=[{"role": "user", "content": "a"}])
    assert isinstance(r.messages, tuple)
    with pytest.raises(ValidationError):
        Sampling(bogus=1)
    with pytest.raises(ValidationError):
        Sampling(n=0)


def test_sample_seeds_are_distinct_stable_and_31_bit():
    seeds = [sample_seed(42, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert seeds == [sample_seed(42, i) for i in range(1000)]
    assert sample_seed(43, 0) != seeds[0] and sample_seed(None, 3) is None


def test_cache_key_covers_what_makes_a_sample_and_nothing_else():
    base = units([req("a", "p", n=2, seed=1)])
    k0, k1 = (cache_key("m", "r", u) for u in base)
    assert k0 != k1  # index (and seed) differ
    assert cache_key("m", "r", units([req("other-id", "p", n=4, seed=1)])[0]) == k0  # id and n are not content
    assert cache_key("m2", "r", base[0]) != k0 and cache_key("m", "r2", base[0]) != k0
    for change in ({"seed": 2}, {"temperature": 0.5}, {"top_p": 0.5}, {"top_k": 3}, {"max_tokens": 7},
                   {"stop": ("x",)}, {"logprobs": True}, {"presence_penalty": 1.0}):
        assert cache_key("m", "r", units([req("a", "p", **{"n": 2, "seed": 1, **change})])[0]) != k0, change
    assert cache_key("m", "r", units([req("a", "q", seed=1)])[0]) != k0
    chat = Request("a", messages=[{"role": "user", "content": "p"}], sampling=Sampling(seed=1))
    assert cache_key("m", "r", units([chat])[0]) != k0
    assert cache_key("m", "r", units([req("a", "p")])[0]) is None  # unseeded: never cached


def test_results_in_request_order_with_per_sample_seeds():
    backend = EchoTestBackend("m")
    requests = [req("b", "beta", n=3, seed=5), req("a", "alpha", seed=5), req("c", "gamma", n=2)]
    results = backend.generate(requests)
    assert [r.request_id for r in results] == ["b", "a", "c"]
    assert [s.text for s in results[0].samples] == [f"beta|{i}|{sample_seed(5, i)}" for i in range(3)]
    assert results[1].samples[0].seed == sample_seed(5, 0)
    assert [s.seed for s in results[2].samples] == [None, None]
    assert results[0].model == "m" and results[0].backend == "echo-test"
    assert results[0].sampling == requests[0].sampling.model_dump() and results[0].sampling["n"] == 3
    assert backend.counts == {"samples": 6, "cache_misses": 6, "cache_hits": 0, "tokens": 3 * 4 + 5 + 2 * 5,
                              "errors": 0}
    assert results[0].to_dict()["samples"][0]["finish_reason"] == "stop"


def test_cache_hits_top_ups_and_what_is_never_cached():
    cache = DictTestCache()
    backend = EchoTestBackend("m", cache=cache, fail=("bad",))
    first = backend.generate([req("a", "alpha", n=2, seed=1), req("u", "free", n=2), req("x", "bad", seed=1)])
    assert len(cache.store) == 2  # the two seeded good samples: not the unseeded ones, not the error
    assert backend.counts["errors"] == 1 and first[2].samples[0].error == "asked to fail"
    # a larger n reuses samples 0 and 1 and makes only 2 and 3; unseeded and failed samples are remade
    backend.calls.clear()
    second = backend.generate([req("a", "alpha", n=4, seed=1), req("u", "free", n=2), req("x", "bad", seed=1)])
    assert backend.calls == [[("a", 2), ("a", 3), ("u", 0), ("u", 1), ("x", 0)]]
    assert [s.cached for s in second[0].samples] == [True, True, False, False]
    assert [s.text for s in second[0].samples[:2]] == [s.text for s in first[0].samples]
    assert second[0].samples[0].seed == sample_seed(1, 0)
    assert backend.counts["cache_hits"] == 2 and backend.counts["cache_misses"] == 5 + 5
    # everything seeded and good is now cached: a third run never calls the model
    backend.calls.clear()
    before = dict(backend.counts)
    backend.generate([req("a", "alpha", n=4, seed=1)])
    assert backend.calls == [] and backend.counts["tokens"] == before["tokens"]
    assert backend.counts["cache_hits"] == before["cache_hits"] + 4


def test_a_backend_returning_the_wrong_number_of_samples_is_an_error():
    with pytest.raises(RuntimeError, match="returned 1 samples for 2 units"):
        EchoTestBackend("m", short_by=1).generate([req("a", "alpha", n=2, seed=1)])


def test_no_requests_no_call():
    backend = EchoTestBackend("m", cache=DictTestCache())
    assert backend.generate([]) == [] and backend.calls == []
