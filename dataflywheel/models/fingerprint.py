"""What identifies a model's weights in cache keys (generation cache, score and embedding cache).

A Hub model is its name plus the revision transformers resolved; a local folder is a cheap content
fingerprint, so a model retrained into the same folder gets new keys and stale values are never read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_FINGERPRINT_CHUNKS, _CHUNK = 16, 1 << 16  # bytes read per file to fingerprint a local model folder


def folder_fingerprint(folder: Path) -> str:
    """A cheap content fingerprint of a local model folder (names, sizes and 16 spread 64 KiB
    chunks of every file). It tells models apart; it is not an integrity check."""
    digest = hashlib.blake2b(digest_size=12)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for i in range(_FINGERPRINT_CHUNKS):
                f.seek(size * i // _FINGERPRINT_CHUNKS)
                digest.update(f.read(_CHUNK))
    return "local-" + digest.hexdigest()


def model_fingerprint(name: str, model: Any = None) -> str:
    """A local folder's content fingerprint, else the Hub name plus the revision transformers
    resolved (``model.config._commit_hash``, when a loaded model is given and says)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder_fingerprint(folder)
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    return f"{name}@{revision}"
