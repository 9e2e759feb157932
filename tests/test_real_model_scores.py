"""Scoring stages with a real chat model (SmolLM2-135M-Instruct) on shared data: perplexity tells
real paragraphs from the same words shuffled, IFD equals a per-sample reference computed by hand,
and Deita's digit-probability scores vary across rows."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from dataflywheel.filters.perplexity import Perplexity
from dataflywheel.io import read
from dataflywheel.selectors.deita import DeitaScore
from dataflywheel.selectors.ifd import IFD
from dataflywheel.stages import process_batch

PPL_AUROC_FLOOR = 0.95  # measured 1.000 on 40 article paragraphs (2026-12-06): a wide margin


def auroc(negatives: list[float], positives: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney U statistic)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def paragraphs(shared_data, n: int = 40) -> list[str]:
    truth = json.loads((shared_data / "article_extraction_benchmark" / "ground-truth.json").read_text())
    out = []
    for key in sorted(truth):
        out += [p.strip() for p in truth[key]["articleBody"].split("\n") if 40 <= len(p.split()) <= 120]
    return out[:n]


def alpaca_rows(shared_data, n: int) -> list[dict]:
    path = shared_data / "alpaca_subset" / "alpaca_cherry5pct_shared.jsonl"
    return [r for _, r in zip(range(n), read(str(path), kind="conversation"))]


def test_perplexity_separates_real_from_shuffled_paragraphs(smollm2, shared_data):
    texts = paragraphs(shared_data)
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(t.split(), len(t.split()))) for t in texts]
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)] + \
           [{"id": f"s{i}", "text": t} for i, t in enumerate(shuffled)]
    stage = Perplexity(model=smollm2, max_length=128, forward_batch_size=8, device="cpu")
    stage.setup()
    out = process_batch(stage, rows)
    ppl = {r["id"]: r["scores"]["ppl"] for r in out.kept}
    assert len(texts) == 40 and len(ppl) == 80
    score = auroc([ppl[f"r{i}"] for i in range(40)], [ppl[f"s{i}"] for i in range(40)])
    assert score >= PPL_AUROC_FLOOR, score


def _loss(model, context: list[int], answer: list[int]) -> float:
    """transformers' own mean loss over the answer tokens, one unpadded sequence."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([context + answer]),
                     labels=torch.tensor([[-100] * len(context) + answer])).loss.item()


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_ifd_on_alpaca_rows_equals_the_per_sample_reference(smollm2, shared_data, template):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = alpaca_rows(shared_data, 6)
    stage = IFD(model=smollm2, template=template, max_length=512, forward_batch_size=3, max_ifd=None, device="cpu")
    stage.setup()
    out = process_batch(stage, rows)
    assert not out.dead and not out.rejected and len(out.kept) == 6
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    for row in out.kept:
        user, answer = row["messages"][0]["content"], row["output"]
        if template == "chat":  # the default system prompt, and <|im_start|> opening the alone pass once
            head = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
            a = enc(answer + "<|im_end|>")
            cond, alone = _loss(model, enc(head), a), _loss(model, enc("<|im_start|>assistant\n"), a)
        else:  # Cherry_LLM's prompt after the BOS; the alone pass keeps "### Response:"
            x = row["input"]
            preamble = ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.\n\n" if x else
                        "Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n")
            prompt = preamble + f"### Instruction:\n{row['instruction']}\n\n" + \
                (f"### Input:\n{x}\n\n" if x else "") + "### Response:"
            a, bos = enc(answer), [tok.bos_token_id]
            cond, alone = _loss(model, bos + enc(prompt), a), _loss(model, bos + enc("### Response:"), a)
        assert row["scores"]["ifd"] == pytest.approx(cond / alone, abs=1e-4), row["id"]
        assert row["scores"]["ifd_tokens"] == len(a)


def test_deita_scores_from_digit_probabilities_vary_across_rows(smollm2, shared_data):
    rows = alpaca_rows(shared_data, 8)
    stage = DeitaScore(model=smollm2, template="chat", max_length=512, forward_batch_size=4, device="cpu")
    stage.setup()
    out = process_batch(stage, rows)
    assert not out.dead and len(out.kept) == 8
    for kind in ("complexity", "quality"):
        values = [r["scores"][f"deita_{kind}"] for r in out.kept]
        assert all(1.0 <= v <= 6.0 and math.isfinite(v) for v in values), kind
        assert max(values) - min(values) > 0.05, (kind, values)  # a real model's digits differ by row
