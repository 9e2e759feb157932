"""Reward model (train/rm.py, scored by models/reward_model.py): the Bradley–Terry loss, learning a synthetic preference, and score()."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dataflywheel.models.reward_model import RewardModel, last_token_rewards, score_rows
from dataflywheel.models.tiny_lm import CHAT_TEMPLATE, build_tiny_causal_lm
from dataflywheel.train.config import load_train_config
from dataflywheel.train.losses import bradley_terry
from dataflywheel.train.rm import RmConfig, RmLoop, run

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def demo_generator():
    spec = importlib.util.spec_from_file_location("make_demo_prefs", REPO / "scripts" / "make_demo_prefs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_prefs_file_is_regenerated_by_its_script():
    gen = demo_generator()
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gen.rows())
    assert gen.OUT.read_text() == expected
    assert 60 <= len(expected.splitlines()) <= 120


def test_bradley_terry_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    r_c, r_r, m = torch.randn(7, generator=g), torch.randn(7, generator=g), torch.rand(7, generator=g)
    for margin, eta in ((None, None), (m, None), (m, 0.01)):
        total, n = bradley_terry(r_c, r_r, margin, eta)
        expected = 0.0
        for i in range(7):
            d = float(r_c[i] - r_r[i]) - (float(m[i]) if margin is not None else 0.0)
            expected += -math.log(1 / (1 + math.exp(-d))) + (eta or 0.0) * float(r_c[i] + r_r[i]) ** 2
        assert n == 7
        assert float(total) == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny reward model trained on synthetic pairs: chosen answers show the working (the learnable
    signal), rejected ones are hedged bare numbers."""
    tmp = tmp_path_factory.mktemp("rm")
    rows = demo_generator().rows(n_arith=130, n_worded=10, seed=1)
    data = tmp / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for r in rows for k in ("prompt", "chosen", "rejected") for m in r[k]]
    base = build_tiny_causal_lm(tmp / "base", texts=texts, hidden=32, layers=2, heads=2, vocab_size=400)
    cfg = RmConfig(model=str(base), data=[str(data)], output=str(tmp / "out"), eval_fraction=0.25, max_length=128,
                   center_rewards_coefficient=0.01, eval_every=10,
                   loop=RmLoop(lr=1e-3, batch_size=8, max_steps=30, warmup_ratio=0.1, progress=False))
    summary = run(cfg)
    return cfg, summary, rows


def test_rm_learns_and_beats_chance_on_held_out_pairs(trained):
    cfg, summary, _ = trained
    losses = [json.loads(line)["loss"] for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores both sides alike
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3
    assert summary["eval_pairs"] >= 20
    assert summary["eval_accuracy"] >= 0.8
    evals = [json.loads(line) for line in (cfg.out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20]
    assert (cfg.out / "final" / "config.json").is_file()


def test_score_reads_the_trained_token_and_is_batch_invariant(trained):
    cfg, summary, rows = trained
    final = cfg.out / "final"
    convs = [{"messages": r["prompt"] + r[side]} for r in rows for side in ("chosen", "rejected")]
    one = RewardModel(final, device="cpu", batch_size=1).score(convs)
    batched = score_rows(final, convs, device="cpu", batch_size=8)
    assert max(abs(a - b) for a, b in zip(one, batched)) < 1e-5
    # prompt + completion rows (strings) are the same conversations
    flat = [{"prompt": r["prompt"][0]["content"], "completion": r[side][0]["content"]}
            for r in rows for side in ("chosen", "rejected")]
    assert max(abs(a - b) for a, b in zip(one, RewardModel(final, device="cpu").score(flat))) < 1e-5
    # the scorer reads the ids training reads (train/data.tokenize_chat) without importing the trainer
    from dataflywheel.train.data import split_rows, tokenize_chat

    rm = RewardModel(final, device="cpu")
    for conv in convs[:6]:
        ex, _ = tokenize_chat(rm.tok, conv["messages"], 1 << 30, train_from=len(conv["messages"]))
        assert rm.encode(conv) == ex.input_ids
    # score() gives the held-out accuracy training reported: the same token is read

    _, held = split_rows(rows, cfg.eval_fraction)
    pair_scores = RewardModel(final, device="cpu").score(
        [{"messages": r["prompt"] + r[side]} for r in held for side in ("chosen", "rejected")])
    right = sum(c > r for c, r in zip(pair_scores[0::2], pair_scores[1::2]))
    assert right / len(held) == pytest.approx(summary["eval_accuracy"])


def test_score_is_safe_when_pad_is_eos(trained, tmp_path):
    """A chat template ending in EOS with pad == eos: transformers' own head reads the token before the
    EOS (the last one that is not pad); ours reads the true last token from the mask."""
    cfg, _, rows = trained
    ends_in_eos = CHAT_TEMPLATE.replace("{{- '\n' -}}", "")  # no newline after the assistant's EOS
    assert ends_in_eos != CHAT_TEMPLATE
    same = tmp_path / "pad_is_eos"
    shutil.copytree(cfg.out / "final", same)
    conf = json.loads((same / "config.json").read_text())
    tok_conf = json.loads((same / "tokenizer_config.json").read_text())
    eos_id = conf["eos_token_id"]
    conf["pad_token_id"] = eos_id
    tok_conf["pad_token"] = tok_conf["eos_token"]
    (same / "config.json").write_text(json.dumps(conf))
    (same / "tokenizer_config.json").write_text(json.dumps(tok_conf))
    convs = [{"messages": r["prompt"] + r["chosen"]} for r in rows[:12]]
    ref = RewardModel(cfg.out / "final", device="cpu", batch_size=1, chat_template=ends_in_eos).score(convs)
    rm = RewardModel(same, device="cpu", batch_size=6, chat_template=ends_in_eos)
    assert rm.tok.pad_token_id == rm.tok.eos_token_id == eos_id
    assert rm.encode(convs[0])[-1] == eos_id
    assert max(abs(a - b) for a, b in zip(ref, rm.score(convs))) < 1e-5
    # the pitfall is real for this model: transformers' forward reads another token
    ids = torch.tensor([rm.encode(convs[0])])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = float(last_token_rewards(rm.model, ids, mask)[0])
        theirs = float(rm.model(input_ids=ids, attention_mask=mask).logits[0, 0])
    assert abs(ours - ref[0]) < 1e-5
    assert abs(ours - theirs) > 1e-4


def test_train_rm_config_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config's data path is relative to the repository
    cfg = load_train_config(REPO / "configs" / "train_rm.yaml", RmConfig, {"output": str(tmp_path / "rm")})
    cfg.loop.max_steps, cfg.loop.progress = 2, False
    summary = run(cfg)
    assert summary["steps"] == 2 and summary["pairs"] + summary["eval_pairs"] == 100
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert json.loads((tmp_path / "rm" / "summary.json").read_text())["steps"] == 2
