"""The one generation interface: ``backend.generate(requests) -> results``.

Every model call of the project (synthesis, preference sampling, GRPO rollouts) goes through it,
so a pipeline runs unchanged on a CPU with a tiny model, against an OpenAI-compatible server, or
on vLLM GPU workers.

The unit of work is one **sample**: (request, sample index, per-sample seed). A request asking for
``n`` samples is ``n`` units, each with its own seed (``sample_seed``), so sample i is the same
text whether it was made alone, in a batch, by another backend run, or on a retried Beam bundle.
That is what lets the cache key each sample separately, lets a client top up a server that
silently ignores ``n``, and lets a later run with a larger ``n`` reuse the first samples.

A backend implements ``_complete(units) -> samples`` (one sample per unit, in order); the base
class does the rest: expansion into units, the cache lookup and store, and re-assembly into one
``Result`` per request, in request order. Counts (cache hits, misses, tokens generated) accumulate
in ``backend.counts`` for the run report.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

FINISH_REASONS = ("stop", "length", "error")  # OpenAI's, plus "error" for a sample that failed
_COUNTS_LOCK = threading.Lock()  # Beam threads may share one backend; Counter.update is not atomic


class Sampling(BaseModel):
    """Sampling settings of a request (OpenAI / vLLM names). ``top_k=0`` turns top-k off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0)  # OpenAI and vLLM default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(256, ge=1)
    stop: tuple[str, ...] = ()
    seed: int | None = None  # base seed; sample i uses sample_seed(seed, i). None: unseeded, not cached
    logprobs: bool = False  # ask for the log-prob of every sampled token
    presence_penalty: float = 0.0  # Self-Instruct uses 2.0 (docs/sources.md#self-instruct); backends without it say so
    frequency_penalty: float = 0.0

    def key_fields(self) -> dict[str, Any]:
        """What makes two samples the same, besides the prompt, the model and the sample index:
        everything but ``n`` (sample i of n=4 is sample i of n=8)."""
        return self.model_dump(exclude={"n"})


@dataclass(frozen=True)
class Request:
    """A chat (``messages``) or raw ``prompt`` to complete; ``id`` is the caller's key (e.g. the
    prompt row's id), carried to the result."""

    id: str
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    sampling: Sampling = Sampling()

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"request {self.id}: give exactly one of messages or prompt")
        if self.messages is not None and not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(self.messages))


@dataclass
class Sample:
    text: str
    finish_reason: str  # one of FINISH_REASONS
    tokens: int = 0  # completion tokens (0 when the backend cannot tell)
    logprobs: list[float] | None = None  # per sampled token; None: not asked for, or not returned
    # The generated token ids, EOS included when generated and, after a stop string, up to the token
    # that completed it (vLLM's CompletionOutput.token_ids): what GRPO trains on. None: not returned.
    token_ids: list[int] | None = None
    seed: int | None = None
    cached: bool = False
    error: str | None = None  # why, when finish_reason == "error"


@dataclass
class Result:
    request_id: str
    samples: list[Sample]
    model: str
    backend: str
    sampling: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Unit:
    """One sample to make: the request, its index among the request's n, and its seed."""

    request: Request
    index: int
    seed: int | None


def sample_seed(seed: int | None, index: int) -> int | None:
    """Seed of sample ``index``: distinct per sample, stable across runs, within 31 bits (some
    servers reject larger seeds)."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def request_seed(seed: int | None, key: str) -> int | None:
    """A request's base seed from a run seed and the request's key (e.g. the prompt row's id), so
    different prompts draw independent samples: with one base seed for every request, sample i of
    every prompt would reuse the same random stream."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def units(requests: list[Request]) -> list[Unit]:
    return [Unit(r, i, sample_seed(r.sampling.seed, i)) for r in requests for i in range(r.sampling.n)]


def cache_key(model: str, revision: str | None, unit: Unit) -> str | None:
    """hash(model id + revision, messages/prompt, sampling settings, seed, sample index); None for
    unseeded samples, which are random by request and must not be replayed."""
    r = unit.request
    if r.sampling.seed is None:
        return None
    payload = {"model": model, "revision": revision, "messages": r.messages, "prompt": r.prompt,
               "sampling": r.sampling.key_fields(), "index": unit.index, "seed": unit.seed}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class SampleCache(Protocol):
    """What the base class needs from a cache (``synth/cache.py``)."""

    def get_many(self, keys: list[str]) -> dict[str, Sample]: ...

    def put_many(self, items: list[tuple[str, Sample]]) -> None: ...


class Backend:
    """Base of every backend: subclasses set ``name`` and implement ``_complete``."""

    name = "base"

    def __init__(self, model: str, revision: str | None = None, cache: SampleCache | None = None):
        self.model, self.revision, self.cache = model, revision, cache
        self.counts: Counter = Counter()  # cache_hits, cache_misses, samples, tokens, errors

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        """One sample per unit, in order. Failures are ``Sample(finish_reason="error")``, not raises,
        unless the whole backend is unusable."""
        raise NotImplementedError

    def sync_weights(self, weights: Any) -> None:
        """Give the engine new weights (an ``nn.Module`` or its ``(name, tensor)`` pairs), for RL
        rollouts from the policy being trained. Backends that serve a fixed checkpoint cannot."""
        raise NotImplementedError(f"the {self.name} backend generates from a fixed model and cannot take new weights")

    def generate(self, requests: list[Request]) -> list[Result]:
        todo = units(requests)
        keys = [cache_key(self.model, self.revision, u) for u in todo]
        found = self.cache.get_many([k for k in keys if k]) if self.cache is not None else {}
        missing = [i for i, k in enumerate(keys) if k not in found]
        made = self._complete([todo[i] for i in missing]) if missing else []
        if len(made) != len(missing):
            raise RuntimeError(f"{self.name}: _complete returned {len(made)} samples for {len(missing)} units")
        samples: list[Sample | None] = [None] * len(todo)
        for i, k in enumerate(keys):
            if k in found:
                samples[i] = Sample(**{**asdict(found[k]), "cached": True})
        fresh = []
        for i, sample in zip(missing, made):
            sample.seed = todo[i].seed
            samples[i] = sample
            if keys[i] and sample.finish_reason != "error":  # errors are retried next time, not replayed
                fresh.append((keys[i], sample))
        if self.cache is not None and fresh:
            self.cache.put_many(fresh)
        with _COUNTS_LOCK:
            self.counts.update(cache_hits=len(todo) - len(missing), cache_misses=len(missing),
                               samples=len(todo), tokens=sum(s.tokens for s in made),
                               errors=sum(s.finish_reason == "error" for s in made))
        out, at = [], 0
        for r in requests:
            out.append(Result(r.id, samples[at:at + r.sampling.n], self.model, self.name,
                              r.sampling.model_dump()))
            at += r.sampling.n
        return out
