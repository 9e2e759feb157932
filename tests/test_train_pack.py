"""Packing: BFD bins equal a literal best-fit-decreasing loop, and packed forwards equal unpacked ones
(per-document log-probs to 1e-5, the loss to the token-weighted unpacked loss), for Llama and GPT-2,
with packed position ids and with the explicit block-diagonal mask."""

from __future__ import annotations

import random

import pytest
import torch

from dataflywheel.models.label_logps import label_logps
from dataflywheel.models.tiny_lm import build_tiny_causal_lm
from dataflywheel.train.data import Example
from dataflywheel.train.losses import IGNORE, sft_loss, token_logps
from dataflywheel.train.model import load_for_training
from dataflywheel.train.pack import bfd, collate_packed, collate_padded, padding_fraction


def naive_bfd(lengths, capacity):
    """Best-fit decreasing written out: scan every bin for the tightest fit."""
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
        else:
            b = len(bins)
            bins.append([]), free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def test_bfd_equals_the_literal_algorithm_and_loses_nothing():
    rng = random.Random(0)
    for trial in range(30):
        capacity = rng.choice([16, 64, 100])
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 200))]
        bins = bfd(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert sorted(map(sorted, bins)) == sorted(map(sorted, naive_bfd(lengths, capacity))), trial
    with pytest.raises(ValueError):
        bfd([5, 11], 10)


def test_bfd_pads_under_5_percent_on_varied_lengths():
    rng = random.Random(1)
    lengths = [int(rng.lognormvariate(5, 0.8)) % 1024 + 1 for _ in range(5000)]
    bins = bfd(lengths, 1024)
    packed = padding_fraction([sum(lengths[i] for i in b) for b in bins], 1024)
    padded = padding_fraction(lengths, 1024)
    assert packed < 0.05 < padded


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    folder = build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch=request.param, hidden=64, layers=2)
    model, _ = load_for_training(str(folder))
    return model.eval()


def _docs(n=6, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(n):
        length = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        labels = [IGNORE if t < length // 3 else x for t, x in enumerate(ids)]  # a "prompt" part untrained
        docs.append(Example(f"d{d}", ids, labels))
    return docs


@pytest.mark.parametrize("attention", ["position_ids", "block_mask"])
def test_packed_logps_equal_unpacked(model, attention):
    docs = _docs()
    bins = [docs[:3], docs[3:5], docs[5:]]  # uneven bins: the short ones are padded
    packed = collate_packed(bins, pad_id=0, attention=attention)
    assert packed["num_tokens"] == sum(len(d.input_ids) for d in docs)
    labels = packed.pop("labels")
    packed.pop("num_tokens")
    with torch.no_grad():
        plogps = label_logps(model, labels, chunk=5, **packed)  # the trainer's lean path, chunk boundaries mid-document
        total, count = sft_loss(plogps, labels)
        ref_sum, ref_count = 0.0, 0
        for r, group in enumerate(bins):
            at = 0
            for doc in group:
                ids = torch.tensor([doc.input_ids])
                lab = torch.tensor([doc.labels])
                ulogits = model(input_ids=ids, use_cache=False).logits
                ulogps = token_logps(ulogits, lab)[0]
                n = len(doc.input_ids)
                # packed position t predicts token t+1; the document's own n-1 predictions
                assert torch.allclose(plogps[r, at:at + n - 1], ulogps, atol=1e-5), (r, doc.id)
                s, c = sft_loss(token_logps(ulogits, lab), lab)
                ref_sum, ref_count = ref_sum + float(s), ref_count + int(c)
                at += n
            # the position before each document start is never trained on the next document
            assert (labels[r, 0] == IGNORE)
    assert int(count) == ref_count
    assert abs(float(total) / int(count) - ref_sum / ref_count) < 1e-5


def test_first_token_of_each_document_is_never_a_target():
    docs = [Example("a", [5, 6, 7], [5, 6, 7]), Example("b", [8, 9], [8, 9])]
    batch = collate_packed([docs], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    padded = collate_padded(docs, pad_id=0)
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]] and padded["num_tokens"] == 5
