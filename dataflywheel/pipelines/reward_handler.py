"""Reward-model scoring as a Beam ``RunInference`` model handler (docs/sources.md#runinference), for GPU workers.

``rows | RunInference(RewardModelHandler(RewardModelConfig(model="out/rm/final", device="cuda")))``
turns prompt rows with ``completions`` into the same scored rows the ``reward_model`` stage writes:
both call ``synth.score.reward_model_scores``. Beam batches the rows (``min_batch_size`` /
``max_batch_size`` and any other ``ModelHandler`` batching kwarg); every completion of a batch then
goes to ``RewardModel.score``, sorted by length and ``forward_batch_size`` sequences per forward.

``large_model=True`` (or ``model_copies=N``) makes Beam hold one model per machine, shared by all
SDK worker processes, which a GPU VM needs; the model then lives in a separate process reached by
RPC, which is why ``load_model`` returns a ``RewardModel`` whose ``score`` takes and returns plain
Python data. In a config pipeline the ``reward_model`` stage with ``gpu: true`` asks Dataflow for an
accelerator the same way; this handler is for pipelines built by hand and for RunInference's model
refresh (``update_model_path``: the next round's reward model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.ml.inference.base import ModelHandler

from ..models.fingerprint import model_fingerprint
from ..models.reward_model import RewardModel
from ..synth.score import RewardModelConfig, reward_model_scores

DEFAULT_NAME = "reward_model"  # the provenance name, as the stage's default


class RewardModelHandler(ModelHandler[dict, dict, RewardModel]):
    """RunInference handler: a prompt row with completions in, the same row scored out."""

    def __init__(
        self,
        config: RewardModelConfig,
        *,
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
        self.config = config
        self.name = config.name or DEFAULT_NAME
        self._fingerprint: str | None = None

    def load_model(self) -> RewardModel:
        c = self.config
        return RewardModel(c.model, device=c.device, batch_size=c.forward_batch_size, chat_template=c.chat_template)

    def run_inference(
        self, batch: Sequence[dict], model: RewardModel, inference_args: dict[str, Any] | None = None
    ) -> Iterable[dict]:
        if self._fingerprint is None:  # of the folder (or Hub name): the model may sit behind RPC
            self._fingerprint = model_fingerprint(self.config.model)
        return reward_model_scores(model, list(batch), self.config, self.name, self._fingerprint)

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        if inference_args:
            raise ValueError(f"RewardModelHandler takes no inference_args (got {sorted(inference_args)}); "
                             "set scoring options in its RewardModelConfig")

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        # cheaper than Beam's default (pickling the batch): the completion text the model reads
        return sum(len(str(c.get("text") or "").encode()) for row in batch for c in row.get("completions") or [])

    def get_metrics_namespace(self) -> str:
        return "dfw/RunInference/reward_model"

    def update_model_path(self, model_path: str | None = None) -> None:
        if model_path:
            self.config = self.config.model_copy(update={"model": model_path})
            self._fingerprint = None
