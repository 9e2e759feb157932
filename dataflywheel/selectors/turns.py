"""The parts of an SFT row that selection looks at: assistant turns with their context, and texts.

Multi-turn conversations are scored per assistant turn (docs/sources.md#deita: Deita sums complexity x
quality over turns; IFD here is computed per turn and pooled, see ``selectors/ifd.py``). Turn k's
context is every message before it (system, earlier user and assistant turns), so a turn is scored
as the model would see it when trained on the whole conversation.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]


def _messages(row: dict) -> list[Message]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("selection needs a conversation row with messages (input kind: conversation)")
    return messages


def assistant_turns(row: dict) -> list[tuple[list[Message], str]]:
    """(messages before it, its content) for every assistant turn, in order."""
    messages = _messages(row)
    return [(messages[:i], m.get("content") or "") for i, m in enumerate(messages) if m.get("role") == "assistant"]


def instruction_text(row: dict) -> str:
    """The user side: every user turn's content, joined by blank lines (what a tagger or an
    instruction embedding reads)."""
    return "\n\n".join(m.get("content") or "" for m in _messages(row) if m.get("role") == "user")


def conversation_text(row: dict) -> str:
    """Every turn's content, system included, joined by blank lines."""
    return "\n\n".join(m.get("content") or "" for m in _messages(row))


def response_text(row: dict) -> str:
    """Every assistant turn's content, joined by blank lines."""
    return "\n\n".join(m.get("content") or "" for m in _messages(row) if m.get("role") == "assistant")


TEXTS = {"instruction": instruction_text, "conversation": conversation_text, "response": response_text}


def row_part(row: dict, part: str) -> str:
    """``instruction`` | ``conversation`` | ``response`` text of a row."""
    if part not in TEXTS:
        raise ValueError(f"part must be one of {', '.join(TEXTS)}, got {part!r}")
    return TEXTS[part](row)
