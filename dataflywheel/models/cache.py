"""Load-once model cache, plus the checks that guard a load (pinned sha256, Hub offline mode).

Beam calls ``DoFn.setup()`` once per DoFn instance, and one worker runs several instances on
several threads; ``shared`` makes them all hold one model instead of one copy each.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from dataflywheel.errors import UserError

T = TypeVar("T")

_values: dict[str, Any] = {}
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
_offline_guard = threading.RLock()  # re-entrant: a load may nest another load


def shared(key: str, loader: Callable[[], T]) -> T:
    """Return the value cached under ``key``, calling ``loader()`` only the first time.

    A lock per key: two threads asking for the same model wait for one load, while loads of
    different models do not block each other. A loader that raises caches nothing.
    """
    if key in _values:
        return _values[key]
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _values:
            _values[key] = loader()
        return _values[key]


def clear() -> None:
    """Forget every cached value (tests; freeing memory between pipeline stages)."""
    with _locks_guard:
        _values.clear()
        _locks.clear()


_BUF = 1 << 20


def sha256_file(path: Path) -> str:
    """Streamed sha256 of a file (model weights can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BUF):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, fix: str) -> Path:
    """Raise ``UserError`` naming ``path`` and what to do (``fix``) unless its sha256 is ``expected``."""
    if not path.is_file():
        raise UserError(f"model file not found: {path}; {fix}")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise UserError(f"sha256 mismatch for {path}: expected {expected}, got {actual}; {fix}")
    return path


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Block Hugging Face Hub network calls for the duration (loading a local folder).

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into ``constants.HF_HUB_OFFLINE``, so
    setting the environment variable alone is too late when it is already imported; we set both
    and restore both.
    """
    with _offline_guard:
        old_env = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants as hub_constants
        except ImportError:  # sentence-transformers / transformers always bring it; be safe anyway
            hub_constants = None
        old_const = getattr(hub_constants, "HF_HUB_OFFLINE", None)
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            if hub_constants is not None:
                hub_constants.HF_HUB_OFFLINE = old_const
            if old_env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old_env
