"""Chat data on a real chat model (SmolLM2-135M-Instruct: ChatML, a default system prompt, BOS and
EOS both special tokens, a 49,152-token vocabulary): assistant-only labels are exactly the
assistant turns and their end-of-turn token, one BOS, the linter quiet on clean rows and loud on
each planted problem, and packed per-document log-probs equal unpacked ones on the real weights."""

from __future__ import annotations

import pytest
import torch
from test_train_data import _trained_text as trained_text

from dataflywheel.train.data import Lint, pair_examples, sft_examples, tokenize_chat
from dataflywheel.train.losses import IGNORE, token_logps
from dataflywheel.train.pack import collate_packed

SINGLE = [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Blue."}]
MULTI = [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, of course."}]


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("chat,answers", [(SINGLE, ["Blue."]), (MULTI, ["Paris.", "Rome, of course."])])
def test_labels_are_exactly_the_assistant_turns_and_end_of_turn(tok, chat, answers):
    ex, before = tokenize_chat(tok, chat, 1024)
    assert trained_text(tok, ex) == [f"{a}<|im_end|>" for a in answers]
    assert before == ex.targets and not ex.truncated
    text = tok.decode(ex.input_ids)
    if chat[0]["role"] != "system":  # the template's default system prompt is rendered, never trained
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ex.input_ids.count(tok.bos_token_id) == text.count("<|im_start|>")  # <|im_start|> is its BOS
    assert ex.input_ids[:2] != [tok.bos_token_id] * 2  # one BOS: the template writes it, tokenizing adds none
    assert tok.eos_token == "<|im_end|>" and ex.labels[-2:] == [tok.eos_token_id, IGNORE]  # the final newline is not trained


def test_linter_is_quiet_on_clean_rows_and_finds_each_planted_problem(tok):
    lint = Lint()
    rows = [{"id": "one", "messages": SINGLE}, {"id": "multi", "messages": MULTI}]
    assert len(sft_examples(rows, tok, 1024, lint)) == 2 and not lint.counts
    pair = {"id": "p", "prompt": MULTI[:4], "chosen": [MULTI[4]], "rejected": [{"role": "assistant", "content": "Milan."}]}
    assert len(pair_examples([pair], tok, 1024, lint)) == 1 and not lint.counts

    template = tok.chat_template
    no_eos = template.replace("<|im_end|>' + '\n'", "' + '\n'")
    assert no_eos != template
    planted = [({"id": "bos", "messages": SINGLE}, "{{ bos_token }}" + template, "double_bos"),
               ({"id": "eos", "messages": SINGLE}, no_eos, "missing_eos"),
               ({"id": "user", "messages": SINGLE[:1]}, None, "no_trainable_tokens")]
    for row, tmpl, problem in planted:
        lint = Lint()
        assert sft_examples([row], tok, 1024, lint, tmpl) == [] and lint.counts == {problem: 1}, problem
    lint = Lint()
    long = {"id": "long", "messages": [{"role": "user", "content": "word " * 300}, SINGLE[1]]}
    assert sft_examples([long], tok, 100, lint) == [] and lint.counts == {"truncated_to_nothing": 1}
    lint = Lint()
    same = {"id": "same", "prompt": SINGLE[:1], "chosen": SINGLE[1:], "rejected": SINGLE[1:]}
    assert pair_examples([same], tok, 1024, lint) == [] and lint.counts == {"identical_pair": 1}


def test_packed_logps_equal_unpacked_on_the_real_model(tok, model):
    rows = [{"id": "a", "messages": SINGLE}, {"id": "b", "messages": MULTI},
            {"id": "c", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}]
    docs = sft_examples(rows, tok, 1024, Lint())
    packed = collate_packed([docs], pad_id=tok.pad_token_id)
    labels = packed.pop("labels")
    packed.pop("num_tokens")
    with torch.no_grad():
        plogps = token_logps(model(**packed, use_cache=False).logits, labels)[0]
        at = 0
        for doc in docs:
            lab = torch.tensor([doc.labels])
            ulogps = token_logps(model(input_ids=torch.tensor([doc.input_ids]), use_cache=False).logits, lab)[0]
            n = len(doc.input_ids)
            mask = lab[0, 1:] != IGNORE
            assert torch.allclose(plogps[at:at + n - 1][mask], ulogps[mask], atol=1e-4), doc.id
            at += n
