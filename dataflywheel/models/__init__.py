"""Load-once model handles: fastText LID, sentence embedder, causal LMs (and tiny ones built locally).

Heavy libraries (fastText, torch, transformers) are imported inside the loaders, so importing this
package stays cheap for stages that never touch a model.
"""

from dataflywheel.models.cache import check_sha256, clear, hub_offline, sha256_file, shared
from dataflywheel.models.embedder import MINILM_SHA256, embed, load_embedder, minilm_path
from dataflywheel.models.lid import LID176_FTZ_SHA256, lid_model_path, load_lid, predict_languages
from dataflywheel.models.tiny_lm import (
    CHAT_TEMPLATE,
    build_tiny_causal_lm,
    load_causal_lm,
    train_bpe_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "LID176_FTZ_SHA256",
    "MINILM_SHA256",
    "build_tiny_causal_lm",
    "check_sha256",
    "clear",
    "embed",
    "hub_offline",
    "lid_model_path",
    "load_causal_lm",
    "load_embedder",
    "load_lid",
    "minilm_path",
    "predict_languages",
    "sha256_file",
    "shared",
    "train_bpe_tokenizer",
]
