"""The vLLM offline engine (``vllm.LLM``) as a generation backend, for GPU workers.

Written against vLLM 0.32, the last release that pins our torch 2.13 (docs/sources.md#install-pins), installed
by the ``gpu`` extra; without it, constructing the backend raises a ``UserError`` that says how to
install it. The rest of the project never imports vllm.

Each unit (one sample of one request, ``base.py``) becomes one vLLM request with its own
``SamplingParams(n=1, seed=unit.seed)``, so sample i is the same text whether it was made alone,
in a batch, or on a retried Beam bundle, and the cache keys every sample separately. Both entry
points take one ``SamplingParams`` per prompt: ``LLM.generate(prompts, sampling_params)`` and
``LLM.chat(conversations, sampling_params)`` document that a list "must have the same length as the
prompts and it is paired one by one with the prompt", and return outputs "in the same order as
the input" (vLLM ``entrypoints/llm.py``). Chat requests go through ``LLM.chat`` so vLLM renders the
model's own chat template and tokenizes it without adding special tokens twice; raw prompts go
through ``LLM.generate``.

One engine per process: engines are keyed by (model, revision or folder fingerprint, engine kwargs) in
``models/cache.shared``, so every backend object, DoFn instance and thread of a worker uses the
same ``LLM``. ``LLM`` is not thread-safe (its ``generate`` adds requests then steps the engine
until *all* unfinished requests are done), so a lock per engine serializes the calls.

GRPO rollouts sample from the policy being trained, so ``sync_weights`` loads the trainer's weights
into the engine after each optimizer step, as TRL's colocate mode does (``trl/generation/
vllm_generation.py``, ``sync_weights``): each worker's ``model.load_weights(pairs)`` (the model's own
loader maps Hugging Face names onto vLLM's fused, sharded layers), reached through the documented
``LLM.collective_rpc`` (a callable gets the worker as its first argument), then
``LLM.reset_prefix_cache()`` so no KV block computed by the old weights is reused. It is meant for
an engine in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; TRL uses
``distributed_executor_backend="external_launcher"``): the tensors are then passed by reference.
With the engine core in another process, vLLM serializes the callable (it needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``) and copies every weight through its RPC channel, which the
``collective_rpc`` docs advise against for data. A synced engine is the shared engine of its
(model, version, kwargs) key in this process: every backend on that key sees the new weights.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflywheel.errors import UserError
from dataflywheel.models.cache import shared
from dataflywheel.models.fingerprint import folder_fingerprint
from dataflywheel.stages import retry_singly

from .base import _COUNTS_LOCK, Backend, Sample, SampleCache, Unit

INSTALL_HINT = "install the gpu extra: pip install 'dataflywheel[gpu]'"

# Prefix caching: a request for n samples is n vLLM requests with the same prompt (per-sample
# seeds, above), and Self-Instruct / Evol-Instruct prompts share long few-shot preambles. With
# automatic prefix caching the KV blocks of a shared prefix are computed once and reused (vLLM docs,
# "Automatic Prefix Caching"). vLLM's V1 engine turns it on by default for most models; we set it
# so the behaviour does not depend on the engine's default. Pass enable_prefix_caching=False to override.
ENGINE_DEFAULTS: dict[str, Any] = {"enable_prefix_caching": True}

_FINISH = {"stop": "stop", "length": "length"}  # vLLM's other reason, "abort", is a failed sample


def import_vllm() -> Any:
    """The ``vllm`` module, or a ``UserError`` saying how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise UserError(f"the vllm backend needs vLLM, which is not installed ({err}); {INSTALL_HINT}") from err
    return vllm


@dataclass
class _Engine:
    llm: Any
    lock: threading.Lock


def _get_engine(vllm: Any, model: str, revision: str | None, version: str | None,
                engine_kwargs: dict[str, Any]) -> _Engine:
    """The process's engine for this model ``version`` (its revision, or a local folder's fingerprint,
    so a checkpoint rewritten in place gets a new engine) and these engine kwargs."""
    key = "vllm:" + json.dumps({"model": model, "version": version, "engine": engine_kwargs},
                               sort_keys=True, default=repr)
    return shared(key, lambda: _Engine(vllm.LLM(model=model, revision=revision, **engine_kwargs), threading.Lock()))


def sampling_params(vllm: Any, unit: Unit) -> Any:
    """The vLLM ``SamplingParams`` of one unit: one sample, the unit's own seed."""
    s = unit.request.sampling
    return vllm.SamplingParams(
        n=1,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,  # 0 turns top-k off, as in our Sampling (vLLM >= 0.9, vllm-project/vllm#17773)
        max_tokens=s.max_tokens,
        stop=list(s.stop) or None,
        seed=unit.seed,
        # logprobs=k returns the top k plus the sampled token, so 0 returns the sampled token only
        # (vLLM SamplingParams docs, OpenAI semantics).
        logprobs=0 if s.logprobs else None,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
    )


def to_sample(output: Any, want_logprobs: bool) -> Sample:
    """Map one ``RequestOutput`` (n=1) to a ``Sample``."""
    if not output.outputs:
        return Sample("", "error", error="vllm returned no completion")
    c = output.outputs[0]
    tokens = len(c.token_ids)
    reason = _FINISH.get(c.finish_reason)
    if reason is None:
        return Sample(c.text, "error", tokens=tokens, error=f"vllm finish_reason={c.finish_reason!r}")
    return Sample(c.text, reason, tokens=tokens, logprobs=_sampled_logprobs(c) if want_logprobs else None,
                  token_ids=[int(t) for t in c.token_ids])


def _sampled_logprobs(c: Any) -> list[float] | None:
    """Log-prob of each sampled token: ``c.logprobs[i]`` maps token id -> ``Logprob`` at position i
    (a list of dicts, or vLLM's ``FlatLogprobs`` with the same interface). None when missing."""
    if c.logprobs is None or len(c.logprobs) != len(c.token_ids):
        return None
    out = []
    for token, position in zip(c.token_ids, c.logprobs):
        entry = position.get(token) if position is not None else None
        if entry is None:
            return None
        out.append(float(entry.logprob))
    return out


def load_weights_on_worker(worker: Any, weights: list[tuple[str, Any]]) -> None:
    """Run inside each vLLM worker by ``LLM.collective_rpc``: load ``(name, tensor)`` pairs into its
    model (``load_weights`` copies into the existing parameters, converting dtype and device)."""
    worker.model_runner.model.load_weights(weights=weights)


def _is_fatal(err: BaseException) -> bool:
    # A dead engine (its core process crashed, e.g. CUDA OOM) fails every later call: retrying unit
    # by unit would only turn a whole shard into error samples, so the backend raises instead.
    return type(err).__name__ == "EngineDeadError"


class VLLMBackend(Backend):
    """``VLLMBackend("org/model", revision=None, cache=None, tensor_parallel_size=2, ...)``:
    ``engine_kwargs`` go to ``vllm.LLM`` on top of ``ENGINE_DEFAULTS``. Set
    ``logprobs_mode="processed_logprobs"`` to get log-probs after temperature and penalties (vLLM
    returns the raw model log-probs by default)."""

    name = "vllm"
    share_across_processes = True  # one engine per machine under Beam RunInference (pipelines/generation_handler.py)

    def __init__(self, model: str, revision: str | None = None, cache: SampleCache | None = None,
                 **engine_kwargs: Any):
        super().__init__(model, revision, cache)
        self._vllm = import_vllm()
        self.engine_kwargs = {**ENGINE_DEFAULTS, **engine_kwargs}
        self._hub_revision = revision  # what vLLM loads; self.revision is what cache keys use
        folder = Path(model).expanduser()
        if revision is None and folder.is_dir():
            # a local checkpoint has no revision: key the cache by its content, as the transformers
            # backend does, so a model retrained into the same folder never replays old samples
            self.revision = folder_fingerprint(folder)
        self._engine: _Engine | None = self._engine_now()  # load now, in Beam's load_model: fail early

    def __getstate__(self) -> dict:
        # the engine and the module do not pickle: an unpickled copy finds its process's engine on first use
        return {**self.__dict__, "_vllm": None, "_engine": None}

    def _engine_now(self) -> _Engine:
        if getattr(self, "_engine", None) is None:
            self._vllm = import_vllm()
            self._engine = _get_engine(self._vllm, self.model, self._hub_revision, self.revision, self.engine_kwargs)
        return self._engine  # type: ignore[return-value]

    def sync_weights(self, weights: Any) -> None:
        """Load ``weights`` (an ``nn.Module``, whose ``named_parameters()`` are sent as TRL does, or
        ``(name, tensor)`` pairs with Hugging Face names) into the engine and reset its prefix cache.
        Holds the engine lock, so no generation runs on half-loaded weights."""
        if self.cache is not None:
            raise UserError(f"vllm backend for {self.model!r}: sync_weights with a generation cache would replay "
                            "samples of older weights under the same key; build the backend with cache=None")
        pairs = weights.named_parameters() if hasattr(weights, "named_parameters") else weights
        batch = [(str(name), tensor.detach()) for name, tensor in pairs]  # detach: no autograd graph to vLLM
        if not batch:
            raise ValueError("sync_weights got no weights")
        engine = self._engine_now()
        with engine.lock:
            engine.llm.collective_rpc(load_weights_on_worker, args=(batch,))
            engine.llm.reset_prefix_cache()
        with _COUNTS_LOCK:
            self.counts.update(weight_syncs=1, weights_synced=len(batch))

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        out: list[Sample | None] = [None] * len(todo)
        chat = [i for i, u in enumerate(todo) if u.request.messages is not None]
        plain = [i for i, u in enumerate(todo) if u.request.messages is None]
        with self._engine_now().lock:
            for idx, call in ((plain, self._generate), (chat, self._chat)):
                if idx:
                    for i, sample in zip(idx, self._run(call, [todo[i] for i in idx])):
                        out[i] = sample
        return out  # type: ignore[return-value]

    def _run(self, call: Any, todo: list[Unit]) -> list[Sample]:
        """One engine call for the batch; when it raises (a prompt longer than the model's context,
        a conversation the chat template rejects), retry unit by unit so only the bad units fail. A
        dead engine fails the first unit's retry too, and that error is raised."""

        def run(units: list[Unit]) -> list[Sample]:
            outputs = call(units)
            if len(outputs) != len(units):
                raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(units)} prompts")
            return [to_sample(o, u.request.sampling.logprobs) for o, u in zip(outputs, units)]

        def failed(unit: Unit, err: Exception) -> list[Sample]:
            if _is_fatal(err):
                raise err
            return [Sample("", "error", error=f"{type(err).__name__}: {err}")]

        return retry_singly(run, todo, failed)

    def _params(self, todo: list[Unit]) -> list[Any]:
        return [sampling_params(self._vllm, u) for u in todo]

    def _generate(self, todo: list[Unit]) -> list[Any]:
        return self._engine_now().llm.generate([u.request.prompt for u in todo], self._params(todo), use_tqdm=False)

    def _chat(self, todo: list[Unit]) -> list[Any]:
        conversations = [[dict(m) for m in u.request.messages] for u in todo]  # type: ignore[union-attr]
        return self._engine_now().llm.chat(conversations, self._params(todo), use_tqdm=False)
