"""The ``generate`` stage: prompt rows -> completions through any backend, bad outputs rejected.

Input rows carry ``prompt`` (messages ending with a user turn; record kind ``prompt``) or
``messages`` (the last assistant turn, if any, is dropped and regenerated). Each row gets
``completions``: one entry per sample with its text, finish reason, tokens, seed, log-probs and
whether it came from the cache; with ``n: 1`` the row also becomes a Conversation (``messages`` =
prompt + the assistant's answer). ``meta.generation`` records the model, backend and sampling.

Score, then decide (docs/concepts.md#stages-score-then-decide): the filter rejects, with the reason
counted, a sample that failed (``generation_error``), hit ``max_tokens`` (``overlong``), is empty
(``empty_output``) or refuses (``refusal``: the phrases below, matched at the start of the answer).
A row of n samples is kept when any sample is usable; unusable ones stay in ``completions`` with
``rejected`` set, so nothing is silently dropped. Each row samples with its own seed, derived from
``sampling.seed`` and the row id (``request_seed``), so prompts draw independent samples. The
backend is a resource: built once per worker, never pickled; with a ``cache`` a re-run or a retried
Beam bundle generates nothing that exists (the report counts hits and misses).
"""

from __future__ import annotations

import re
from collections import Counter

from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from .backends.base import Request, Sampling, request_seed
from .backends.config import BackendConfig, build_backend

# Openings of refusals, as the public SFT-cleaning scripts drop them (e.g. the "As an AI language
# model" filters of Vicuna/ShareGPT and OpenHermes cleaning); ours, matched case-insensitively.
REFUSALS = (
    r"i'?m sorry,? but",
    r"i am sorry,? but",
    r"i apologi[sz]e,? but",
    r"as an ai( language model)?",
    r"i (can(no|')t|am unable to|'m unable to) (help|assist|comply|provide|do that)",
)


class GenerateConfig(StageConfig):
    backend: BackendConfig
    sampling: Sampling = Sampling()
    reject_overlong: bool = True  # a sample cut at max_tokens is incomplete
    refusal_patterns: list[str] = list(REFUSALS)
    batch_size: int = 32  # prompts per backend call


def prompt_messages(row: dict) -> list[dict]:
    """The prompt turns: ``prompt``, or ``messages`` without a final assistant turn."""
    if isinstance(row.get("prompt"), list):
        return row["prompt"]
    messages = list(row.get("messages") or [])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ValueError("row has neither prompt nor messages")
    return messages


@register("generate")
class Generate(Scorer, Filter):
    """Completions for prompt rows from a transformers / OpenAI-compatible / vLLM backend."""

    Config = GenerateConfig
    resources = ("backend",)

    def __init__(self, config: GenerateConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self._refusal = re.compile(r"^\s*(" + "|".join(self.config.refusal_patterns) + ")", re.IGNORECASE)

    def build(self) -> None:
        self.backend = build_backend(self.config.backend)

    def verdict(self, sample: dict) -> str | None:
        """Why a sample is unusable, or None."""
        if sample["finish_reason"] == "error":
            return "generation_error"
        if self.config.reject_overlong and sample["finish_reason"] == "length":
            return "overlong"
        if not sample["text"].strip():
            return "empty_output"
        if "\x00" in sample["text"]:  # records.py refuses U+0000: a row built from it would not read back
            return "nul_in_text"
        if self._refusal.match(sample["text"]):
            return "refusal"
        return None

    def score(self, rows: list[dict]) -> list[dict]:
        base = self.config.sampling
        requests = [Request(str(r["id"]), messages=tuple(prompt_messages(r)),
                            sampling=base.model_copy(update={"seed": request_seed(base.seed, str(r["id"]))}))
                    for r in rows]
        out = []
        for row, result in zip(rows, self.backend.generate(requests)):
            completions = []
            for i, s in enumerate(result.samples):
                c = {"index": i, "text": s.text, "finish_reason": s.finish_reason, "tokens": s.tokens,
                     "seed": s.seed, "cached": s.cached, "logprobs": s.logprobs, "error": s.error}
                c["rejected"] = self.verdict(c)
                completions.append(c)
            meta = {**(row.get("meta") or {}),
                    "generation": {"model": result.model, "backend": result.backend, "sampling": result.sampling}}
            new = {**row, "completions": completions, "meta": meta}
            usable = [c for c in completions if c["rejected"] is None]
            if self.config.sampling.n == 1 and usable:
                new["messages"] = [*prompt_messages(row), {"role": "assistant", "content": usable[0]["text"]}]
                new.pop("prompt", None)
            out.append(new)
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        reasons = [c["rejected"] for c in row["completions"]]
        if any(r is None for r in reasons):
            return True, None
        return False, Counter(reasons).most_common(1)[0][0] if reasons else "no_samples"

    def tally(self, rows: list[dict]) -> dict[str, int]:
        counts: Counter = Counter()
        for row in rows:
            for c in row["completions"]:
                counts["cache_hits" if c["cached"] else "cache_misses"] += 1
                if not c["cached"]:
                    counts["tokens_generated"] += c["tokens"]
                if c["rejected"]:
                    counts[f"sample_{c['rejected']}"] += 1
        return dict(counts)

