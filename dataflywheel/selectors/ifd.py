"""IFD, Instruction-Following Difficulty (docs/sources.md#ifd, #superfiltering): how little the instruction helps
the model predict the answer.

    IFD = s(A|Q) / s(A)        s = token-averaged NLL over the answer tokens only

A high IFD marks a sample the model cannot yet follow, hence worth training on; IFD > 1 means the
instruction makes the answer *less* likely (misaligned pair) and Cherry_LLM drops it, as it drops
truncated samples. The ``ifd`` stage scores with a causal LM (``models/lm_score.answer_nll``, one
batched call per ``score()``) and writes into ``row["scores"]``:

- ``ifd``: the paper's loss ratio s(A|Q) / s(A) (Li et al. 2024; our default);
- ``ifd_ppl_ratio``: exp(s(A|Q) - s(A)), what Superfiltering's code computes (ppl ratio). It is
  > 1 exactly when ``ifd`` is, but ranks samples differently (docs/sources.md#superfiltering);
- ``ifd_loss_cond``, ``ifd_loss_alone``: the two token means; ``ifd_tokens``: answer tokens
  scored with their context; ``ifd_truncated``: 1 when any answer lost tokens to ``max_length``.

A row with no scorable answer token gets no ``ifd`` (never NaN) and is rejected
``no_answer_tokens``. The filter reads stored scores only, so ``max_ifd`` can be re-applied later
without the model; ``select_top`` (``selectors/top.py``) then keeps the top-k.

Templates (how (Q, A) become tokens; each as its reference code feeds the model):

- ``plain``: Superfiltering (``code_ifd/data_analysis.py``, GPT-2): Q = ``instruction\\n[input\\n]``,
  no start token; s(A) on the bare answer, whose first token therefore goes unscored.
- ``alpaca``: Cherry_LLM (``cherry_seletion/data_analysis.py``, LLaMA): its PROMPT_DICT ending in
  ``### Response:``, the answer right after it, BOS first; s(A) on BOS + ``### Response:`` + A.
- ``chat``: the tokenizer's chat template; A is the assistant turn as the template writes it, its
  end-of-turn token included; s(A) on BOS + the assistant header + A (the header is context on
  both sides, as ``### Response:`` is in Cherry's alone pass).

Alpaca rows (``instruction`` / ``input`` fields) are rendered from those fields; conversation rows
from their messages, the user turn standing for the instruction.

Multi-turn (docs/selection.md#ifd): every assistant turn is scored with all messages before it as context
(``selectors/turns.py``); ``plain`` joins earlier contents with ``\\n``, ``alpaca`` writes earlier
turns as ``### Instruction:`` / ``### Response:`` blocks. ``multi_turn`` sets the row's value:

- ``pooled`` (default): all answer tokens of all turns in one ratio, Σ NLL_cond / N_cond over
  Σ NLL_alone / N_alone. Token-weighted like the SFT loss a conversation contributes, and equal to
  the single-turn IFD when there is one turn; a long turn weighs more than a one-word reply.
- ``mean``: the mean of the per-turn IFDs (every turn counts the same).
- ``last``: the last assistant turn only (what single-turn selection code sees of a chat).

Per-turn values go to ``meta.ifd_turns``. The row is truncated when any turn is.

With ``cache`` set, each (model, template settings, context, answer) result is kept in a
``ScoreCache`` (sqlite), so re-running selection with another threshold or budget, or on a grown
pool, makes no forward pass for what was scored before (docs/selection.md#score-then-select-everything-cached).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from ..errors import UserError
from ..models.fingerprint import model_fingerprint
from ..models.lm_score import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, AnswerNLL, answer_nll
from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from .turns import assistant_turns

Template = Literal["plain", "alpaca", "chat"]
MultiTurn = Literal["pooled", "mean", "last"]

# Cherry_LLM's PROMPT_DICT (cherry_seletion/data_analysis.py), the Stanford Alpaca prompts
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:"
ALPACA_RESPONSE_HEADER = "### Response:"  # Cherry's direct_answer_text = '### Response:' + output
DEFAULT_MAX_IFD = 1.0  # Cherry_LLM data_by_IFD.py and Superfiltering filter_threash: drop IFD > 1
_MAX_EXP = 709.0  # math.exp overflows a float64 above ~709.78
_CACHE_VERSION = "ifd-v1"  # bump when what is cached per (context, answer) changes


class IFDConfig(StageConfig):
    model: str  # Hub name or local folder (safetensors only); required: no sensible default model
    template: Template = "plain"  # plain works with any model, base models too (Superfiltering, docs/sources.md#superfiltering)
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=2)  # Cherry_LLM's analysis length (docs/sources.md#ifd)
    forward_batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)  # sequences per forward (batch_size: rows per call)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # Cherry_LLM scores in fp32 (docs/sources.md#ifd)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when visible
    max_ifd: float | None = Field(DEFAULT_MAX_IFD, gt=0)  # None: keep any IFD
    drop_truncated: bool = True  # Cherry_LLM drops truncated samples (docs/sources.md#ifd): a cut sample's IFD is not comparable
    multi_turn: MultiTurn = "pooled"  # see the module docstring
    cache: str | None = None  # ScoreCache sqlite path: re-runs make no forward for cached pairs
    scores_prefix: str = ""  # e.g. "gpt2_" -> scores.gpt2_ifd, so two ifd stages can coexist


@dataclass(frozen=True)
class TurnNLL:
    """One assistant turn's sums: conditional and alone NLL over its scored answer tokens."""

    cond_total: float
    cond_tokens: int
    alone_total: float
    alone_tokens: int
    truncated: bool

    @classmethod
    def of(cls, r: AnswerNLL) -> TurnNLL:
        return cls(r.conditional.total, r.conditional.tokens, r.alone.total, r.alone.tokens, r.truncated)

    def to_json(self) -> list:
        return [self.cond_total, self.cond_tokens, self.alone_total, self.alone_tokens, int(self.truncated)]

    @classmethod
    def from_json(cls, v: list) -> TurnNLL:
        return cls(float(v[0]), int(v[1]), float(v[2]), int(v[3]), bool(v[4]))


def ratios(cond_total: float, cond_tokens: int, alone_total: float, alone_tokens: int) -> dict[str, float] | None:
    """IFD (loss ratio), the ppl ratio and both token means; None when either side scored nothing."""
    if not cond_tokens or not alone_tokens:
        return None
    cond, alone = cond_total / cond_tokens, alone_total / alone_tokens
    if not (math.isfinite(cond) and math.isfinite(alone)):
        raise ValueError(f"non-finite NLL (cond {cond}, alone {alone}): the model output overflowed")
    if alone <= 0.0:
        return None  # a perfectly predicted answer: the ratio is undefined
    return {"ifd": cond / alone, "ifd_ppl_ratio": math.exp(min(cond - alone, _MAX_EXP)),
            "ifd_loss_cond": cond, "ifd_loss_alone": alone}


def aggregate(turns: Sequence[TurnNLL], how: MultiTurn) -> tuple[dict[str, float] | None, int]:
    """(the row's IFD values or None, the answer tokens they rest on) from its turns."""
    if not turns:
        return None, 0
    if how == "last":
        t = turns[-1]
        return ratios(t.cond_total, t.cond_tokens, t.alone_total, t.alone_tokens), t.cond_tokens
    tokens = sum(t.cond_tokens for t in turns)
    if how == "pooled":
        return ratios(sum(t.cond_total for t in turns), tokens,
                      sum(t.alone_total for t in turns), sum(t.alone_tokens for t in turns)), tokens
    if how == "mean":
        per = [r for t in turns if (r := ratios(t.cond_total, t.cond_tokens, t.alone_total, t.alone_tokens))]
        if not per:
            return None, tokens
        return {k: sum(r[k] for r in per) / len(per) for k in per[0]}, tokens
    raise ValueError(f"multi_turn must be pooled, mean or last, got {how!r}")


def _plain_context(row: dict, context: list[dict], single: bool) -> str:
    """Superfiltering's PROMPT_DICT_NONE: ``instruction\\n[input\\n]``; a chat's earlier messages each + ``\\n``."""
    if single and isinstance(row.get("instruction"), str):
        extra = row.get("input") or ""
        return row["instruction"] + "\n" + (extra + "\n" if extra.strip() else "")
    return "".join((m.get("content") or "") + "\n" for m in context)


def _alpaca_context(row: dict, context: list[dict], single: bool) -> str:
    """Cherry_LLM's PROMPT_DICT; earlier turns of a chat as Instruction / Response blocks, a system
    message in the preamble's place."""
    if single and isinstance(row.get("instruction"), str):
        extra = row.get("input") or ""
        if extra.strip():
            return ALPACA_PROMPT_INPUT.format(instruction=row["instruction"], input=extra)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])
    head = ALPACA_PREAMBLE
    blocks = []
    for m in context:
        content = m.get("content") or ""
        if m.get("role") == "system":
            head = content
        elif m.get("role") == "user":
            blocks.append(f"### Instruction:\n{content}\n\n")
        else:
            blocks.append(f"{ALPACA_RESPONSE_HEADER}{content}\n\n")
    return head + "\n\n" + "".join(blocks) + ALPACA_RESPONSE_HEADER


def render_turns(row: dict, template: Template) -> list[tuple[Any, str]]:
    """(prompt, answer) per assistant turn: a rendered string, or for ``chat`` the context messages."""
    turns = assistant_turns(row)
    single = len(turns) == 1
    if template == "chat":
        return [([{"role": m["role"], "content": m.get("content") or ""} for m in ctx], a) for ctx, a in turns]
    render = _plain_context if template == "plain" else _alpaca_context
    return [(render(row, ctx, single), a) for ctx, a in turns]


def chat_header(tokenizer: Any) -> str:
    """The assistant header the chat template writes before a reply (ChatML: ``<|im_start|>assistant\\n``)."""
    probe = [{"role": "user", "content": "x"}]
    closed = tokenizer.apply_chat_template(probe, tokenize=False)
    opened = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    return opened[len(closed):] if opened.startswith(closed) else ""


@register("ifd")
class IFD(Scorer, Filter):
    """Scores IFD (loss ratio) and its ppl-ratio variant per row; drops truncated rows and IFD > max_ifd."""

    Config = IFDConfig
    resources = ("model", "tokenizer", "nll_args", "what", "fingerprint", "cache")

    def __init__(self, config: IFDConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.counts: Counter = Counter()  # model work since the last tally: pairs scored, cache hits

    def build(self) -> None:
        from ..models.lm_score import CausalLMScorer, LMScoreSettings
        from ..models.score_cache import ScoreCache

        c = self.config
        settings = LMScoreSettings(model=c.model, max_length=c.max_length, batch_size=c.forward_batch_size,
                                   dtype=c.dtype, device=c.device)
        scorer = CausalLMScorer(settings)  # loads once per worker process (models.cache.shared)
        self.model, self.tokenizer = scorer.model, scorer.tokenizer
        tok = self.tokenizer
        if c.template == "chat":
            if not getattr(tok, "chat_template", None):
                raise UserError(f"template 'chat' needs a tokenizer with a chat template; {c.model} has none "
                                "(use template 'plain' or 'alpaca')")
            header = chat_header(tok)
            # a template whose header opens with the BOS token (SmolLM2's BOS is <|im_start|>) must
            # not get a second one in front of the alone pass
            starts = tok.bos_token_id is not None and not header.startswith(str(tok.bos_token))
            self.nll_args = {"prompt_format": "chat", "alone_context": header, "alone_prefix": "bos" if starts else "none"}
        elif c.template == "alpaca":
            self.nll_args = {"prompt_format": "plain", "separator": "", "prefix": "bos", "alone_prefix": "bos",
                             "alone_context": ALPACA_RESPONSE_HEADER}
        else:
            self.nll_args = {"prompt_format": "plain", "separator": "", "prefix": "none", "alone_prefix": "none"}
        self.what = f"{_CACHE_VERSION}:{c.template}:max_length={c.max_length}:dtype={c.dtype}"
        self.fingerprint = model_fingerprint(c.model, self.model)
        self.cache = ScoreCache(c.cache) if c.cache else None

    def teardown(self) -> None:
        if self.__dict__.get("cache") is not None:  # only a built cache: teardown never builds one
            self.cache.close()
        super().teardown()

    def _key(self, prompt: Any, answer: str) -> str:
        from ..models.score_cache import cache_key

        context = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)
        return cache_key(self.fingerprint, self.what, context, answer)

    def turn_nll(self, pairs: Sequence[tuple[Any, str]]) -> list[TurnNLL]:
        """Each (prompt, answer)'s sums: from the cache, else all missing pairs in one batched call."""
        c = self.config
        keys = [self._key(p, a) for p, a in pairs]
        found = {k: TurnNLL.from_json(v) for k, v in self.cache.get_json(keys).items()} if self.cache else {}
        todo: dict[str, tuple[Any, str]] = {}
        for key, pair in zip(keys, pairs):
            if key not in found:
                todo.setdefault(key, pair)  # a pair seen twice in a batch is scored once
        self.counts["cache_hits"] += len(keys) - len(todo)
        self.counts["pairs_scored"] += len(todo)
        if todo:
            prompts, answers = zip(*todo.values())
            results = answer_nll(self.model, self.tokenizer, list(prompts), list(answers), max_length=c.max_length,
                                 batch_size=c.forward_batch_size, **self.nll_args)
            fresh = {k: TurnNLL.of(r) for k, r in zip(todo, results)}
            if self.cache is not None:
                self.cache.put_json([(k, t.to_json()) for k, t in fresh.items()])
            found.update(fresh)
        return [found[k] for k in keys]

    def score(self, rows: list[dict]) -> list[dict]:
        c, p = self.config, self.config.scores_prefix
        per_row = [render_turns(row, c.template) for row in rows]
        flat = self.turn_nll([pair for pairs in per_row for pair in pairs])
        out, at = [], 0
        for row, pairs in zip(rows, per_row):
            turns, at = flat[at : at + len(pairs)], at + len(pairs)
            values, tokens = aggregate(turns, c.multi_turn)
            scores: dict[str, float | int] = {f"{p}ifd_tokens": tokens,
                                              f"{p}ifd_truncated": int(any(t.truncated for t in turns))}
            scores.update({f"{p}{k}": v for k, v in (values or {}).items()})
            per_turn = []
            for t in turns:
                item: dict[str, float | int] = {"tokens": t.cond_tokens, "truncated": int(t.truncated)}
                item.update({k.removeprefix("ifd_"): v for k, v in
                             (ratios(t.cond_total, t.cond_tokens, t.alone_total, t.alone_tokens) or {}).items()})
                per_turn.append(item)
            meta = {**(row.get("meta") or {}), f"{p}ifd_turns": per_turn}
            out.append({**row, "scores": {**(row.get("scores") or {}), **scores}, "meta": meta})
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        c, p, scores = self.config, self.config.scores_prefix, row.get("scores") or {}
        if c.drop_truncated and scores.get(f"{p}ifd_truncated"):
            return False, "truncated"
        value = scores.get(f"{p}ifd")
        if value is None:
            return False, "no_answer_tokens"
        if c.max_ifd is not None and value > c.max_ifd:
            return False, "ifd_above_max"
        return True, None

    def tally(self, rows: list[dict]) -> dict[str, int]:
        # truncation is never silent: the run report counts it, as for perplexity
        p = self.config.scores_prefix
        work, self.counts = dict(self.counts), Counter()  # what the last score() call did
        return {"truncated": sum(1 for r in rows if (r.get("scores") or {}).get(f"{p}ifd_truncated")),
                "multi_turn": sum(1 for r in rows if len((r.get("meta") or {}).get(f"{p}ifd_turns") or []) > 1),
                **work}
