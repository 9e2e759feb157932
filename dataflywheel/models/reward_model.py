"""A trained reward model as a scorer: ``RewardModel(path).score(rows) -> [reward]``.

A reward model is a 1-logit head on a causal LM's backbone (``train/rm.py`` trains one with
Bradley–Terry on preference pairs). The reward of a conversation is the head applied to the hidden
state of its last real token, found from the attention mask (rows are right-padded). We run the
backbone and the head ourselves rather than calling ``...ForSequenceClassification.forward``:
transformers finds the last token as the last one that is not ``pad_token_id``, which is the wrong
token whenever pad == eos and a chat ends with eos (trl#1623). ``last_token_rewards`` is the one
function that reads rewards, in training and in scoring alike.

This is the inference side only (no optimizer, no data lint), so the scorers (``synth/score.py``,
GRPO's reward, Beam's RunInference handler) load a reward model without importing the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dataflywheel.errors import UserError
from dataflywheel.io import fs
from dataflywheel.models.cache import shared
from dataflywheel.models.label_logps import unwrap
from dataflywheel.models.lm_score import resolve_device
from dataflywheel.models.tiny_lm import load_fp32


def reward_head(model: Any) -> torch.nn.Module:
    """The 1-logit head of a sequence classifier."""
    for name in ("score", "classifier"):  # Llama / Qwen / Mistral / GPT-2 use score; BERT-likes classifier
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise UserError(f"{type(model).__name__} has no score/classifier head to read rewards from")


def last_token_rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] right-padded ids and mask -> [B] rewards: the head at each row's last real token."""
    model = unwrap(model)  # a LoRA reward model (train/lora.py): its base, adapters inside
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(-1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return reward_head(model)(picked).squeeze(-1).float()


def chat_ids(tokenizer: Any, messages: Sequence[dict], template: str | None = None) -> list[int]:
    """A whole conversation's token ids as training reads them (``train/data.tokenize_chat``): the
    chat template without a generation prompt, tokenized without added special tokens (the template
    writes BOS; adding it again is the double-BOS bug, trl#1400)."""
    kw = {"chat_template": template} if template else {}
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False, **kw)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


class RewardModel:
    """A trained reward model folder (or Hub reward model) as a scorer: ``.score(rows) -> [reward]``.

    Rows are Conversation rows (``messages``) or prompt + completion rows (each a string or messages).
    A conversation's reward is the head at the last token of its rendered chat, as in training. Rows
    are sorted by length and batched (little padding); the model loads once per process. On CUDA the
    forward runs under bf16 autocast, as the training loop's does.
    """

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 16, chat_template: str | None = None):
        self.device = resolve_device(device)
        self.batch_size, self.chat_template = batch_size, chat_template
        folder = Path(fs.local_copy(path)).expanduser()  # a model in a bucket: its cached local copy
        name = str(folder.resolve()) if folder.is_dir() else str(path)

        def load() -> tuple[Any, Any]:
            model, tok = load_fp32(name, head="seq_cls")
            return model.to(self.device).eval(), tok

        self.model, self.tok = shared(f"reward_model:{name}:{self.device}", load)
        # rewards are read at the last token: an over-long chat keeps its end
        self.max_tokens = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30

    def encode(self, row: dict) -> list[int]:
        if "messages" in row:
            messages = list(row["messages"])
        elif "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)) + (
                [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion))
        else:
            raise UserError(f"row {row.get('id', '?')}: a reward needs messages, or prompt and completion")
        return chat_ids(self.tok, messages, self.chat_template)[-self.max_tokens:]

    def _autocast(self) -> Any:
        if self.device.startswith("cuda"):
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def score(self, rows: Sequence[dict]) -> list[float]:
        seqs = [self.encode(r) for r in rows]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        for at in range(0, len(order), self.batch_size):
            idx = order[at:at + self.batch_size]
            ids, mask = _padded([seqs[i] for i in idx], self.tok.pad_token_id)
            with self._autocast():
                rewards = last_token_rewards(self.model, ids.to(self.device), mask.to(self.device))
            for i, r in zip(idx, rewards.tolist()):
                out[i] = r
        return out


def score_rows(path: str | Path, rows: Sequence[dict], **kwargs: Any) -> list[float]:
    """Rewards of ``rows`` under the reward model at ``path`` (see ``RewardModel``)."""
    return RewardModel(path, **kwargs).score(rows)
