"""In-process transformers backend (CPU or GPU): batched sampling with a seed per sample.

Why a decode loop of our own instead of ``model.generate``: generate draws every row's next token
from one global RNG, so a sample's text would depend on which other prompts shared its batch, and
the cache could not promise that sample i is one text wherever it was made. ``decode`` below runs
what generate runs (a left-padded prefill, then one-token steps over ``past_key_values``) with one
``torch.Generator`` per sample, touched by that sample only. A token is drawn as vLLM's sampler
draws it (``vllm/v1/sample/ops/topk_topp_sampler.py``, ``random_sample``): ``argmax(probs / q)``
with ``q ~ Exp(1)`` from the sample's generator, an exact draw from ``probs``. Greedy rows take the
argmax and equal HF generate's greedy tokens (tests). Finished rows leave the batch (and the KV
cache) at once, so one long sample does not keep a full batch running.

Conventions, stated once (vLLM's, so results compare across backends):

- Processing order as vLLM's sampler: presence / frequency penalties (OpenAI semantics, over the
  generated tokens), then temperature (below 1e-5 is greedy, vLLM's ``_SAMPLING_EPS``), then
  top-k (ties with the k-th logit kept) and top-p.
- Log-probs are of the *raw* model distribution (log-softmax of the logits before penalties,
  temperature and top-k/top-p): vLLM V1's default ``logprobs_mode="raw_logprobs"``.
- Chat messages go through the tokenizer's chat template with the generation prompt, tokenized
  without adding special tokens (the template writes them); a raw prompt is tokenized as is, with
  the tokenizer's default special tokens (vLLM's ``LLM.generate`` on a string).
- ``text`` leaves out EOS, special tokens (vLLM's ``skip_special_tokens=True``) and the stop string
  with all after it; ``token_ids`` holds every generated token, EOS included (``tokens`` counts
  them), and ``logprobs`` has one entry per token. ``finish_reason``: "stop" at EOS or a stop
  string, "length" at ``max_tokens`` or at the model's context length.

Batch invariance holds up to the last-bit float differences between a batched and an unbatched
forward: they can change a token only at an exact near-tie, which the tests do not meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataflywheel.errors import UserError
from dataflywheel.io import fs
from dataflywheel.models.cache import shared
from dataflywheel.models.fingerprint import folder_fingerprint
from dataflywheel.models.lm_score import DEFAULT_BATCH_SIZE, model_context
from dataflywheel.models.tiny_lm import load_causal_lm
from dataflywheel.stages import retry_singly

from .base import Backend, Request, Result, Sample, Sampling, Unit

GREEDY_BELOW = 1e-5  # vLLM _SAMPLING_EPS: temperatures below it sample greedily


@dataclass
class Decoded:
    """One finished sample of ``decode``: generated token ids (EOS included), their raw log-probs
    (when any sample of the batch asked), the text (stop string cut) and why it ended."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (an int or a list) and the tokenizer's."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(found if isinstance(found, (list, tuple)) else [] if found is None else [found])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return {int(i) for i in ids}


def chat_prompt_ids(tokenizer: Any, messages: Any) -> list[int]:
    """A chat's prompt ids: the template with the generation prompt, tokenized without added special
    tokens (the template writes them). GRPO trains on exactly these ids."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0  # any id works: padded positions are masked out


def _generator(seed: int | None, device: Any) -> Any:
    import torch

    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # unseeded: fresh entropy, never replayed (base.cache_key caches none of it)
    else:
        gen.manual_seed(seed)
    return gen


def _top_k_top_p(logits: Any, top_k: Any, top_p: Any) -> Any:
    """Mask logits outside each row's top-k and top-p (nucleus) sets with -inf, as vLLM's
    ``apply_top_k_top_p``: ``top_k <= 0`` is off, ties with the k-th logit stay, and top-p keeps at
    least the most likely token."""
    import torch

    vocab = logits.shape[-1]
    k_off, p_off = (top_k <= 0) | (top_k >= vocab), top_p >= 1.0
    if bool(k_off.all()) and bool(p_off.all()):
        return logits
    ordered, order = logits.sort(dim=-1)  # ascending
    if not bool(k_off.all()):
        k = top_k.masked_fill(k_off, vocab)
        kth = ordered.gather(1, (vocab - k).unsqueeze(1))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if not bool(p_off.all()):
        cum = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def _draw(logits: Any, rows: list[int], settings: list[Sampling], gens: list[Any]) -> Any:
    """Next token per batch row; ``rows[j]`` is batch row j's index into settings / gens."""
    import torch

    tokens = logits.argmax(dim=-1)
    hot = [j for j, r in enumerate(rows) if settings[r].temperature >= GREEDY_BELOW]
    if not hot:
        return tokens
    dev = logits.device
    pick = torch.tensor(hot, device=dev)
    temp = torch.tensor([settings[rows[j]].temperature for j in hot], device=dev)
    top_k = torch.tensor([settings[rows[j]].top_k for j in hot], device=dev)
    top_p = torch.tensor([settings[rows[j]].top_p for j in hot], device=dev)
    probs = _top_k_top_p(logits[pick] / temp.unsqueeze(1), top_k, top_p).softmax(dim=-1)
    q = torch.empty_like(probs)
    for i, j in enumerate(hot):
        q[i].exponential_(generator=gens[rows[j]])  # this sample's own stream, whatever the batch
    # q == 0 would make 0 / 0 = NaN, which argmax takes as the maximum: keep q positive
    tokens[pick] = probs.div_(q.clamp_(min=torch.finfo(q.dtype).tiny)).argmax(dim=-1)
    return tokens


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def decode(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: list[Sampling],
    seeds: list[int | None],
    max_new: list[int],
) -> list[Decoded]:
    """Sample a completion of each prompt (token ids) under its settings and seed, in one batch.

    ``max_new[i]`` caps sample i's tokens (its ``max_tokens``, or less near the context end).
    """
    import torch
    from transformers import DynamicCache

    dev = model.device
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every row's next token is at the last column
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate: padding does not shift positions
    eos, gens = eos_ids(model, tokenizer), [_generator(s, dev) for s in seeds]
    penalized = any(s.presence_penalty or s.frequency_penalty for s in settings)
    scored = any(s.logprobs for s in settings)  # log-probs cost a full-vocabulary log-softmax per step
    out = [Decoded() for _ in range(n)]
    live = list(range(n))  # batch row -> sample index
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
        counts = torch.zeros_like(logits) if penalized else None
        last = positions[:, -1:]
        while True:
            raw = logits.log_softmax(dim=-1) if scored else None
            if counts is not None:
                freq = torch.tensor([settings[r].frequency_penalty for r in live], device=dev).unsqueeze(1)
                pres = torch.tensor([settings[r].presence_penalty for r in live], device=dev).unsqueeze(1)
                logits = logits - freq * counts - pres * (counts > 0)
            tokens = _draw(logits, live, settings, gens)
            picked = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist() if scored else None
            keep = []
            for j, (r, tok) in enumerate(zip(live, tokens.tolist())):
                d = out[r]
                d.ids.append(tok)
                if picked is not None:
                    d.logprobs.append(picked[j])
                if tok in eos:
                    d.finish_reason = "stop"
                    continue
                stops = settings[r].stop
                if stops:
                    text = tokenizer.decode(d.ids, skip_special_tokens=True)
                    cut = _cut_at_stop(text, stops)
                    if cut is not None:
                        d.text, d.finish_reason = text[:cut], "stop"
                        continue
                if len(d.ids) >= max_new[r]:
                    continue  # finish_reason stays "length"
                keep.append(j)
            if not keep:
                break
            step = tokens.unsqueeze(1)
            if len(keep) < len(live):  # finished rows leave the batch and the KV cache
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, last, step = mask[sel], last[sel], step[sel]
                if counts is not None:
                    counts = counts[sel]
                live = [live[j] for j in keep]
            if counts is not None:
                counts.scatter_add_(1, step, torch.ones_like(step, dtype=counts.dtype))
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            last = last + 1
            logits = model(input_ids=step, attention_mask=mask, position_ids=last, past_key_values=cache,
                           use_cache=True).logits[:, -1, :].float()
    for d in out:
        if not (d.finish_reason == "stop" and d.ids[-1] not in eos):  # not already cut at a stop string
            body = d.ids[:-1] if d.ids and d.ids[-1] in eos else d.ids
            d.text = tokenizer.decode(body, skip_special_tokens=True)
    return out


def _error(reason: str) -> Sample:
    return Sample(text="", finish_reason="error", error=reason)


class TransformersBackend(Backend):
    """``generate`` with a Hugging Face causal LM in this process.

    ``model``: a local folder (safetensors only) or a Hub id, loaded once per process and shared by
    threads. ``revision``: the Hub revision; for a local folder, left as None, the cache key uses a
    fingerprint of the folder's files instead. ``device="auto"``: CUDA when available. ``dtype=None``
    keeps the checkpoint's dtype. ``batch_size``: samples per decode batch (prompts sorted by length).
    """

    name = "transformers"

    def __init__(
        self,
        model: str | Path,
        revision: str | None = None,
        cache: Any = None,
        device: str = "auto",
        dtype: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        trust_remote_code: bool = False,
    ):
        super().__init__(str(model), revision, cache)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.trust_remote_code = trust_remote_code
        self._folder = Path(self.model).expanduser()
        self._lm: tuple[Any, Any] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lm": None}  # Beam pickles stages: the model reloads (once) on the worker

    def generate(self, requests: list[Request]) -> list[Result]:
        # a model in a bucket is fingerprinted from its local copy, made on the worker that loads it
        folder = Path(fs.local_copy(self.model)) if fs.is_remote(self.model) else self._folder
        if self.revision is None and folder.is_dir():
            self.revision = shared(f"fingerprint:{folder.resolve()}", lambda: folder_fingerprint(folder))
        return super().generate(requests)

    def load(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``, loaded on first use."""
        if self._lm is None:
            import torch

            device = self.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if fs.is_remote(self.model) or self._folder.is_dir() or self.revision is None:
                self._lm = load_causal_lm(self.model, dtype=self.dtype, device=device,
                                          trust_remote_code=self.trust_remote_code)
            else:
                self._lm = shared(f"causal_lm:{self.model}@{self.revision}:{self.dtype}:{device}",
                                  lambda: self._load_revision(device))
        return self._lm

    def _load_revision(self, device: str) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        tok = AutoTokenizer.from_pretrained(self.model, **kw)
        model = AutoModelForCausalLM.from_pretrained(self.model, dtype=self.dtype or "auto", use_safetensors=True, **kw)
        return model.to(device).eval(), tok

    def _encode(self, tokenizer: Any, request: Request) -> list[int]:
        if request.messages is not None:
            return chat_prompt_ids(tokenizer, request.messages)
        return list(tokenizer(request.prompt)["input_ids"])

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        model, tok = self.load()
        context = model_context(model)
        samples: list[Sample | None] = [None] * len(todo)
        encoded: dict[int, list[int] | str] = {}  # per request object: its units share one prompt
        ready = []
        for i, unit in enumerate(todo):
            key = id(unit.request)
            if key not in encoded:
                try:
                    encoded[key] = self._encode(tok, unit.request)
                except Exception as err:  # a bad chat (no template, bad roles) fails its own samples only
                    encoded[key] = f"cannot encode the prompt: {type(err).__name__}: {err}"
            ids = encoded[key]
            if isinstance(ids, str):
                samples[i] = _error(ids)
            elif not ids:
                samples[i] = _error("empty prompt: nothing to condition on")
            elif context is not None and len(ids) >= context:
                samples[i] = _error(f"prompt has {len(ids)} tokens; the model's context is {context}")
            else:
                ready.append(i)
        ready.sort(key=lambda i: -len(encoded[id(todo[i].request)]))  # similar lengths pad little
        for at in range(0, len(ready), self.batch_size):
            batch = ready[at:at + self.batch_size]
            for i, sample in zip(batch, self._run(model, tok, [todo[i] for i in batch], encoded, context)):
                samples[i] = sample
        return samples  # type: ignore[return-value]

    def _run(self, model: Any, tok: Any, batch: list[Unit], encoded: dict, context: int | None) -> list[Sample]:
        """Decode one batch; when it fails (out of memory), each unit alone, so one bad sample
        costs only itself (results do not depend on the batch)."""

        def run(units: list[Unit]) -> list[Sample]:
            prompts = [encoded[id(u.request)] for u in units]
            settings = [u.request.sampling for u in units]
            max_new = [s.max_tokens if context is None else min(s.max_tokens, context - len(p))
                       for s, p in zip(settings, prompts)]
            done = decode(model, tok, prompts, settings, [u.seed for u in units], max_new)
            return [Sample(text=d.text, finish_reason=d.finish_reason, tokens=len(d.ids),
                           logprobs=d.logprobs if s.logprobs else None, token_ids=d.ids)
                    for d, s in zip(done, settings)]

        return retry_singly(run, batch, lambda unit, err: [_error(f"generation failed: {type(err).__name__}: {err}")])

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, name: str, batch_size: int = DEFAULT_BATCH_SIZE,
                   cache: Any = None) -> LiveTransformersBackend:
        """A backend over an already-loaded model that keeps changing (``LiveTransformersBackend``)."""
        return LiveTransformersBackend(model, tokenizer, name, batch_size=batch_size, cache=cache)


class LiveTransformersBackend(TransformersBackend):
    """``generate`` with a model object already in memory whose weights change between calls: the
    policy of an RL loop (GRPO rollouts). ``name`` is what results report as the model.

    Nothing is loaded and nothing is cached: a cached sample would be the text of older weights, so
    passing a cache is an error. Each call decodes in eval mode (no dropout while sampling) under
    ``torch.no_grad``, then gives every submodule back the train/eval flag it had, because the
    trainer calls it mid-training. The backend reads the module itself, so it always sees the
    current weights and ``sync_weights`` has nothing to do.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: Any = None):
        if cache is not None:
            raise UserError(f"live model backend {name!r} takes no generation cache: its weights change every "
                            f"step, so a cached sample would come from older weights (got cache={cache!r})")
        super().__init__(name, batch_size=batch_size)
        self._lm = (model, tokenizer)

    def __getstate__(self) -> dict:
        raise TypeError("a live model backend holds the model being trained and does not pickle; "
                        "build it in the process that trains")

    def generate(self, requests: list[Request]) -> list[Result]:
        return Backend.generate(self, requests)  # no folder to fingerprint, no cache to key

    def load(self) -> tuple[Any, Any]:
        return self._lm  # type: ignore[return-value]

    def sync_weights(self, weights: Any = None) -> None:
        """Nothing to do: generation runs on the trained module itself."""

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        import torch

        model = self._lm[0]  # type: ignore[index]
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                return super()._complete(todo)
        finally:  # restore flag by flag: model.train(flag) would also flip submodules the trainer froze
            for module, training in modes:
                module.training = training
