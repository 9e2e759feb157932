"""Generation as a Beam ``RunInference`` model handler: ``Request`` in, ``Result`` out, any backend.

``requests | RunInference(GenerationHandler(BackendSpec(VLLMBackend, "org/model")))`` runs the vLLM
engine on Dataflow GPU workers; the same handler with the in-process transformers backend runs on
a laptop. ``load_model`` builds the backend once per worker (Beam's ``shared.Shared`` hands that one
object to every DoFn instance and thread; the backend guards its own thread safety), and
``run_inference`` calls ``backend.generate(batch)``, so caching, per-sample seeds and the order of
results are the backend's (``synth/backends/base.py``), exactly as when called directly.

``large_model=True`` (or ``model_copies=N``) makes Beam hold one backend per machine, shared by all
SDK worker processes, which a GPU VM needs: each process would otherwise start its own engine on
the same GPU. The backend then lives in a separate process and ``run_inference`` reaches it by
RPC; ``Request`` and ``Result`` are plain dataclasses, so they cross that boundary as they are.
Left unset, it follows the backend class (``share_across_processes``: True for vLLM).

Counts for the run report go to Beam counters ``stat/cache_hits``, ``stat/cache_misses``,
``stat/samples``, ``stat/tokens`` and ``stat/errors`` in ``metrics_namespace`` (``dfw/<name>``, read by
``stats.reports_from_beam``); they are computed from the results, so they are right under RPC too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from ..synth.backends.base import Backend, Request, Result, SampleCache

DEFAULT_NAMESPACE = "dfw/generate"


@dataclass
class BackendSpec:
    """What ``load_model`` builds: ``factory(model, cache=..., **kwargs)``.

    Beam pickles the handler to ship it to workers, so this holds what pickles: an importable
    backend class (or function), plain-data kwargs, and a cache that pickles as its location
    (``synth.cache.GenerationCache`` does) or a zero-argument factory called on the worker.
    """

    factory: Callable[..., Backend]
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    cache: SampleCache | Callable[[], SampleCache] | None = None

    def build(self) -> Backend:
        cache = self.cache
        if callable(cache) and not hasattr(cache, "get_many"):
            cache = cache()
        return self.factory(self.model, cache=cache, **self.kwargs)


class GenerationHandler(ModelHandler[Request, Result, Backend]):
    """RunInference handler: one ``Result`` per ``Request``, in batch order."""

    def __init__(
        self,
        backend: BackendSpec,
        *,
        metrics_namespace: str = DEFAULT_NAMESPACE,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        large_model: bool | None = None,
        model_copies: int | None = None,
        **batching: Any,
    ):
        """``batching``: other ``ModelHandler`` kwargs (max_batch_duration_secs, max_batch_weight,
        element_size_fn, batch_length_fn, batch_bucket_boundaries, env_vars), passed through.
        Batch sizes default to Beam's; larger batches let vLLM schedule more requests at once."""
        if large_model is None:
            large_model = bool(getattr(backend.factory, "share_across_processes", False))
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         large_model=large_model, model_copies=model_copies, **batching)
        self.backend = backend
        self.metrics_namespace = metrics_namespace

    def load_model(self) -> Backend:
        return self.backend.build()

    def run_inference(
        self, batch: Sequence[Request], model: Backend, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Result]:
        requests = list(batch)
        results = model.generate(requests)
        if len(results) != len(requests):  # a broken backend must not shift results onto other requests
            raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        self._count(results)
        return results

    def _count(self, results: list[Result]) -> None:
        samples = [s for r in results for s in r.samples]
        hits = sum(s.cached for s in samples)
        counts = {"cache_hits": hits, "cache_misses": len(samples) - hits, "samples": len(samples),
                  "tokens": sum(s.tokens for s in samples if not s.cached),  # generated in this run
                  "errors": sum(s.finish_reason == "error" for s in samples)}
        for name, value in counts.items():
            if value:
                Metrics.counter(self.metrics_namespace, f"stat/{name}").inc(value)

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        if inference_args:
            raise ValueError(f"GenerationHandler takes no inference_args (got {sorted(inference_args)}); "
                             "sampling settings travel on each Request")

    def get_num_bytes(self, batch: Sequence[Request]) -> int:
        # cheaper than Beam's default (pickling the batch): the text the model reads
        return sum(len((r.prompt or "").encode()) + sum(len(str(m.get("content", "")).encode())
                                                        for m in r.messages or ()) for r in batch)

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace

    def update_model_path(self, model_path: str | None = None) -> None:
        # Beam's model refresh (watch_model_pattern / model_metadata_pcoll) hands a new checkpoint
        # here: the next round's policy in the flywheel
        if model_path:
            self.backend = dataclasses.replace(self.backend, model=model_path)
