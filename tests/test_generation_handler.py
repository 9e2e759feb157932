"""The generation RunInference handler: the real ``RunInference`` transform on the FnApiRunner with
the in-process transformers backend on a tiny Llama built here, and the sqlite generation cache; the
results must equal calling the backend directly, and a re-run must generate nothing."""

from __future__ import annotations

import hashlib

import pytest

from dataflywheel.pipelines.generation_handler import BackendSpec, GenerationHandler  # noqa: E402
from dataflywheel.synth.backends.base import Backend, Request, Sample, Sampling, Unit  # noqa: E402

CHAT = ({"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"})
REQUESTS = [
    Request("chat", messages=CHAT, sampling=Sampling(n=3, seed=7, temperature=0.9, max_tokens=8, logprobs=True)),
    Request("plain", prompt="The train left the station at", sampling=Sampling(n=2, seed=1, max_tokens=6)),
    Request("greedy", prompt="Count to ten:", sampling=Sampling(temperature=0, max_tokens=5, seed=0)),
    Request("short", messages=CHAT[1:], sampling=Sampling(seed=3, top_k=20, max_tokens=4)),
    Request("stop", prompt="Water boils at", sampling=Sampling(n=2, seed=9, max_tokens=10, stop=("e",))),
]
N_SAMPLES = sum(r.sampling.n for r in REQUESTS)


class EchoBackend(Backend):
    """A small deterministic backend for the handler's own logic: its text is a hash of the prompt and
    the seed; a prompt containing FAIL fails."""

    name = "echo"

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        out = []
        for u in todo:
            text = u.request.prompt or u.request.messages[-1]["content"]
            if "FAIL" in text:
                out.append(Sample("", "error", error="asked to fail"))
                continue
            words = hashlib.sha256(f"{text}|{u.seed}".encode()).hexdigest()[:12]
            out.append(Sample(f"{words} ({self.model})", "stop", tokens=3))
        return out


class SharedEcho(EchoBackend):
    share_across_processes = True


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("gen_handler_llama"), max_positions=128))


def run_pipeline(handler, requests, check, namespace="dfw/generate"):
    """Run ``RunInference(handler)`` over ``requests`` on the FnApiRunner; return our stat counters."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that

    from dataflywheel.runner import RunnerConfig, make_pipeline

    p = make_pipeline(RunnerConfig(engine="local"))
    results = p | beam.Create(requests) | RunInference(handler)
    assert_that(results, check)
    outcome = p.run()
    outcome.wait_until_finish()
    counters = outcome.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]
    return outcome, {c.key.metric.name: c.committed for c in counters if c.key.metric.name.startswith("stat/")}


def same_as(expected: dict, cached: bool):
    def check(results):
        got = {r.request_id: r for r in results}
        assert set(got) == set(expected)
        for rid, r in got.items():
            want = expected[rid]
            assert [s.text for s in r.samples] == [s.text for s in want.samples], rid
            assert [s.seed for s in r.samples] == [s.seed for s in want.samples], rid
            assert [s.finish_reason for s in r.samples] == [s.finish_reason for s in want.samples], rid
            assert [s.tokens for s in r.samples] == [s.tokens for s in want.samples], rid
            assert [s.logprobs is None for s in r.samples] == [s.logprobs is None for s in want.samples], rid
            assert all(s.cached == cached for s in r.samples), rid
            assert (r.model, r.backend, r.sampling) == (want.model, want.backend, want.sampling), rid
    return check


def test_run_inference_with_transformers_equals_the_direct_call_and_reruns_from_cache(tiny, tmp_path):
    from dataflywheel.pipelines.stage_transform import reports_from_beam
    from dataflywheel.synth.backends.transformers import TransformersBackend
    from dataflywheel.synth.cache import GenerationCache

    direct = {r.request_id: r for r in TransformersBackend(tiny).generate(REQUESTS)}
    tokens = sum(s.tokens for r in direct.values() for s in r.samples)
    spec = BackendSpec(TransformersBackend, tiny, {"device": "cpu", "batch_size": 4},
                       cache=GenerationCache(tmp_path / "gen.sqlite"))
    handler = GenerationHandler(spec, min_batch_size=2, max_batch_size=3)
    assert handler.share_model_across_processes() is False  # transformers: one model per process
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 3}

    outcome, stats = run_pipeline(handler, REQUESTS, same_as(direct, cached=False))
    assert stats == {"stat/cache_misses": N_SAMPLES, "stat/samples": N_SAMPLES, "stat/tokens": tokens}
    [report] = reports_from_beam(outcome, ["generate"])  # the run report reads the same counters
    assert report.stats == {"cache_misses": N_SAMPLES, "samples": N_SAMPLES, "tokens": tokens}

    _, stats = run_pipeline(handler, REQUESTS, same_as(direct, cached=True))  # the re-run generates nothing
    assert stats == {"stat/cache_hits": N_SAMPLES, "stat/samples": N_SAMPLES}


def test_one_backend_per_machine_behind_beams_process_proxy(tiny):
    """large_model: Beam holds the backend in a separate process and run_inference reaches it by RPC."""
    from dataflywheel.synth.backends.transformers import TransformersBackend

    direct = {r.request_id: r for r in TransformersBackend(tiny).generate(REQUESTS[:3])}
    handler = GenerationHandler(BackendSpec(TransformersBackend, tiny, {"device": "cpu"}), large_model=True,
                                metrics_namespace="dfw/gen_shared")
    assert handler.share_model_across_processes() is True
    _, stats = run_pipeline(handler, REQUESTS[:3], same_as(direct, cached=False), namespace="dfw/gen_shared")
    n = sum(r.sampling.n for r in REQUESTS[:3])
    assert stats["stat/samples"] == n and stats["stat/cache_misses"] == n


def test_failed_samples_come_back_as_results_and_are_counted():
    reqs = [Request("ok", prompt="hello", sampling=Sampling(n=2, seed=1)),
            Request("bad", prompt="please FAIL", sampling=Sampling(seed=1)),
            Request("ok2", messages=CHAT, sampling=Sampling(seed=2))]
    direct = {r.request_id: r for r in EchoBackend("echo-1").generate(reqs)}
    _, stats = run_pipeline(GenerationHandler(BackendSpec(EchoBackend, "echo-1")), reqs, same_as(direct, cached=False))
    assert stats == {"stat/cache_misses": 4, "stat/samples": 4, "stat/tokens": 9, "stat/errors": 1}


def test_handler_settings():
    spec = BackendSpec(EchoBackend, "echo-1")
    handler = GenerationHandler(spec, max_batch_size=8)
    assert handler.share_model_across_processes() is False
    assert GenerationHandler(BackendSpec(SharedEcho, "m")).share_model_across_processes() is True  # follows the class
    assert GenerationHandler(BackendSpec(SharedEcho, "m"), large_model=False).share_model_across_processes() is False
    assert GenerationHandler(spec, model_copies=2).share_model_across_processes() is True
    with pytest.raises(ValueError, match="inference_args"):
        handler.validate_inference_args({"temperature": 0.5})
    handler.validate_inference_args(None)
    assert handler.get_num_bytes([Request("a", prompt="abc"), Request("b", messages=CHAT)]) == \
        3 + len(CHAT[0]["content"]) + len(CHAT[1]["content"])
    assert handler.get_metrics_namespace() == "dfw/generate"
    # Beam's model refresh: the next load builds the backend on the new checkpoint
    before = handler.run_inference([Request("a", prompt="x", sampling=Sampling(seed=1))], handler.load_model())
    handler.update_model_path("round-2/policy")
    after = handler.run_inference([Request("a", prompt="x", sampling=Sampling(seed=1))], handler.load_model())
    assert before[0].model == "echo-1" and after[0].model == "round-2/policy"
    assert after[0].samples[0].text.endswith("(round-2/policy)")


def test_a_backend_that_drops_results_fails_loudly():
    class Broken(EchoBackend):
        def generate(self, requests):
            return super().generate(requests)[:-1]

    handler = GenerationHandler(BackendSpec(Broken, "m"))
    with pytest.raises(RuntimeError, match="2 results for 3 requests"):
        handler.run_inference([Request(str(i), prompt="p") for i in range(3)], handler.load_model())
