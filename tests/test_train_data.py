"""Training data: assistant-only labels (every turn, EOS trained, no double BOS) and the data linter."""

from __future__ import annotations

import json

import pytest

from dataflywheel.errors import UserError
from dataflywheel.models.tiny_lm import BOS, EOS, train_bpe_tokenizer
from dataflywheel.train.data import Lint, pair_examples, read_rows, sft_examples, split_rows, tokenize_chat
from dataflywheel.train.losses import IGNORE

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(["What is 2+2? It is 4. And 3+3? It is 6. Be brief."] * 20, vocab_size=400)


def _trained_text(tok, ex) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    runs, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur)), cur.clear()
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_labels_cover_every_assistant_turn_with_eos_and_nothing_else(tok):
    ex, before = tokenize_chat(tok, CHAT, 512)
    assert _trained_text(tok, ex) == [f"It is 4.{EOS}", f"It is 6.{EOS}"]
    assert before == ex.targets > 0 and not ex.truncated
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[1] != tok.bos_token_id
    # one tokenization of the whole chat: ids equal the rendered text tokenized once
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert ex.input_ids == tok(text, add_special_tokens=False)["input_ids"]


def test_preference_trains_only_the_completion(tok):
    row = {"id": "p", "prompt": CHAT[:3] + [CHAT[3]], "chosen": [CHAT[4]],
           "rejected": [{"role": "assistant", "content": "It is 7."}]}
    lint = Lint()
    (pair,) = pair_examples([row], tok, 512, lint)
    assert _trained_text(tok, pair.chosen) == [f"It is 6.{EOS}"]
    assert _trained_text(tok, pair.rejected) == [f"It is 7.{EOS}"]
    assert not lint.counts


def test_truncation_keeps_the_start_and_counts(tok):
    full, before = tokenize_chat(tok, CHAT, 512)
    cut = len(full.input_ids) - 3  # inside the last assistant turn
    ex, _ = tokenize_chat(tok, CHAT, cut)
    assert ex.input_ids == full.input_ids[:cut] and ex.truncated and 0 < ex.targets < before


def _lint_rows(tok, rows, max_length=512, template=None):
    lint = Lint()
    kept = sft_examples(rows, tok, max_length, lint, template)
    return lint, kept


def test_linter_counts_each_problem_and_fails_with_them(tok):
    good = {"id": "good", "messages": CHAT}
    long_user = {"id": "long", "messages": [{"role": "user", "content": "What is 2+2? " * 40},
                                            {"role": "assistant", "content": "4"}]}
    lint, kept = _lint_rows(tok, [good, long_user], max_length=40)
    assert lint.counts == {"truncated_to_nothing": 1} and [e.id for e in kept] == ["good"]
    with pytest.raises(UserError, match=r"1 truncated_to_nothing \(e.g. long\).*lint: drop"):
        lint.enforce("fail", "sft data")
    lint.enforce("drop", "sft data")  # drop: no error, the row is already out

    # templates with the classic bugs: BOS written twice, EOS never emitted, assistant never rendered
    double_bos = "{{ bos_token }}" + tok.chat_template
    no_eos = tok.chat_template.replace("+ '<|im_end|>' -}}{%- endgeneration", "-}}{%- endgeneration")
    no_assistant = ("{%- for m in messages -%}{%- if m['role'] != 'assistant' -%}{{ m['content'] }}"
                    "{%- endif -%}{%- endfor -%}")
    assert no_eos != tok.chat_template
    for template, problem in ((double_bos, "double_bos"), (no_eos, "missing_eos"),
                              (no_assistant, "no_trainable_tokens")):
        lint, kept = _lint_rows(tok, [good], template=template)
        assert lint.counts == {problem: 1} and kept == [], problem


def test_identical_pair_is_linted(tok):
    row = {"id": "same", "prompt": CHAT[:2], "chosen": [CHAT[2]], "rejected": [CHAT[2]]}
    lint = Lint()
    assert pair_examples([row], tok, 512, lint) == []
    assert lint.counts == {"identical_pair": 1}


def test_unreadable_rows_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "messages": CHAT}) + "\n{not json\n"
                    + json.dumps({"id": "b", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    lint = Lint()
    rows = read_rows([str(path)], "conversation", lint)
    assert [r["id"] for r in rows] == ["a"] and lint.counts["unreadable"] == 2
    assert any(f"{path}:line 2" in e for e in lint.examples["unreadable"])
    with pytest.raises(UserError, match="2 unreadable"):
        lint.enforce("fail", "sft data")


def test_eval_split_is_stable_and_sized():
    rows = [{"id": f"r{i}"} for i in range(2000)]
    train, held = split_rows(rows, 0.1)
    assert 150 < len(held) < 250 and len(train) + len(held) == 2000
    assert split_rows(list(reversed(rows)), 0.1)[1] == list(reversed(held))
    assert BOS  # the tokenizer's BOS is the template's first token (checked above)


def test_sft_with_lint_drop_reconciles_every_input_row(tmp_path):
    """in == trained + held out + dropped, each bad row counted once however many problems it has."""
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm
    from dataflywheel.train.sft import SftConfig, run

    model = build_tiny_causal_lm(tmp_path / "m", hidden=32, layers=1)
    good = [{"id": f"g{i}", "messages": CHAT} for i in range(6)]
    long_user = {"id": "long", "messages": [{"role": "user", "content": "What is 2+2? " * 80},
                                            {"role": "assistant", "content": "4"}]}
    lines = [json.dumps(r) for r in good + [long_user]] + ["{not json", json.dumps({"id": "x", "messages": []})]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # BOS written twice (checked below): every row then has double_bos, the long one two problems
    template = "{{ bos_token }}" + train_bpe_tokenizer(["x"], vocab_size=300).chat_template
    cfg = SftConfig(model=str(model), data=[str(data)], output=str(tmp_path / "o"), max_length=64,
                    eval_fraction=0.0, lint="drop", loop={"max_steps": 1, "progress": False})
    summary = run(cfg)
    assert summary["rows"] == 6 and summary["rows_dropped"] == 3
    assert summary["rows"] + summary["eval_rows"] + summary["rows_dropped"] == len(lines)
    lint = Lint()
    rows = read_rows([str(data)], "conversation", lint)
    assert sft_examples(rows, train_bpe_tokenizer(["x"], vocab_size=300), 64, lint, template) == []
    assert lint.rows == len(lines) < sum(lint.counts.values())  # "long" has two problems, counted as one row
