"""Causal-LM scoring core: negative log-likelihood of texts, and of answers given prompts.

One batched primitive, ``sequence_nll``, scores token sequences from a start position on; the
perplexity stage (``filters/perplexity.py``), the Beam RunInference handler
(``pipelines/inference.py``) and IFD selection (docs/sources.md#ifd) are thin layers over it:

    res = answer_nll(model, tok, prompts, answers, max_length=512)
    ifd = [r.conditional.mean / r.alone.mean for r in res]     # s(A|Q) / s(A), Li et al. 2024

Conventions, stated once:

- NLL is in nats, summed in float64 over *scored* tokens; ``mean`` is the token average and
  ``exp(mean)`` the perplexity. Logits are upcast to float32 before the log-softmax, whatever the
  model's dtype.
- ``prefix="bos"``: one start token (the tokenizer's BOS, else its EOS, as lm-evaluation-harness
  does) is put before the text so that its first token is scored too; ``prefix="none"`` feeds the
  text as is, and its first token, having no context, is not scored (Superfiltering's bare-output
  loss, docs/sources.md#superfiltering). Text is encoded with ``add_special_tokens=False`` either way, so a
  tokenizer that adds BOS by itself (Llama) is not double-prefixed.
- ``max_length`` counts every token fed to the model, prefix included. Nothing is cut silently:
  each result says whether tokens were dropped (``truncated``).
- Batches are right-padded, one forward per batch, sequences sorted by length (longest first) so
  each batch pads little; results come back in input order. No attention mask is passed: under
  causal attention a real token only sees positions before it, which right padding never fills,
  so pads cannot change a scored logit, and the model keeps its fast causal kernel (an explicit
  padding mask made CPU scoring ~1.6x slower in benchmarks/selection.py's setting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Prefix = Literal["bos", "none"]
LongText = Literal["truncate", "window"]
PromptFormat = Literal["plain", "chat"]

DEFAULT_MAX_LENGTH = 512  # Cherry_LLM's IFD analysis length (docs/sources.md#ifd); tiny_lm's max_positions
DEFAULT_BATCH_SIZE = 8  # sequences per forward (ours: small enough for CPU, raise it on a GPU)
DEFAULT_SEPARATOR = "\n"  # between prompt and answer in the plain format: Superfiltering (docs/sources.md#superfiltering)
_MAX_EXP = 709.0  # math.exp overflows a float64 above ~709.78


@dataclass(frozen=True)
class NLL:
    """Summed NLL over the scored tokens of one sequence (or of one answer)."""

    total: float  # sum of -log p(token | everything before it), nats
    tokens: int  # how many tokens were scored
    truncated: bool = False  # tokens were dropped to fit max_length

    @property
    def mean(self) -> float | None:
        """Token-averaged NLL; None when nothing was scored (never NaN)."""
        return self.total / self.tokens if self.tokens else None

    @property
    def ppl(self) -> float | None:
        """exp(mean), capped at exp(709) so it is always finite; None when nothing was scored."""
        mean = self.mean
        return None if mean is None else math.exp(min(mean, _MAX_EXP))


@dataclass(frozen=True)
class AnswerNLL:
    """The answer's NLL with the prompt as context and without it, over the same answer tokens."""

    conditional: NLL  # s(A|Q): answer tokens given the prompt
    alone: NLL  # s(A): the same answer tokens after only the prefix
    answer_tokens: int  # the answer's length before any truncation

    @property
    def truncated(self) -> bool:
        return self.conditional.truncated


def prefix_token_id(tokenizer: Any) -> int:
    """The start token put before a text: BOS, else EOS (GPT-2's tokenizers have both as one token)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token; use prefix='none'")


def model_context(model: Any) -> int | None:
    """The model's maximum number of positions, if its config says."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    # Whole texts, uncut: truncation is decided (and reported) by the callers. transformers may log
    # once that a text exceeds model_max_length; that is expected here.
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _start(tokenizer: Any, prefix: Prefix) -> list[int]:
    if prefix == "bos":
        return [prefix_token_id(tokenizer)]
    if prefix == "none":
        return []
    raise ValueError(f"prefix must be 'bos' or 'none', got {prefix!r}")


def sequence_nll(
    model: Any, sequences: Sequence[tuple[Sequence[int], int]], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[tuple[float, int]]:
    """``(nll_sum, n_scored)`` per ``(ids, start)``: scores ``ids[start:]``, each token given all before it.

    ``start`` is clamped to at least 1 (the first token has no context). Sequences with nothing
    to score cost no forward. Padding uses id 0 (any id works: padded positions come after every
    real token, so causal attention never lets a real token see them, and they are never scored).
    """
    import torch

    from .label_logps import IGNORE, label_logps

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    todo = [i for i, (ids, start) in enumerate(sequences) if len(ids) > max(start, 1)]
    todo.sort(key=lambda i: -len(sequences[i][0]))  # longest first: similar lengths share a batch
    device = next(model.parameters()).device
    with torch.inference_mode():
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            width = len(sequences[chunk[0]][0])
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full_like(input_ids, IGNORE)  # only ids[start:] of each row are scored
            for row, i in enumerate(chunk):
                ids, start = sequences[i]
                input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
                labels[row, max(start, 1) : len(ids)] = input_ids[row, max(start, 1) : len(ids)]
            logps = label_logps(model, labels.to(device), input_ids=input_ids.to(device)).double().sum(-1)
            for row, i in enumerate(chunk):
                ids, start = sequences[i]
                results[i] = (-float(logps[row]), len(ids) - max(start, 1))
    return results


def _windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """Sliding windows over a long sequence (transformers docs, "Perplexity of fixed-length models").

    The first window scores tokens 1..max_length-1; each next one moves ``stride`` tokens on and
    scores only its new tokens, with at least ``max_length - stride`` tokens of context. Every
    token is scored exactly once.
    """
    if len(ids) <= max_length:
        return [(ids, 1)]
    out, scored_to = [(ids[:max_length], 1)], max_length
    while scored_to < len(ids):
        end = min(scored_to + stride, len(ids))
        begin = end - max_length
        out.append((ids[begin:end], scored_to - begin))
        scored_to = end
    return out


def token_nll(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    prefix: Prefix = "bos",
    long_text: LongText = "truncate",
    stride: int | None = None,
) -> list[NLL]:
    """NLL of each text (one ``NLL`` per text, input order).

    ``long_text="truncate"``: a text over ``max_length`` tokens is scored on its first
    ``max_length`` and flagged ``truncated``. ``"window"``: every token is scored with sliding
    windows of ``max_length`` moving by ``stride`` (default ``max_length // 2``); nothing is
    truncated, at the cost of about ``len / stride`` forwards per long text.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if long_text not in ("truncate", "window"):
        raise ValueError(f"long_text must be 'truncate' or 'window', got {long_text!r}")
    stride = max_length // 2 if stride is None else stride
    if long_text == "window" and not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length), got {stride}")
    head = _start(tokenizer, prefix)
    seqs: list[tuple[list[int], int]] = []
    owner: list[int] = []  # text index of each sequence (a windowed text has several)
    truncated: list[bool] = []
    for t, ids in enumerate(_encode(tokenizer, texts)):
        ids = head + ids
        truncated.append(long_text == "truncate" and len(ids) > max_length)
        parts = _windows(ids, max_length, stride) if long_text == "window" else [(ids[:max_length], 1)]
        seqs += parts
        owner += [t] * len(parts)
    totals, counts = [0.0] * len(texts), [0] * len(texts)
    for t, (total, n) in zip(owner, sequence_nll(model, seqs, batch_size)):
        totals[t] += total
        counts[t] += n
    return [NLL(totals[t], counts[t], truncated[t]) for t in range(len(texts))]


def _render_chat(tokenizer: Any, prompt: Any, answer: str) -> tuple[str, str]:
    """(prompt text up to the assistant header, the assistant turn) as the chat template renders them."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently once the answer follows; "
                         "use prompt_format='plain' with a prompt rendered by hand")
    turn = full[len(head) :]
    eos = tokenizer.eos_token
    if eos and turn.rstrip().endswith(eos):
        turn = turn.rstrip()  # score the end-of-turn token, not the template's newline after it
    return head, turn


def answer_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    answers: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    prompt_format: PromptFormat = "plain",
    separator: str = DEFAULT_SEPARATOR,
    prefix: Prefix = "bos",
    alone_prefix: Prefix = "bos",
    alone_context: str = "",
) -> list[AnswerNLL]:
    """NLL of each answer's tokens given its prompt, and of the same tokens alone.

    ``prompt_format="plain"``: the prompt is ``prefix + prompt + separator``, the answer its text.
    ``"chat"``: the tokenizer's chat template renders the prompt (a string becomes one user turn,
    or pass a message list) with the generation header; the answer is the assistant turn as the
    template writes it, end-of-turn token included (its BOS comes from the template: ``prefix``
    is not added again). The alone score puts ``alone_prefix`` before the answer; with "none" its
    first token is not scored (Superfiltering's convention). ``alone_context`` is text put between
    ``alone_prefix`` and the answer as unscored context: Cherry_LLM scores s(A) on
    ``"### Response:" + answer`` (docs/sources.md#ifd), so the response header is context on both sides.

    Truncation: when prompt + answer exceed ``max_length``, the answer keeps the tokens that fit
    after the prompt, both scores cover exactly those tokens, and ``truncated`` is set (Cherry_LLM
    drops such samples: filter on it). A prompt that fills the window leaves 0 answer tokens.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if prompt_format == "chat":
        rendered = [_render_chat(tokenizer, p, a) for p, a in zip(prompts, answers)]
        head: list[int] = []
        prompt_texts, answer_texts = [r[0] for r in rendered], [r[1] for r in rendered]
    elif prompt_format == "plain":
        head = _start(tokenizer, prefix)
        prompt_texts, answer_texts = [p + separator for p in prompts], list(answers)
    else:
        raise ValueError(f"prompt_format must be 'plain' or 'chat', got {prompt_format!r}")
    # Prompt and answer are tokenized separately and their ids concatenated: tokenizing the joined
    # string would let BPE merge across the boundary (e.g. "\n" + "The" -> "\nThe", or a space
    # joining the next word), so some tokens would belong to both sides and the answer's tokens
    # would differ between the conditional and the alone forward. Separate ids keep the boundary
    # exact and both scores over the very same answer tokens, which the IFD ratio needs.
    prompt_ids = [head + ids for ids in _encode(tokenizer, prompt_texts)]
    answer_ids = _encode(tokenizer, answer_texts)
    alone_head = _start(tokenizer, alone_prefix) + (_encode(tokenizer, [alone_context])[0] if alone_context else [])
    seqs: list[tuple[list[int], int]] = []
    for q, a in zip(prompt_ids, answer_ids):
        # the answer keeps what fits after the longer of the two contexts, so both forwards stay
        # within max_length and score the very same tokens
        kept = a[: max(0, max_length - max(len(q), len(alone_head)))]
        seqs.append(((q + kept)[:max_length], len(q)))  # a prompt that fills the window: nothing to score
        seqs.append((alone_head + kept, len(alone_head)))
    scored = sequence_nll(model, seqs, batch_size)
    out = []
    for k, a in enumerate(answer_ids):
        cut = len(seqs[2 * k][0]) - len(prompt_ids[k]) < len(a)
        (ct, cn), (at, an) = scored[2 * k], scored[2 * k + 1]
        out.append(AnswerNLL(NLL(ct, cn, cut), NLL(at, an, cut), len(a)))
    return out


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str) -> Any:
    """'float32' | 'bfloat16' | 'float16' -> the torch dtype."""
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def ppl_scores(result: NLL, prefix: str = "") -> dict[str, float | int]:
    """The perplexity stage's score fields for one text; ppl and nll only when tokens were scored."""
    scores: dict[str, float | int] = {f"{prefix}ppl_tokens": result.tokens, f"{prefix}ppl_truncated": int(result.truncated)}
    if result.tokens:
        if not math.isfinite(result.total):
            raise ValueError(f"non-finite NLL ({result.total}) over {result.tokens} tokens: the model output overflowed")
        scores[f"{prefix}nll"] = result.mean  # type: ignore[assignment]
        scores[f"{prefix}ppl"] = result.ppl  # type: ignore[assignment]
    return scores


@dataclass
class LMScoreSettings:
    """Everything that decides a text's perplexity numbers, shared by the stage and the Beam handler."""

    model: str
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    dtype: str = "float32"  # Cherry_LLM scores IFD in fp32 (docs/sources.md#ifd); bfloat16 on a GPU is optional
    device: str = "auto"
    prefix: Prefix = "bos"
    long_text: LongText = "truncate"
    stride: int | None = None


class CausalLMScorer:
    """A loaded causal LM plus its settings; plain data in and out, so a Beam multi-process proxy can call it."""

    def __init__(self, settings: LMScoreSettings):
        from dataflywheel.errors import UserError
        from dataflywheel.models.tiny_lm import load_causal_lm

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.model, self.tokenizer = load_causal_lm(settings.model, dtype=torch_dtype(settings.dtype), device=self.device)
        context = model_context(self.model)
        if context is not None and settings.max_length > context:
            raise UserError(f"max_length {settings.max_length} exceeds the context of {settings.model} ({context} positions)")

    def text_nll(self, texts: Sequence[str]) -> list[NLL]:
        s = self.settings
        return token_nll(self.model, self.tokenizer, texts, max_length=s.max_length, batch_size=s.batch_size,
                         prefix=s.prefix, long_text=s.long_text, stride=s.stride)

    def score_texts(self, texts: Sequence[str], prefix: str = "") -> list[dict[str, float | int]]:
        """The perplexity stage's score fields for each text."""
        return [ppl_scores(r, prefix) for r in self.text_nll(list(texts))]
