"""Training data: rows in, token ids and labels out, with a linter that stops bad data early.

Labels come from explicit assistant spans, never from ``input_ids != pad`` (which masks EOS when
pad == eos, trl#1623) and never from ``{% generation %}`` blocks alone (stock templates have none,
so TRL's ``assistant_only_loss`` trains nothing, docs/sources.md#chat-templates-and-labels). The
spans come from rendering prefixes of the chat: assistant turn i spans from the end of
``render(messages[:i], generation prompt)`` to the end of ``render(messages[:i+1])``, trimmed
after its end-of-turn token so EOS is trained and the template's trailing newline is not. The full
chat is rendered once and tokenized once without added special tokens (the template writes BOS:
tokenizing with special tokens again is the double-BOS bug, trl#1400), and a token is a target
when it starts inside an assistant span.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dataflywheel.errors import UserError
from dataflywheel.io import read
from dataflywheel.io.base import DeadLetter

from .losses import IGNORE

# End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Mistral/Llama 2): any of them
# present in a tokenizer's vocabulary counts as "EOS trained" alongside the tokenizer's own EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|end|>", "<|endoftext|>")
LINT_PROBLEMS = {
    "unreadable": "rows that could not be read or are not valid records",
    "no_trainable_tokens": "rows with no assistant token to train on",
    "truncated_to_nothing": "rows whose assistant tokens all fall beyond max_length",
    "double_bos": "rows starting with BOS twice",
    "missing_eos": "rows with an assistant turn not ending in EOS / end-of-turn",
    "identical_pair": "preference pairs with identical chosen and rejected",
    "pair_too_long": "preference pairs longer than max_length (filtered, not truncated, as TRL's RewardTrainer)",
}


@dataclass
class Example:
    """One tokenized chat: ``labels`` is IGNORE except on trained tokens; ``truncated``: cut at max_length."""

    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class Lint:
    """Linter findings: counts per problem and the first few row ids (or file:line) of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0  # rows cut at max_length that still have targets (allowed, reported)
    rows: int = 0  # input records dropped (a row with two problems counts once): in == kept + rows

    def add(self, problem: str, where: str, rows: int = 1) -> None:
        """Count ``problem`` at ``where``; ``rows``: the input records it drops (0 for a row already counted)."""
        self.rows += rows
        self.counts[problem] += 1
        self.examples.setdefault(problem, [])
        if len(self.examples[problem]) < 3:
            self.examples[problem].append(where)

    def summary(self) -> str:
        return "; ".join(f"{n} {p} (e.g. {', '.join(self.examples[p])})" for p, n in sorted(self.counts.items()))

    def enforce(self, policy: str, what: str) -> None:
        """``fail``: any finding raises one line with every count; ``drop``: the caller drops them."""
        if self.counts and policy == "fail":
            raise UserError(f"{what}: data lint failed: {self.summary()}; fix the data, or set lint: drop to "
                            "train without those rows")


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in END_OF_TURN if t in vocab}


def _render(tokenizer: Any, messages: Sequence[dict], template: str | None, generation_prompt: bool = False) -> str:
    kw = {"chat_template": template} if template else {}
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt, **kw)


def use_chat_template(tokenizer: Any, template: str | None, model: str) -> None:
    """Put the config's template override on a training run's (private) tokenizer, so every render
    and the saved model use it; fail in one line when there is no template at all."""
    if template:
        tokenizer.chat_template = template
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {model} has no chat template: set chat_template in the config")


def assistant_spans(tokenizer: Any, messages: Sequence[dict], train_from: int = 0,
                    template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of the assistant turns at index >= ``train_from``."""
    text = _render(tokenizer, messages, template)
    eos_text = [t for t in (tokenizer.eos_token, *END_OF_TURN) if t]
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < train_from:
            continue
        before = _render(tokenizer, messages[:i], template, generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], template)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise UserError(f"the chat template does not render turn {i} as a prefix of the whole chat (e.g. it "
                            "rewrites earlier turns): assistant tokens cannot be located; set chat_template")
        start, end = len(before), len(upto)
        piece = text[start:end]
        cut = max((piece.rfind(t) + len(t) for t in eos_text if t in piece), default=-1)
        spans.append((start, start + cut if cut > 0 else end))
    return text, spans


def tokenize_chat(tokenizer: Any, messages: Sequence[dict], max_length: int, *, row_id: str = "",
                  train_from: int = 0, template: str | None = None) -> tuple[Example, int]:
    """``(example cut to max_length, number of targets before the cut)``. Truncation keeps the start (TRL)."""
    text, spans = assistant_spans(tokenizer, messages, train_from, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    at = 0
    for j, (start, _end) in enumerate(offsets):
        while at < len(spans) and start >= spans[at][1]:
            at += 1
        if at < len(spans) and spans[at][0] <= start < spans[at][1]:
            labels[j] = ids[j]
    before = Example(row_id, ids, labels).targets
    return Example(row_id, ids[:max_length], labels[:max_length], len(ids) > max_length), before


def lint_example(ex: Example, before: int, tokenizer: Any, eot: set[int], lint: Lint) -> bool:
    """Record ``ex``'s problems in ``lint``; True when it is clean."""
    problems = []
    if before == 0:
        problems.append("no_trainable_tokens")
    elif ex.targets == 0:
        problems.append("truncated_to_nothing")
    bos = tokenizer.bos_token_id
    if bos is not None and len(ex.input_ids) > 1 and ex.input_ids[0] == bos == ex.input_ids[1]:
        problems.append("double_bos")
    if not ex.truncated and before:
        # the last token of every run of targets must end the turn (trl#1623: EOS never trained)
        ends = [ex.labels[j] for j in range(1, len(ex.labels))
                if ex.labels[j] != IGNORE and (j + 1 == len(ex.labels) or ex.labels[j + 1] == IGNORE)]
        if any(tok not in eot for tok in ends):
            problems.append("missing_eos")
    for i, p in enumerate(problems):
        lint.add(p, ex.id, rows=int(i == 0))
    return not problems


def read_rows(paths: Sequence[str], kind: str, lint: Lint) -> list[dict]:
    """Validated rows of every path; unreadable ones go to the linter with their file:line and reason."""
    rows = []
    try:
        items = read(list(paths), kind=kind)
        for item in items:
            if isinstance(item, DeadLetter):
                lint.add("unreadable", str(item), rows=item.records)
            else:
                rows.append(item)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    if not rows and not lint.counts:
        raise UserError(f"no {kind} rows in {', '.join(paths)}")
    return rows


def load_split(data: Sequence[str], eval_data: Sequence[str], eval_fraction: float, kind: str,
               lint: Lint) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): ``eval_data`` when given, else ``eval_fraction`` split off by id hash."""
    rows = read_rows(data, kind, lint)
    if eval_data:
        return rows, read_rows(eval_data, kind, lint)
    return split_rows(rows, eval_fraction)


def is_eval(row_id: str, fraction: float) -> bool:
    """A stable held-out split by id hash: the same rows are held out whatever the file order."""
    h = int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def split_rows(rows: Iterable[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for row in rows:
        (held if is_eval(row["id"], fraction) else train).append(row)
    return train, held


def sft_examples(rows: Sequence[dict], tokenizer: Any, max_length: int, lint: Lint,
                 template: str | None = None) -> list[Example]:
    """Tokenize conversation rows, lint them; the returned list holds the clean ones only."""
    eot = end_of_turn_ids(tokenizer)
    out = []
    for row in rows:
        ex, before = tokenize_chat(tokenizer, row["messages"], max_length, row_id=row["id"], template=template)
        if lint_example(ex, before, tokenizer, eot, lint):
            out.append(ex)
            lint.truncated += ex.truncated
    return out


@dataclass
class PairExample:
    id: str
    chosen: Example
    rejected: Example
    kl: Example | None = None  # KTO: this prompt with another pair's chosen completion (with_kl_rows)
    # which sides are real rows: an unpaired desirable (undesirable) row left over has a copy of
    # itself on the other side, masked out of the loss (unpaired_examples)
    sides: tuple[bool, bool] = (True, True)


def unpaired_examples(rows: Sequence[dict], tokenizer: Any, max_length: int, lint: Lint,
                      template: str | None = None) -> list[PairExample]:
    """KTO's unpaired rows (prompt, completion, label) as pairs: the i-th desirable row with the i-th
    undesirable row, in file order, and the rows left over (the larger side) each with a masked copy
    of itself. KTO's loss is a sum of per-row terms plus a batch-level reference point, so which rows
    share a pair changes nothing; pairs keep one forward shape for every loss. Over-long rows are
    filtered and counted."""
    eot = end_of_turn_ids(tokenizer)
    good: list[Example] = []
    bad: list[Example] = []
    for row in rows:
        prompt = list(row["prompt"])
        ex, before = tokenize_chat(tokenizer, prompt + list(row["completion"]), max_length, row_id=str(row["id"]),
                                   train_from=len(prompt), template=template)
        if ex.truncated:
            lint.add("pair_too_long", row["id"])
            continue
        if lint_example(ex, before, tokenizer, eot, lint):
            (good if row["label"] else bad).append(ex)
    out = [PairExample(f"{c.id}+{r.id}", c, r) for c, r in zip(good, bad)]
    out += [PairExample(c.id, c, c, sides=(True, False)) for c in good[len(bad):]]
    out += [PairExample(r.id, r, r, sides=(False, True)) for r in bad[len(good):]]
    return out


def with_kl_rows(pairs: Sequence[PairExample], max_length: int) -> list[PairExample]:
    """Each pair gets KTO's mismatched row: its prompt with the previous pair's chosen completion
    (cyclic, as TRL's KTO pairs each row with the previous row's completion). Fixed here, not per
    batch, so the reference's log-probs of these rows can be precomputed and cached like the others."""
    def split(ex: Example) -> int:  # where the completion starts: the first trained label
        return next(i for i, label in enumerate(ex.labels) if label != IGNORE)

    out = []
    for i, p in enumerate(pairs):
        prev = pairs[i - 1].chosen
        cut, at = split(p.chosen), split(prev)
        ids = (p.chosen.input_ids[:cut] + prev.input_ids[at:])[:max_length]
        labels = ([IGNORE] * cut + prev.labels[at:])[:max_length]
        out.append(PairExample(p.id, p.chosen, p.rejected, Example(f"{p.id}:kl", ids, labels), p.sides))
    return out


def pair_examples(rows: Sequence[dict], tokenizer: Any, max_length: int, lint: Lint,
                  template: str | None = None) -> list[PairExample]:
    """Tokenize preference rows (prompt + chosen / rejected; only the completion is trained); lint them.
    Over-long pairs are filtered, not truncated (TRL RewardTrainer), and counted."""
    eot = end_of_turn_ids(tokenizer)
    out = []
    for row in rows:
        prompt = list(row["prompt"])
        sides = []
        for name in ("chosen", "rejected"):
            ex, before = tokenize_chat(tokenizer, prompt + list(row[name]), max_length, row_id=f"{row['id']}",
                                       train_from=len(prompt), template=template)
            sides.append((ex, before))
        (c, cb), (r, rb) = sides
        if c.input_ids == r.input_ids:
            lint.add("identical_pair", row["id"])
            continue
        if c.truncated or r.truncated:
            lint.add("pair_too_long", row["id"])
            continue
        if lint_example(c, cb, tokenizer, eot, lint) and lint_example(r, rb, tokenizer, eot, lint):
            out.append(PairExample(row["id"], c, r))
    return out
