"""The vLLM offline backend without vLLM: a stand-in ``vllm`` module replaces the engine, which
needs a GPU and a wheel this machine cannot run. The tests check what our code sends to vLLM (one
``SamplingParams`` per sample, chat through ``LLM.chat``) and how it reads what comes back."""

from __future__ import annotations

import hashlib
import pickle
import random
import sys
import threading
import time
import types
from dataclasses import dataclass
from typing import Any

import pytest

from dataflywheel.errors import UserError
from dataflywheel.models import cache as model_cache
from dataflywheel.synth.backends.base import Request, Sample, Sampling, cache_key, sample_seed, units


class FakeVLLMForTests:
    """Stands in for the ``vllm`` package, which needs a GPU and cannot run here.

    It implements exactly the surface of vLLM 0.32 that ``synth/backends/vllm_offline.py`` uses, with
    the documented shapes: ``LLM(model, revision=..., **engine_kwargs)``,
    ``LLM.generate(prompts, sampling_params, use_tqdm=...)`` and ``LLM.chat(conversations,
    sampling_params, use_tqdm=...)`` (one ``SamplingParams`` per prompt, outputs in input order),
    ``SamplingParams`` (validated as vLLM does), and ``RequestOutput.outputs[i]`` as a
    ``CompletionOutput`` with ``text``, ``token_ids``, ``finish_reason`` and ``logprobs`` (per
    position, a dict token id -> ``Logprob``). For weight sync: ``LLM.collective_rpc(method,
    timeout=None, args=(), kwargs=None)`` (a method name, or a callable that gets the worker as its
    first argument; one result per worker) on one in-process worker whose ``model_runner.model``
    has ``load_weights(weights)`` (raising on a name the model lacks, as vLLM's loaders do), and
    ``LLM.reset_prefix_cache()``. The "model" writes words picked by a PRNG seeded from the prompt,
    the request seed and a digest of its weights, so outputs are deterministic per (prompt, seed,
    weights) and differ across seeds. Like ``vllm.LLM`` it is not thread-safe; unlike it, it
    detects overlapping calls, weight loads included.
    """

    VOCAB = ["alpha", "beta", "gamma", "delta", "stop", "omega", "sigma", "tau", "\n\n", "16."]
    EOS = len(VOCAB)  # token id of the end-of-sequence token

    class EngineDeadError(RuntimeError):
        """As ``vllm.v1.engine.exceptions.EngineDeadError``: the engine core died."""

    @dataclass
    class Logprob:
        logprob: float
        rank: int | None = None
        decoded_token: str | None = None

    @dataclass
    class CompletionOutput:
        index: int
        text: str
        token_ids: list[int]
        cumulative_logprob: float | None
        logprobs: list[dict] | None
        finish_reason: str | None = None
        stop_reason: int | str | None = None

    @dataclass
    class RequestOutput:
        request_id: str
        prompt: str | None
        prompt_token_ids: list[int] | None
        prompt_logprobs: Any
        outputs: list
        finished: bool

    @dataclass(kw_only=True)
    class SamplingParams:
        n: int = 1
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        seed: int | None = None
        stop: Any = None
        max_tokens: int | None = 16
        logprobs: int | None = None

        def __post_init__(self) -> None:  # vLLM's checks on the fields we set
            self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
            if self.n < 1:
                raise ValueError(f"n must be at least 1, got {self.n}.")
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
            if self.top_k < -1:
                raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
            if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
                raise ValueError("penalties must be in [-2, 2]")
            if self.logprobs is not None and self.logprobs < -1:
                raise ValueError(f"logprobs must be non-negative or -1, got {self.logprobs}.")

    class Model:
        """The worker's model: parameters by Hugging Face name, loaded in place as vLLM's do."""

        def __init__(self) -> None:
            self.params: dict[str, list[float]] = {"embed.weight": [0.0, 0.0], "head.weight": [0.0], "head.bias": [0.0]}
            self.loaded: list[tuple[str, Any]] = []  # every (name, tensor) received, in order

        def load_weights(self, weights: Any) -> set[str]:
            done = set()
            for name, tensor in weights:
                if name not in self.params:
                    raise KeyError(name)  # vLLM: params_dict[name] on a name the model lacks
                self.loaded.append((name, tensor))
                self.params[name] = [float(x) for x in tensor.detach().flatten().tolist()]
                done.add(name)
            return done

        def digest(self) -> str:
            return hashlib.sha256(repr(sorted(self.params.items())).encode()).hexdigest()[:16]

    class LLM:
        instances: list = []  # every engine built in this test

        def __init__(self, model: str, *, revision: str | None = None, max_model_len: int = 40, **kwargs: Any):
            self.model, self.revision, self.kwargs = model, revision, kwargs
            self.max_model_len = max_model_len
            self.calls: list[tuple[str, list, list]] = []  # (method, prompts or conversations, params)
            self.active = 0
            self.max_active = 0
            self.overlaps = 0
            self.dead = False
            self.finish_override: str | None = None
            self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=FakeVLLMForTests.Model()))
            self.events: list[str] = []  # weight loads and prefix-cache resets, in order
            FakeVLLMForTests.LLM.instances.append(self)

        def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                           kwargs: dict | None = None) -> list:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if self.active > 1:
                self.overlaps += 1
            try:
                time.sleep(0.002)
                fn = getattr(self.worker, method) if isinstance(method, str) else method
                result = fn(*args, **(kwargs or {})) if isinstance(method, str) else fn(self.worker, *args,
                                                                                       **(kwargs or {}))
                self.events.append(f"rpc:{getattr(method, '__name__', method)}")
                return [result]  # one worker
            finally:
                self.active -= 1

        def reset_prefix_cache(self) -> bool:
            self.events.append("reset_prefix_cache")
            return True

        def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool = True) -> list:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            self.calls.append(("generate", prompts, sampling_params))
            return self._run(prompts, sampling_params)

        def chat(self, messages: Any, sampling_params: Any = None, use_tqdm: bool = True, **kwargs: Any) -> list:
            conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
            self.calls.append(("chat", conversations, sampling_params))
            return self._run([FakeVLLMForTests.render(c) for c in conversations], sampling_params)

        def _run(self, prompts: list[str], sampling_params: Any) -> list:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if self.active > 1:
                self.overlaps += 1
            try:
                time.sleep(0.002)  # widen the window in which an unlocked second caller would overlap
                if self.dead:
                    raise FakeVLLMForTests.EngineDeadError("EngineCore encountered an issue.")
                params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
                if len(params) != len(prompts):
                    raise ValueError("The lengths of prompts and sampling params must be the same.")
                for p in prompts:  # validated before anything runs, as vLLM does
                    if len(p.split()) > self.max_model_len:
                        raise ValueError(f"The decoder prompt (length {len(p.split())}) is longer than the "
                                         f"maximum model length of {self.max_model_len}.")
                weights = self.worker.model_runner.model.digest()
                return [self._one(str(i), p, sp, weights) for i, (p, sp) in enumerate(zip(prompts, params))]
            finally:
                self.active -= 1

        def _one(self, request_id: str, prompt: str, sp: Any, weights: str) -> Any:
            outs = [FakeVLLMForTests.complete(prompt, sp, j, weights) for j in range(sp.n)]
            if self.finish_override:
                for o in outs:
                    o.finish_reason = self.finish_override
            return FakeVLLMForTests.RequestOutput(request_id, prompt, None, None, outs, True)

    @staticmethod
    def render(conversation: list[dict]) -> str:
        """The chat template vLLM would apply (ChatML, as our tiny models use)."""
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversation) + \
            "<|im_start|>assistant\n"

    @staticmethod
    def complete(prompt: str, sp: Any, index: int = 0, weights: str | None = None) -> Any:
        """One completion: deterministic for a given (prompt, seed, weights); random when seed is
        None. ``weights=None`` is the engine's weights as loaded."""
        weights = weights or FakeVLLMForTests.Model().digest()
        if sp.seed is None:
            rng = random.Random()
        else:
            rng = random.Random(hashlib.sha256(f"{sp.seed}|{index}|{prompt}|{weights}".encode()).digest())
        V = FakeVLLMForTests
        token_ids, text, logprobs, finish = [], "", [], "length"
        for _ in range(sp.max_tokens):
            token = rng.randrange(len(V.VOCAB) + 1)
            top = {token: V.Logprob(-rng.random() * 3, 1)}
            if sp.logprobs:  # a few more candidates than the sampled token
                top.update({(token + k) % (len(V.VOCAB) + 1): V.Logprob(-5.0, k + 1) for k in range(1, sp.logprobs + 1)})
            token_ids.append(token)
            logprobs.append(top)
            if token == V.EOS:
                finish = "stop"
                break
            text += ("" if not text else " ") + V.VOCAB[token]
            hit = next((s for s in sp.stop if s in text), None)
            if hit is not None:
                text, finish = text[:text.index(hit)], "stop"
                break
        return V.CompletionOutput(index, text, token_ids, None, logprobs if sp.logprobs is not None else None, finish)

    @classmethod
    def module(cls) -> types.ModuleType:
        mod = types.ModuleType("vllm")
        mod.LLM, mod.SamplingParams = cls.LLM, cls.SamplingParams
        mod.RequestOutput, mod.CompletionOutput = cls.RequestOutput, cls.CompletionOutput
        return mod


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", FakeVLLMForTests.module())
    FakeVLLMForTests.LLM.instances = []
    model_cache.clear()  # engines are shared per process: start each test without one
    yield FakeVLLMForTests
    model_cache.clear()


def backend(**kw):
    from dataflywheel.synth.backends.vllm_offline import VLLMBackend

    return VLLMBackend("org/tiny-chat", **kw)


class DictCache:
    def __init__(self):
        self.data: dict[str, Sample] = {}

    def get_many(self, keys):
        return {k: self.data[k] for k in keys if k in self.data}

    def put_many(self, items):
        self.data.update(items)


CHAT = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."})


def test_missing_vllm_is_a_user_error_naming_the_extra(monkeypatch):
    from dataflywheel.synth.backends.vllm_offline import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees when it is not installed
    with pytest.raises(UserError, match=r"install the gpu extra: pip install 'dataflywheel\[gpu\]'"):
        VLLMBackend("org/model")


def test_one_sampling_params_per_sample_with_its_own_seed(fake_vllm):
    b = backend()
    sampling = Sampling(n=3, temperature=0.7, top_p=0.5, top_k=0, max_tokens=20, stop=("\n\n", "16."), seed=7,
                        logprobs=True, presence_penalty=2.0, frequency_penalty=0.5)
    b.generate([Request("a", prompt="List tasks:", sampling=sampling),
                Request("b", prompt="Other", sampling=Sampling(max_tokens=5, top_k=40))])
    [(method, prompts, params)] = fake_vllm.LLM.instances[0].calls
    assert method == "generate" and prompts == ["List tasks:"] * 3 + ["Other"]
    assert isinstance(params, list) and len(params) == 4
    assert all(p.n == 1 for p in params)
    assert [p.seed for p in params[:3]] == [sample_seed(7, i) for i in range(3)]
    assert len({p.seed for p in params[:3]}) == 3
    for p in params[:3]:
        assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.7, 0.5, 0, 20)
        assert p.stop == ["\n\n", "16."] and p.logprobs == 0
        assert (p.presence_penalty, p.frequency_penalty) == (2.0, 0.5)
    last = params[3]
    assert last.seed is None and last.logprobs is None and last.stop == [] and last.top_k == 40


def test_chat_goes_through_llm_chat_and_results_keep_request_order(fake_vllm):
    b = backend()
    s = Sampling(n=2, seed=3, max_tokens=8)
    requests = [Request("c1", messages=CHAT, sampling=s), Request("p1", prompt="Once upon", sampling=s),
                Request("c2", messages=CHAT[1:], sampling=Sampling(seed=4, max_tokens=8)),
                Request("p2", prompt="Twice", sampling=Sampling(seed=5, max_tokens=8))]
    results = b.generate(requests)
    calls = {m: (prompts, params) for m, prompts, params in fake_vllm.LLM.instances[0].calls}
    assert set(calls) == {"generate", "chat"}
    conversations, chat_params = calls["chat"]
    assert conversations == [list(CHAT), list(CHAT), list(CHAT[1:])]  # lists of plain message dicts
    assert all(isinstance(m, dict) for c in conversations for m in c)
    assert [p.seed for p in chat_params] == [sample_seed(3, 0), sample_seed(3, 1), sample_seed(4, 0)]
    assert [r.request_id for r in results] == ["c1", "p1", "c2", "p2"]
    assert [len(r.samples) for r in results] == [2, 2, 1, 1]
    # each sample is what the engine makes for that very prompt and seed, whatever batch it was in
    for r, req in zip(results, requests):
        text = fake_vllm.render(list(req.messages)) if req.messages else req.prompt
        for i, sample in enumerate(r.samples):
            sp = fake_vllm.SamplingParams(seed=sample_seed(req.sampling.seed, i), max_tokens=8)
            assert sample.text == fake_vllm.complete(text, sp).text
            assert sample.seed == sample_seed(req.sampling.seed, i)
    assert {(r.model, r.backend) for r in results} == {("org/tiny-chat", "vllm")}


def test_output_mapping_finish_reason_tokens_and_sampled_logprobs(fake_vllm):
    b = backend()
    reqs = [Request(f"r{i}", prompt=f"prompt {i}", sampling=Sampling(seed=i, max_tokens=6, logprobs=True))
            for i in range(12)]
    results = b.generate(reqs)
    reasons = set()
    for r, req in zip(results, reqs):
        [s] = r.samples
        ref = fake_vllm.complete(req.prompt, fake_vllm.SamplingParams(seed=sample_seed(req.sampling.seed, 0),
                                                                      max_tokens=6, logprobs=0))
        assert s.text == ref.text and s.finish_reason == ref.finish_reason
        assert s.tokens == len(ref.token_ids) > 0 and s.token_ids == ref.token_ids  # EOS included when made
        assert s.logprobs == [pos[t].logprob for t, pos in zip(ref.token_ids, ref.logprobs)]
        reasons.add(s.finish_reason)
    assert reasons == {"stop", "length"}  # both paths were exercised
    assert any(r.samples[0].token_ids[-1] == fake_vllm.EOS for r in results)
    [plain] = b.generate([Request("x", prompt="no logprobs", sampling=Sampling(seed=1))])
    assert plain.samples[0].logprobs is None
    fake_vllm.LLM.instances[0].finish_override = "abort"
    [aborted] = b.generate([Request("y", prompt="aborted", sampling=Sampling(seed=1))])
    assert aborted.samples[0].finish_reason == "error" and "abort" in aborted.samples[0].error


def test_a_bad_prompt_fails_alone_and_is_not_cached(fake_vllm):
    cache = DictCache()
    b = backend(cache=cache, max_model_len=10)
    too_long = " ".join(["word"] * 30)
    reqs = [Request("ok1", prompt="short one", sampling=Sampling(seed=1)),
            Request("bad", prompt=too_long, sampling=Sampling(seed=1)),
            Request("ok2", messages=CHAT[1:], sampling=Sampling(seed=1))]
    results = b.generate(reqs)
    assert [r.samples[0].finish_reason != "error" for r in results] == [True, False, True]
    assert "longer than the maximum model length" in results[1].samples[0].error
    assert len(cache.data) == 2 and b.counts["errors"] == 1
    again = b.generate(reqs)  # the good ones are replayed, the bad one is tried again
    assert [s.cached for r in again for s in r.samples] == [True, False, True]
    assert again[0].samples[0].text == results[0].samples[0].text


def test_a_dead_engine_raises_instead_of_erroring_every_sample(fake_vllm):
    b = backend()
    fake_vllm.LLM.instances[0].dead = True
    with pytest.raises(fake_vllm.EngineDeadError):
        b.generate([Request("a", prompt="x"), Request("b", prompt="y")])


def test_seeded_samples_do_not_depend_on_batch_or_n(fake_vllm):
    b = backend()
    four = b.generate([Request("a", prompt="Tell me", sampling=Sampling(n=4, seed=11, temperature=0.9))])[0]
    two_in_batch = b.generate([Request("z", prompt="noise", sampling=Sampling(n=3, seed=2)),
                               Request("a", prompt="Tell me", sampling=Sampling(n=2, seed=11, temperature=0.9))])[1]
    assert [s.text for s in two_in_batch.samples] == [s.text for s in four.samples[:2]]
    assert len({s.text for s in four.samples}) > 1  # per-sample seeds give different samples


def test_one_engine_per_process_with_prefix_caching_on(fake_vllm):
    a, b = backend(), backend()
    assert len(fake_vllm.LLM.instances) == 1 and a._engine is b._engine
    engine = fake_vllm.LLM.instances[0]
    assert engine.kwargs["enable_prefix_caching"] is True and engine.model == "org/tiny-chat"
    backend(revision="abc123")
    backend(enable_prefix_caching=False, tensor_parallel_size=2)
    assert len(fake_vllm.LLM.instances) == 3
    assert fake_vllm.LLM.instances[1].revision == "abc123"
    assert fake_vllm.LLM.instances[2].kwargs == {"enable_prefix_caching": False, "tensor_parallel_size": 2}


def test_a_pickled_backend_uses_its_process_engine(fake_vllm):
    b = backend()
    req = [Request("a", prompt="same text", sampling=Sampling(seed=5))]
    copy = pickle.loads(pickle.dumps(b))
    assert copy.generate(req)[0].samples[0].text == b.generate(req)[0].samples[0].text
    assert len(fake_vllm.LLM.instances) == 1 and copy._engine is b._engine


def test_a_local_checkpoint_is_keyed_by_its_content(fake_vllm, tmp_path):
    from dataflywheel.synth.backends.vllm_offline import VLLMBackend

    (tmp_path / "model.safetensors").write_bytes(b"weights of round 1")
    first = VLLMBackend(str(tmp_path))
    assert first.revision.startswith("local-") and fake_vllm.LLM.instances[0].revision is None  # vLLM loads the folder
    assert VLLMBackend(str(tmp_path))._engine is first._engine
    (tmp_path / "model.safetensors").write_bytes(b"weights of round 2")  # retrained in place
    second = VLLMBackend(str(tmp_path))
    assert second.revision != first.revision and second._engine is not first._engine
    [unit] = units([Request("a", prompt="p", sampling=Sampling(seed=1))])
    assert cache_key(first.model, first.revision, unit) != cache_key(second.model, second.revision, unit)


def test_calls_from_many_threads_never_overlap_in_the_engine(fake_vllm):
    backends = [backend(), backend()]  # two objects, one engine: the lock must be the engine's
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(5):
                backends[k % 2].generate([Request(f"{k}-{j}", prompt=f"p {k} {j}", sampling=Sampling(seed=j)),
                                          Request(f"{k}-{j}c", messages=CHAT, sampling=Sampling(seed=j))])
        except BaseException as err:  # noqa: B036 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine = fake_vllm.LLM.instances[0]
    assert not errors and len(engine.calls) == 6 * 5 * 2
    assert engine.max_active == 1 and engine.overlaps == 0


def test_the_overlap_detector_catches_unlocked_callers(fake_vllm):
    """Control for the test above: the same load straight on the engine, without our lock, overlaps."""
    engine = fake_vllm.LLM("org/tiny-chat")
    sp = fake_vllm.SamplingParams(seed=1)
    threads = [threading.Thread(target=lambda: [engine.generate(["p"] * 2, [sp, sp]) for _ in range(5)])
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.overlaps > 0


def test_handler_shares_a_vllm_backend_across_processes_by_default(fake_vllm):
    from dataflywheel.pipelines.generation_handler import BackendSpec, GenerationHandler
    from dataflywheel.synth.backends.vllm_offline import VLLMBackend

    spec = BackendSpec(VLLMBackend, "org/tiny-chat", {"max_model_len": 64})
    assert GenerationHandler(spec).share_model_across_processes() is True
    assert GenerationHandler(spec, large_model=False).share_model_across_processes() is False
    handler = GenerationHandler(spec, large_model=False)
    model = handler.load_model()
    assert isinstance(model, VLLMBackend) and fake_vllm.LLM.instances[0].max_model_len == 64
    [res] = handler.run_inference([Request("a", messages=CHAT, sampling=Sampling(seed=1))], model)
    assert res.request_id == "a" and res.backend == "vllm" and res.samples[0].finish_reason in ("stop", "length")


# -- weight sync for RL rollouts ------------------------------------------------------------------


def _policy(fill: float):
    torch = pytest.importorskip("torch")

    class Policy(torch.nn.Module):  # Hugging Face-style names: what the engine's loader maps
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(1, 2)
            self.head = torch.nn.Linear(1, 1)
            for p in self.parameters():
                torch.nn.init.constant_(p, fill)

    return Policy()


def test_sync_weights_loads_every_parameter_then_resets_the_prefix_cache(fake_vllm):
    b = backend()
    engine = fake_vllm.LLM.instances[0]
    req = [Request("a", prompt="Tell me", sampling=Sampling(n=2, seed=3, max_tokens=8))]
    before = [s.text for s in b.generate(req)[0].samples]
    policy = _policy(0.5)
    b.sync_weights(policy)
    loaded = engine.worker.model_runner.model.loaded
    assert [name for name, _ in loaded] == [name for name, _ in policy.named_parameters()]
    for (_, sent), param in zip(loaded, policy.parameters()):
        assert not sent.requires_grad and sent.data_ptr() == param.data_ptr()  # detached, not copied
    assert engine.events == ["rpc:load_weights_on_worker", "reset_prefix_cache"]
    assert b.counts["weight_syncs"] == 1 and b.counts["weights_synced"] == 3
    after = [s.text for s in b.generate(req)[0].samples]
    assert after != before  # the engine samples from the new weights
    engine_weights = engine.worker.model_runner.model.digest()
    assert after == [fake_vllm.complete("Tell me", fake_vllm.SamplingParams(seed=sample_seed(3, i), max_tokens=8), 0,
                                        engine_weights).text for i in range(2)]
    # (name, tensor) pairs from a generator work too; the original weights give the original samples
    b.sync_weights((name, p) for name, p in _policy(0.0).named_parameters())
    assert [s.text for s in b.generate(req)[0].samples] == before
    assert engine.events[2:] == ["rpc:load_weights_on_worker", "reset_prefix_cache"]


def test_sync_weights_refuses_a_cache_and_bad_weights(fake_vllm):
    with pytest.raises(UserError, match="cache=None"):
        backend(cache=DictCache()).sync_weights(_policy(1.0))
    b = backend()
    with pytest.raises(ValueError, match="no weights"):
        b.sync_weights([])
    torch = pytest.importorskip("torch")
    with pytest.raises(KeyError, match="lm_head.weight"):  # the engine's loader names the stranger
        b.sync_weights([("lm_head.weight", torch.zeros(2))])
    assert fake_vllm.LLM.instances[-1].events == []  # the load raised: no reset, nothing half-reported


def test_sync_never_overlaps_generation_in_the_engine(fake_vllm):
    b = backend()
    policies = [_policy(float(i)) for i in range(3)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(4):
                if k == 0:
                    b.sync_weights(policies[j % 3])
                else:
                    b.generate([Request(f"{k}-{j}", prompt=f"p {k} {j}", sampling=Sampling(seed=j))])
        except BaseException as err:  # noqa: B036 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine = fake_vllm.LLM.instances[0]
    assert not errors and engine.events.count("reset_prefix_cache") == 4
    assert engine.max_active == 1 and engine.overlaps == 0
