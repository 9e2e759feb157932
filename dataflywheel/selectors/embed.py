"""Row embeddings for diversity selection, cached by (model, part, text) (docs/selection.md#embedding-diversity).

Selection is re-run with new budgets and thresholds far more often than the pool changes, and
embedding is its expensive part (~300 sentences/s for MiniLM on 2 CPU threads, docs/sources.md#minilm-embedder).
With a ``ScoreCache`` every vector is stored under ``cache_key(model id, "embed:<part>", text)``:
a re-run looks them all up and embeds nothing, and a grown pool embeds only its new rows. Vectors
stay in the cache, never on the rows: 384 floats a row would dwarf the row itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..models.embedder import MINILM_SHA256, embed, load_embedder
from ..models.score_cache import ScoreCache, cache_key
from .turns import row_part

EMBED_BATCH = 64  # Superfiltering.D embeds with batch 64 (code_diversity_fla/do_fla.py, docs/sources.md#superfiltering)


def embedder_id(model_name: str | None) -> str:
    """What a cached vector is keyed by: the bundled MiniLM by its weights' hash, a folder by its
    absolute path, a Hub model by its name."""
    if model_name is None:
        return f"all-MiniLM-L6-v2@sha256:{MINILM_SHA256}"
    path = Path(model_name).expanduser()
    return str(path.resolve()) if path.is_dir() else model_name


def row_texts(rows: Sequence[dict], part: str) -> list[str]:
    """The text of each row that gets embedded: ``part`` of a conversation (``selectors/turns.py``),
    or a document's ``text`` whatever the part."""
    return [(row.get("text") or "") if "messages" not in row and "text" in row else row_part(row, part)
            for row in rows]


def text_vectors(texts: Sequence[str], part: str, model_name: str | None = None, cache: ScoreCache | None = None,
                 batch_size: int = EMBED_BATCH, stats: dict[str, int] | None = None) -> np.ndarray:
    """``(len(texts), d)`` float32 L2-normalized vectors; only texts missing from ``cache`` are embedded,
    each distinct text once. ``stats`` (if given) gets ``embedded`` and ``cached`` counts."""
    unique = list(dict.fromkeys(texts))
    found: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}
    if cache is not None:
        model_id = embedder_id(model_name)
        keys = {t: cache_key(model_id, f"embed:{part}", t) for t in unique}
        stored = cache.get_vectors(list(keys.values()))
        found = {t: stored[k] for t, k in keys.items() if k in stored}
    missing = [t for t in unique if t not in found]
    if missing:  # the model loads only when something is missing (once per process: models.cache.shared)
        fresh = embed(load_embedder(model_name), missing, batch_size=batch_size)
        found.update(zip(missing, fresh))
        if cache is not None:
            cache.put_vectors([(keys[t], found[t]) for t in missing])
    if stats is not None:
        stats["embedded"] = stats.get("embedded", 0) + len(missing)
        stats["cached"] = stats.get("cached", 0) + len(unique) - len(missing)
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)


def row_vectors(rows: Sequence[dict], part: str, model_name: str | None = None, cache: ScoreCache | None = None,
                batch_size: int = EMBED_BATCH, stats: dict[str, int] | None = None) -> np.ndarray:
    """Embeddings of ``part`` (instruction | conversation | response) of each row; see ``text_vectors``."""
    return text_vectors(row_texts(rows, part), part, model_name, cache, batch_size, stats)
