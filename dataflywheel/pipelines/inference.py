"""Causal-LM scoring as a Beam ``RunInference`` model handler (docs/sources.md#runinference), for GPU workers.

``pcoll_of_texts | RunInference(CausalLMScoreHandler("org/model", device="cuda"))`` yields one
``PredictionResult(text, scores)`` per text, where ``scores`` holds exactly the fields the
``perplexity`` stage writes (``ppl``, ``nll``, ``ppl_tokens``, ``ppl_truncated``): both call
``CausalLMScorer.score_texts``. Wrap the handler in Beam's ``KeyedModelHandler`` to carry row ids.

Batching is Beam's (``BatchElements``, set by ``min_batch_size`` / ``max_batch_size`` and any other
``ModelHandler`` batching kwarg); each Beam batch is then scored ``forward_batch_size`` sequences
per forward, sorted by length. ``large_model=True`` (or ``model_copies=N``) makes Beam hold one
model per machine, shared by all worker processes, which a GPU VM needs: each SDK process would
otherwise load its own copy. The model then lives in a separate process and ``run_inference``
reaches it by RPC, which is why ``load_model`` returns a ``CausalLMScorer`` whose methods take and
return plain Python data rather than a torch module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from ..models.lm_score import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, CausalLMScorer, LMScoreSettings


class CausalLMScoreHandler(ModelHandler[str, PredictionResult, CausalLMScorer]):
    """RunInference handler: text in, the perplexity stage's score dict out."""

    def __init__(
        self,
        model: str,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        forward_batch_size: int = DEFAULT_BATCH_SIZE,
        dtype: str = "float32",
        device: str = "auto",
        prefix: str = "bos",
        long_text: str = "truncate",
        stride: int | None = None,
        scores_prefix: str = "",
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        **batching: Any,
    ):
        """``batching``: other ``ModelHandler`` kwargs (max_batch_duration_secs, max_batch_weight,
        element_size_fn, batch_length_fn, batch_bucket_boundaries, env_vars), passed through."""
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         large_model=large_model, model_copies=model_copies, **batching)
        self.settings = LMScoreSettings(model=str(model), max_length=max_length, batch_size=forward_batch_size,
                                        dtype=dtype, device=device, prefix=prefix,  # type: ignore[arg-type]
                                        long_text=long_text, stride=stride)  # type: ignore[arg-type]
        self.scores_prefix = scores_prefix

    def load_model(self) -> CausalLMScorer:
        return CausalLMScorer(self.settings)

    def run_inference(
        self, batch: Sequence[str], model: CausalLMScorer, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        texts = list(batch)
        scores = model.score_texts(texts, self.scores_prefix)
        return [PredictionResult(text, s, self.settings.model) for text, s in zip(texts, scores)]

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        if inference_args:
            raise ValueError(f"CausalLMScoreHandler takes no inference_args (got {sorted(inference_args)}); "
                             "set scoring options on the handler")

    def get_num_bytes(self, batch: Sequence[str]) -> int:
        return sum(len(t.encode("utf-8")) for t in batch)  # cheaper than Beam's default: pickling the batch

    def get_metrics_namespace(self) -> str:
        return "dfw/RunInference/causal_lm_score"

    def update_model_path(self, model_path: str | None = None) -> None:
        # Beam's model refresh (watch_model_pattern / model_metadata_pcoll) hands a new folder here
        if model_path:
            self.settings.model = model_path
