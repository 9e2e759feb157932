"""The sqlite generation cache (synth/cache.py): round trips, first-writer-wins, many concurrent
writers (processes and threads) on a fresh file, and a re-run through a real backend (a tiny
local model) that generates nothing."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading

import pytest

from dataflywheel.synth.backends.base import Request, Sample, Sampling
from dataflywheel.synth.cache import GenerationCache

WRITERS, THREADS, KEYS_EACH, STRIDE, BATCH = 4, 2, 300, 150, 7  # writer w writes keys [w*150, w*150 + 300)


def sample_for(i: int) -> Sample:
    return Sample(text=f"text {i} ✓", finish_reason="stop", tokens=i % 13, logprobs=[-0.5, -float(i)], seed=i,
                  token_ids=[i, 2])


def write_keys(cache: GenerationCache, writer: int) -> int:
    """One writer process: two threads put overlapping keys in small transactions and read back."""
    errors: list[BaseException] = []

    def work(part: int) -> None:
        try:
            keys = list(range(writer * STRIDE, writer * STRIDE + KEYS_EACH))[part::THREADS]
            for at in range(0, len(keys), BATCH):
                chunk = keys[at:at + BATCH]
                cache.put_many([(f"k{i}", sample_for(i)) for i in chunk])
                got = cache.get_many([f"k{i}" for i in chunk])
                assert set(got) == {f"k{i}" for i in chunk}
        except BaseException as err:  # reported to the parent, which fails the test
            errors.append(err)

    threads = [threading.Thread(target=work, args=(p,)) for p in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return os.getpid()


def test_round_trip_first_writer_wins_and_stats(tmp_path):
    cache = GenerationCache(tmp_path / "sub" / "gen.sqlite")
    assert cache.get_many(["nope"]) == {} and cache.stats()["rows"] == 0
    cache.put_many([("a", sample_for(1)), ("b", sample_for(2))])
    cache.put_many([("a", Sample(text="later", finish_reason="stop")), ("c", sample_for(3))])
    got = cache.get_many(["a", "b", "c", "a", "zz"])
    assert got == {"a": sample_for(1), "b": sample_for(2), "c": sample_for(3)}
    assert got["a"].cached is False  # the base class marks hits; the store does not
    cache.put_many([("e", Sample(text="", finish_reason="error", error="boom")), ("", sample_for(4))])
    assert "e" not in cache.get_many(["e"])
    stats = cache.stats()
    assert stats["rows"] == 3 and stats["bytes"] > 0
    many = [(f"m{i}", sample_for(i)) for i in range(1200)]  # more keys than one SELECT takes
    cache.put_many(many)
    assert len(cache.get_many([k for k, _ in many])) == 1200
    clone = pickle.loads(pickle.dumps(cache))  # pickles as its path, opens its own connection
    assert clone.get_many(["a"]) == {"a": sample_for(1)} and clone.stats()["rows"] == 1203
    cache.close()
    assert cache.get_many(["b"]) == {"b": sample_for(2)}  # reopens on use


def test_entries_written_before_token_ids_existed_still_load(tmp_path):
    cache = GenerationCache(tmp_path / "gen.sqlite")
    old = '{"text":"hi","finish_reason":"stop","tokens":2,"logprobs":null,"seed":7,"error":null}'
    cache.store.put_many([("old", old)])  # the JSON an earlier version stored: no token_ids key
    cache.put_many([("new", sample_for(5))])
    got = cache.get_many(["old", "new"])
    assert got["old"] == Sample(text="hi", finish_reason="stop", tokens=2, seed=7) and got["old"].token_ids is None
    assert got["new"].token_ids == [5, 2]


def test_concurrent_writers_lose_nothing_and_never_fail(tmp_path):
    cache = GenerationCache(tmp_path / "gen.sqlite")  # fresh file: the writers also race to create it
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(WRITERS) as pool:
        pids = pool.starmap(write_keys, [(cache, w) for w in range(WRITERS)])
    assert len(set(pids)) == WRITERS
    total = (WRITERS - 1) * STRIDE + KEYS_EACH
    got = cache.get_many([f"k{i}" for i in range(total + 10)])
    assert len(got) == total and cache.stats()["rows"] == total
    assert all(got[f"k{i}"] == sample_for(i) for i in range(total))


def test_rerun_through_a_backend_generates_nothing(tmp_path):
    pytest.importorskip("torch")
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm
    from dataflywheel.synth.backends.transformers import TransformersBackend

    folder = build_tiny_causal_lm(tmp_path / "lm", max_positions=64)
    path = tmp_path / "gen.sqlite"
    seeded = Sampling(n=3, temperature=0.9, max_tokens=6, seed=11, logprobs=True)
    requests = [Request("a", prompt="Hi", sampling=seeded),
                Request("b", messages=({"role": "user", "content": "Count to ten."},), sampling=seeded),
                Request("g", prompt="Water", sampling=Sampling(temperature=0, max_tokens=5, seed=0))]
    first = TransformersBackend(folder, cache=GenerationCache(path))
    made = first.generate(requests)
    assert first.counts["cache_misses"] == 7 and first.counts["tokens"] > 0
    assert GenerationCache(path).stats()["rows"] == 7
    # a new process would build a new backend and cache object: here, a fresh pair
    again = TransformersBackend(folder, cache=pickle.loads(pickle.dumps(GenerationCache(path))))
    replay = again.generate(requests)
    assert again.counts["cache_hits"] == 7 and again.counts["cache_misses"] == 0 and again.counts["tokens"] == 0
    assert all(s.cached for r in replay for s in r.samples)
    assert [[(s.text, s.tokens, s.seed, s.logprobs, s.token_ids) for s in r.samples] for r in replay] == [
        [(s.text, s.tokens, s.seed, s.logprobs, s.token_ids) for s in r.samples] for r in made]
    assert all(s.token_ids for r in replay for s in r.samples)
    # unseeded samples and failed samples are never stored: they are made again every time
    extra = [Request("u", prompt="Hi", sampling=Sampling(n=2, max_tokens=4)),
             Request("e", prompt="", sampling=Sampling(max_tokens=4, seed=3))]
    for _ in range(2):
        out = again.generate(extra)
        assert [s.cached for r in out for s in r.samples] == [False, False, False]
    assert out[1].samples[0].finish_reason == "error"
    assert again.counts["cache_misses"] == 6 and GenerationCache(path).stats()["rows"] == 7
