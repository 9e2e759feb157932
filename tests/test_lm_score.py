"""The causal-LM scoring core against the plain per-text computation (model(ids, labels=...).loss),
on real tiny Llama and GPT-2 models built locally; nothing is downloaded."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")

from transformers import AutoModelForCausalLM  # noqa: E402

from dataflywheel.models.lm_score import (  # noqa: E402
    NLL,
    answer_nll,
    ppl_scores,
    prefix_token_id,
    sequence_nll,
    token_nll,
)
from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_causal_lm, train_bpe_tokenizer  # noqa: E402

MAX_LEN = 48
TEXTS = [
    "Water boils at 100 degrees Celsius at sea level.",
    "Hi",
    "The quick brown fox jumps over the lazy dog. " * 8,  # over MAX_LEN tokens: truncated
    "",
    "Explain why the sky looks blue during the day.",
    "x",
    "Count from one to ten: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm_folder(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch=request.param, max_positions=64)


@pytest.fixture(scope="module")
def lm(lm_folder):
    return load_causal_lm(lm_folder)


def hf_loss(model, ids: list[int], labels: list[int] | None = None) -> float:
    """The straightforward reference: one unpadded forward, transformers' own shifted mean loss."""
    x = torch.tensor([ids])
    y = torch.tensor([labels if labels is not None else ids])
    with torch.no_grad():
        return model(input_ids=x, labels=y).loss.item()


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_batched_equals_unbatched_hf_loss(lm):
    model, tok = lm
    results = token_nll(model, tok, TEXTS, max_length=MAX_LEN, batch_size=3)
    bos = prefix_token_id(tok)
    for text, r in zip(TEXTS, results, strict=True):
        full = [bos] + encode(tok, text)
        ids = full[:MAX_LEN]
        assert r.truncated == (len(full) > MAX_LEN), text
        assert r.tokens == len(ids) - 1
        if r.tokens == 0:
            assert r.mean is None and r.ppl is None and r.total == 0.0
            continue
        assert r.mean == pytest.approx(hf_loss(model, ids), abs=1e-5), text
        assert r.ppl == pytest.approx(math.exp(r.mean))
    assert any(r.truncated for r in results) and sum(r.tokens == 0 for r in results) == 1


def test_batch_size_and_order_do_not_change_results(lm):
    model, tok = lm
    one = token_nll(model, tok, TEXTS, max_length=MAX_LEN, batch_size=1)
    many = token_nll(model, tok, TEXTS[::-1], max_length=MAX_LEN, batch_size=16)[::-1]
    for a, b in zip(one, many, strict=True):
        assert (a.tokens, a.truncated) == (b.tokens, b.truncated)
        assert a.total == pytest.approx(b.total, abs=1e-4)


def test_prefix_none_leaves_first_token_unscored(lm):
    model, tok = lm
    texts = [t for t in TEXTS if len(encode(tok, t)) >= 2]
    for text, r in zip(texts, token_nll(model, tok, texts, max_length=MAX_LEN, prefix="none")):
        ids = encode(tok, text)[:MAX_LEN]
        assert r.tokens == len(ids) - 1
        assert r.mean == pytest.approx(hf_loss(model, ids), abs=1e-5)


def test_window_mode_scores_every_token_once(lm):
    """Reference: the loop of the transformers docs ("Perplexity of fixed-length models")."""
    model, tok = lm
    text, max_len, stride = TEXTS[2] + TEXTS[0], 32, 12
    ids = [prefix_token_id(tok)] + encode(tok, text)
    total, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_len, len(ids))
        window = ids[begin:end]
        new = end - max(prev_end, 1)  # tokens not scored yet (position 0 can never be)
        labels = [-100] * (len(window) - new) + window[len(window) - new :]
        total += hf_loss(model, window, labels) * new
        n += new
        prev_end = end
        if end == len(ids):
            break
    [r] = token_nll(model, tok, [text], max_length=max_len, long_text="window", stride=stride)
    assert not r.truncated and r.tokens == n == len(ids) - 1
    assert r.total == pytest.approx(total, abs=1e-4)
    [short] = token_nll(model, tok, [TEXTS[1]], max_length=max_len, long_text="window", stride=stride)
    assert short == token_nll(model, tok, [TEXTS[1]], max_length=max_len)[0]  # fits: one window


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_answer_nll_equals_masked_label_loss(lm, fmt):
    model, tok = lm
    prompts = ["What is the capital of France?", "Say hello.", "List three planets."]
    answers = ["The capital of France is Paris.", "Hello!", "Mercury, Venus and Earth."]
    res = answer_nll(model, tok, prompts, answers, max_length=MAX_LEN, batch_size=2, prompt_format=fmt)
    bos = prefix_token_id(tok)
    for q, a, r in zip(prompts, answers, res, strict=True):
        if fmt == "plain":
            q_ids, a_ids = [bos] + encode(tok, q + "\n"), encode(tok, a)
        else:
            head = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            q_ids, a_ids = encode(tok, head), encode(tok, a + tok.eos_token)  # the turn ends with end-of-turn
            assert q_ids[0] == tok.bos_token_id and q_ids.count(tok.bos_token_id) == 1
        ids = q_ids + a_ids
        assert not r.truncated and r.answer_tokens == len(a_ids)
        assert r.conditional.tokens == r.alone.tokens == len(a_ids)
        assert r.conditional.mean == pytest.approx(hf_loss(model, ids, [-100] * len(q_ids) + a_ids), abs=1e-5)
        assert r.alone.mean == pytest.approx(hf_loss(model, [bos] + a_ids), abs=1e-5)
    ifd = [r.conditional.mean / r.alone.mean for r in res]  # IFD = s(A|Q) / s(A) (Li et al. 2024), the two-liner
    assert all(0 < v < 2 for v in ifd)


def test_answer_boundary_is_exact_even_where_bpe_would_merge(lm):
    """A prompt ending in a space: joined, byte-level BPE glues that space onto the answer's first word."""
    model, tok = lm
    q, a = "Answer: ", "Paris is the capital."
    assert encode(tok, q + a)[: len(encode(tok, q))] != encode(tok, q)  # joined, the prompt's tokens change
    [r] = answer_nll(model, tok, [q], [a], separator="", max_length=MAX_LEN)
    a_ids, q_ids = encode(tok, a), [prefix_token_id(tok)] + encode(tok, q)
    assert r.answer_tokens == r.conditional.tokens == len(a_ids)
    assert r.conditional.mean == pytest.approx(hf_loss(model, q_ids + a_ids, [-100] * len(q_ids) + a_ids), abs=1e-5)


def test_answer_truncation_is_reported_and_both_scores_cover_the_same_tokens(lm):
    model, tok = lm
    prompt, answer = "Please summarize the following paragraph in two sentences.", "Sure! " * 30
    q_len, a_len = 1 + len(encode(tok, prompt + "\n")), len(encode(tok, answer))
    [r] = answer_nll(model, tok, [prompt], [answer], max_length=MAX_LEN)
    assert r.truncated and r.alone.truncated and r.answer_tokens == a_len
    assert r.conditional.tokens == r.alone.tokens == MAX_LEN - q_len
    [full] = answer_nll(model, tok, [prompt * 10], ["Yes."], max_length=MAX_LEN)  # prompt fills the window
    assert full.truncated and full.conditional.tokens == 0 and full.conditional.mean is None


def test_alone_prefix_none_skips_the_first_answer_token(lm):
    model, tok = lm
    [r] = answer_nll(model, tok, ["Say hello."], ["Hello there, friend."], alone_prefix="none")
    a_ids = encode(tok, "Hello there, friend.")
    assert r.alone.tokens == len(a_ids) - 1 and r.conditional.tokens == len(a_ids)
    assert r.alone.mean == pytest.approx(hf_loss(model, a_ids), abs=1e-5)


def test_sequence_nll_edge_cases_and_bad_arguments(lm):
    model, tok = lm
    assert sequence_nll(model, []) == []
    assert sequence_nll(model, [([5, 6, 7], 3), ([5], 0)]) == [(0.0, 0), (0.0, 0)]  # nothing to score: no forward
    with pytest.raises(ValueError, match="stride"):
        token_nll(model, tok, ["a"], max_length=8, long_text="window", stride=8)
    with pytest.raises(ValueError, match="prefix"):
        token_nll(model, tok, ["a"], prefix="eos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="answers"):
        answer_nll(model, tok, ["q"], [])


def test_ppl_scores_never_hold_nan_or_inf():
    assert ppl_scores(NLL(0.0, 0)) == {"ppl_tokens": 0, "ppl_truncated": 0}
    s = ppl_scores(NLL(6.0, 3, True), prefix="r_")
    assert s == {"r_ppl_tokens": 3, "r_ppl_truncated": 1, "r_nll": 2.0, "r_ppl": pytest.approx(math.exp(2.0))}
    assert math.isfinite(ppl_scores(NLL(1e6, 1))["ppl"])  # exp overflow is capped, not inf
    with pytest.raises(ValueError, match="non-finite"):
        ppl_scores(NLL(float("nan"), 4))


def test_trained_model_prefers_the_sentence_it_saw(lm_folder):
    """Direction check: a few steps on one sentence make it less perplexing than its words shuffled."""
    sentence = "the cat slept on the warm windowsill while the children played outside"
    _, tok = load_causal_lm(lm_folder)
    model = AutoModelForCausalLM.from_pretrained(lm_folder)  # a private copy: the shared one must stay untrained
    ids = torch.tensor([[prefix_token_id(tok)] + encode(tok, sentence)] * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(20):  # ~1 s on 2 busy CPU cores
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    words = sentence.split()
    shuffled = [" ".join(random.Random(seed).sample(words, len(words))) for seed in range(3)]
    seen, *others = token_nll(model, tok, [sentence, *shuffled], max_length=64)
    assert all(seen.ppl < o.ppl / 2 for o in others), (seen.ppl, [o.ppl for o in others])


def test_tokenizer_without_bos_falls_back_to_eos():
    tok = train_bpe_tokenizer(["a b c"], vocab_size=300)
    assert prefix_token_id(tok) == tok.bos_token_id
    tok.bos_token = None
    assert prefix_token_id(tok) == tok.eos_token_id
