"""The three record kinds (docs/concepts.md#records) and their validation.

Rows are plain dicts in the Hugging Face / TRL field conventions:

- Document:      ``id``, ``text`` (or ``html`` before extraction); optional ``url``, ``lang``, ``source``
- Conversation:  ``id``, ``messages: [{role, content}]``
- Preference:    ``id``, ``prompt: [messages]``, ``chosen: [messages]``, ``rejected: [messages]``

Every row may carry ``meta`` (dict), ``scores`` (dict of numbers) and ``tags`` (list).
``validate(kind, row)`` returns the normalized row or raises ``RecordError`` with a reason code
and the path of the offending field. Normalizations (documented, nothing else is changed):

- a missing ``id`` becomes a content hash; an integer ``id`` becomes its decimal string;
- preference rows in TRL's other accepted shapes are converted to the conversational explicit
  form: plain strings (``prompt``/``chosen``/``rejected``), implicit prompts (full ``chosen`` and
  ``rejected`` conversations sharing a prefix), and HH-RLHF transcripts (``\\n\\nHuman:`` ...).

Message content must be a string: OpenAI-style lists of parts are rejected as ``wrong_type``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from .errors import RecordError

KINDS = ("document", "conversation", "preference", "prompt", "unpaired")
ROLES = ("system", "user", "assistant")
ID_HEX_CHARS = 16  # 64 bits of sha256: collisions are negligible below ~10^9 rows


def content_id(*parts: Any) -> str:
    """Stable id from content: sha256 of canonical JSON, so equal content gives equal ids."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_str(row: dict, key: str, path: str | None = None, *, allow_empty: bool = False) -> str:
    path = path or key
    if key not in row:
        raise RecordError("missing_field", path, "required")
    value = row[key]
    if not isinstance(value, str):
        raise RecordError("wrong_type", path, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise RecordError("empty_value", path, "empty or whitespace only")
    if "\x00" in value:
        raise RecordError("nul_in_text", path, "contains U+0000")
    return value


def _check_common(row: Any) -> dict:
    if not isinstance(row, dict):
        raise RecordError("not_an_object", "<row>", f"expected a JSON object, got {_type_name(row)}")
    if "id" in row and row["id"] is not None:
        rid = row["id"]
        if isinstance(rid, int) and not isinstance(rid, bool):
            row = {**row, "id": str(rid)}
        elif not isinstance(rid, str) or not rid.strip():
            raise RecordError("wrong_type", "id", f"expected a non-empty string, got {_type_name(rid)}")
    for key, kind in (("meta", dict), ("scores", dict), ("tags", list)):
        if key in row and row[key] is not None and not isinstance(row[key], kind):
            raise RecordError("wrong_type", key, f"expected {kind.__name__}, got {_type_name(row[key])}")
    scores = row.get("scores") or {}
    for name, value in scores.items():
        if value is not None and not isinstance(value, (int, float)):
            raise RecordError("wrong_type", f"scores.{name}", f"expected a number, got {_type_name(value)}")
    return row


def _with_id(row: dict, *content: Any) -> dict:
    if row.get("id") is None:
        row = {**row, "id": content_id(*content)}
    return row


def validate_document(row: Any) -> dict:
    row = _check_common(row)
    if "text" in row or "html" not in row:
        _require_str(row, "text")
        return _with_id(row, row["text"])
    # A raw page before extraction: html may be empty here; extraction decides what it is worth.
    if not isinstance(row["html"], str):
        raise RecordError("wrong_type", "html", f"expected a string, got {_type_name(row['html'])}")
    return _with_id(row, row.get("url"), row["html"])


def check_messages(messages: Any, field: str = "messages", *, final_assistant: bool = True) -> list:
    """Check a chat: at most one system message and only first, then user/assistant alternating,
    starting with user and (if ``final_assistant``) ending with assistant."""
    if not isinstance(messages, list):
        raise RecordError("wrong_type", field, f"expected a list of messages, got {_type_name(messages)}")
    if not messages:
        raise RecordError("empty_value", field, "no messages")
    for i, msg in enumerate(messages):
        path = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", path, f"expected an object with role and content, got {_type_name(msg)}")
        if "role" not in msg:
            raise RecordError("missing_field", f"{path}.role", "required")
        if msg["role"] not in ROLES:
            raise RecordError("invalid_role", f"{path}.role", f"{msg['role']!r} is not one of {'/'.join(ROLES)}")
        _require_str(msg, "content", f"{path}.content")
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise RecordError("bad_turn_order", f"{field}[{roles.index('system', 1)}].role", "system message only allowed first")
    if not body:
        raise RecordError("no_user_or_assistant", field, "system message only")
    if "user" not in body:
        raise RecordError("no_user_turn", field, "no user turn")
    offset = len(roles) - len(body)
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError("bad_turn_order", f"{field}[{i + offset}].role", f"expected {expected}, got {role}")
    if final_assistant and body[-1] != "assistant":
        raise RecordError("no_final_assistant", field, "conversation must end with an assistant turn")
    return messages


def alpaca_user_turn(instruction: str, extra: str) -> str:
    """Alpaca's instruction and optional input as one user turn (blank line between, as Alpaca renders them)."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _alpaca_messages(row: dict) -> list:
    """Alpaca-style ``instruction`` (+ ``input``) + ``output`` as a user and an assistant turn."""
    instruction, output = _require_str(row, "instruction"), _require_str(row, "output")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError("wrong_type", "input", f"expected a string, got {_type_name(extra)}")
    return [{"role": "user", "content": alpaca_user_turn(instruction, extra)}, {"role": "assistant", "content": output}]


def validate_conversation(row: Any) -> dict:
    """``messages``; an Alpaca-style row (instruction, input, output) gets them built from its fields,
    which stay on the row (the Alpaca prompt template of IFD scoring reads them)."""
    row = _check_common(row)
    if "messages" not in row and "instruction" in row:
        row = {**row, "messages": _alpaca_messages(row)}
    if "messages" not in row:
        raise RecordError("missing_field", "messages", "required (or instruction and output)")
    check_messages(row["messages"])
    return _with_id(row, row["messages"])


def validate_prompt(row: Any) -> dict:
    """A prompt to generate from (TRL's prompt-only form): ``prompt`` as messages ending with a user
    turn, or as a string (one user turn); Alpaca-style ``instruction`` (+ ``input``) works too, and
    so does ``messages`` ending with a user turn (the GRPO prompt files, e.g. data/demo/arithmetic_prompts)."""
    row = _check_common(row)
    if "prompt" not in row and "instruction" not in row and isinstance(row.get("messages"), list):
        row = {**{k: v for k, v in row.items() if k != "messages"}, "prompt": row["messages"]}
    if "prompt" not in row and "instruction" in row:
        instruction = _require_str(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise RecordError("wrong_type", "input", f"expected a string, got {_type_name(extra)}")
        row = {**row, "prompt": [{"role": "user", "content": alpaca_user_turn(instruction, extra)}]}
    if "prompt" not in row:
        raise RecordError("missing_field", "prompt", "required (or instruction)")
    if isinstance(row["prompt"], str):
        _require_str(row, "prompt")
        row = {**row, "prompt": [{"role": "user", "content": row["prompt"]}]}
    check_messages(row["prompt"], "prompt", final_assistant=False)
    if row["prompt"][-1]["role"] != "user":
        raise RecordError("bad_turn_order", f"prompt[{len(row['prompt']) - 1}].role", "a prompt must end with a user turn")
    return _with_id(row, row["prompt"])


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str, field: str) -> list[dict]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages (the HH-RLHF release format)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise RecordError("unparseable_transcript", field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' markers")
    if parts[0].strip():
        raise RecordError("unparseable_transcript", field, "text before the first Human:/Assistant: marker")
    role_of = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role_of[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _split_final_assistant(messages: list, field: str) -> tuple[list, list]:
    check_messages(messages, field)
    return messages[:-1], messages[-1:]


def _preference_from_implicit(row: dict) -> tuple[list, list, list]:
    """TRL implicit prompt: chosen/rejected are full conversations (or HH transcripts)."""
    convs = {}
    for key in ("chosen", "rejected"):
        value = row[key]
        if isinstance(value, str):
            _require_str(row, key)
            value = parse_hh_transcript(value, key)
        convs[key] = _split_final_assistant(value, key)
    (p_chosen, chosen), (p_rejected, rejected) = convs["chosen"], convs["rejected"]
    if p_chosen != p_rejected:
        raise RecordError("prompt_mismatch", "rejected", "chosen and rejected answer different prompts")
    return p_chosen, chosen, rejected


def validate_preference(row: Any) -> dict:
    row = _check_common(row)
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RecordError("missing_field", key, "required")
    if row.get("prompt") is None and "prompt" not in row:
        prompt, chosen, rejected = _preference_from_implicit(row)
    elif isinstance(row["prompt"], str):
        prompt = [{"role": "user", "content": _require_str(row, "prompt")}]
        chosen = [{"role": "assistant", "content": _require_str(row, "chosen")}]
        rejected = [{"role": "assistant", "content": _require_str(row, "rejected")}]
    else:
        prompt = check_messages(row["prompt"], "prompt", final_assistant=False)
        if prompt[-1]["role"] != "user":
            raise RecordError("bad_turn_order", f"prompt[{len(prompt) - 1}].role", "prompt must end with a user turn")
        chosen = check_messages(prompt + _as_list(row["chosen"], "chosen"), "chosen")[len(prompt):]
        rejected = check_messages(prompt + _as_list(row["rejected"], "rejected"), "rejected")[len(prompt):]
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        raise RecordError("identical_chosen_rejected", "rejected", "chosen and rejected are identical")
    out = {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    return _with_id(out, prompt, chosen, rejected)


def validate_unpaired(row: Any) -> dict:
    """TRL's unpaired preference row (KTO's data): ``prompt`` (a string or messages ending with a user
    turn), ``completion`` (a string or assistant messages) and a boolean ``label`` (True: desirable)."""
    row = _check_common(row)
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise RecordError("missing_field", key, "required")
    if not isinstance(row["label"], bool):
        raise RecordError("wrong_type", "label", f"expected true or false, got {_type_name(row['label'])}")
    if isinstance(row["prompt"], str):
        prompt = [{"role": "user", "content": _require_str(row, "prompt")}]
    else:
        prompt = check_messages(row["prompt"], "prompt", final_assistant=False)
        if prompt[-1]["role"] != "user":
            raise RecordError("bad_turn_order", f"prompt[{len(prompt) - 1}].role", "prompt must end with a user turn")
    if isinstance(row["completion"], str):
        completion = [{"role": "assistant", "content": _require_str(row, "completion")}]
    else:
        completion = check_messages(prompt + _as_list(row["completion"], "completion"), "completion")[len(prompt):]
    out = {**row, "prompt": prompt, "completion": completion}
    return _with_id(out, prompt, completion, row["label"])


def _as_list(value: Any, field: str) -> list:
    if not isinstance(value, list):
        raise RecordError("wrong_type", field, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise RecordError("empty_value", field, "no messages")
    return value


VALIDATORS: dict[str, Callable[[Any], dict]] = {
    "document": validate_document,
    "conversation": validate_conversation,
    "preference": validate_preference,
    "prompt": validate_prompt,
    "unpaired": validate_unpaired,
}


def validate(kind: str, row: Any) -> dict:
    """Validate and normalize one row of ``kind``; raises ``RecordError`` naming the field."""
    if kind not in VALIDATORS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    return VALIDATORS[kind](row)


# ---- identity: what the run's accounting counts ------------------------------------------------

MASK64 = (1 << 64) - 1


def row_key(row: dict) -> int:
    """A row's identity as 64 bits (xxh3): its ``id`` (a stage's dead letter carries its record's
    id); a row without one is identified by its content."""
    rid = row.get("id") if isinstance(row, dict) else None
    text = str(rid) if rid is not None else json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def checksum(rows: Iterable[dict]) -> int:
    """Order-independent checksum of row identities: the sum of ``row_key`` mod 2^64."""
    return sum(map(row_key, rows)) & MASK64
