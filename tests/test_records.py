"""Record contract: TRL field conventions, stable ids, one-line reasons naming the field."""

import pytest

from dataflywheel.errors import RecordError
from dataflywheel.records import content_id, validate


def reason(kind, row):
    with pytest.raises(RecordError) as err:
        validate(kind, row)
    return err.value.reason, err.value.field


def test_document_id_is_stable_content_hash():
    a = validate("document", {"text": "hello world"})
    b = validate("document", {"text": "hello world", "url": "x"})
    assert a["id"] == b["id"] == content_id("hello world")
    assert validate("document", {"id": "given", "text": "t"})["id"] == "given"
    assert validate("document", {"id": 12345, "text": "t"})["id"] == "12345"  # documented coercion


@pytest.mark.parametrize("row,expected", [
    ({}, ("missing_field", "text")),
    ({"text": None}, ("wrong_type", "text")),
    ({"text": 3}, ("wrong_type", "text")),
    ({"text": "  \n"}, ("empty_value", "text")),
    ({"text": "a\x00b"}, ("nul_in_text", "text")),
    ({"text": "ok", "scores": {"ppl": "high"}}, ("wrong_type", "scores.ppl")),
    ({"text": "ok", "meta": []}, ("wrong_type", "meta")),
    ([1, 2], ("not_an_object", "<row>")),
])
def test_document_errors_name_the_field(row, expected):
    assert reason("document", row) == expected


def test_raw_page_document_needs_html_string():
    assert validate("document", {"html": "<p>x</p>", "url": "u"})["id"]
    assert reason("document", {"html": 5}) == ("wrong_type", "html")


def chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_conversation_valid_multi_turn_with_system():
    row = validate("conversation", {"messages": chat(("system", "s"), ("user", "q"), ("assistant", "a"),
                                                     ("user", "q2"), ("assistant", "a2"))})
    assert len(row["id"]) == 16


@pytest.mark.parametrize("messages,expected", [
    (None, ("wrong_type", "messages")),
    ([], ("empty_value", "messages")),
    ([None], ("wrong_type", "messages[0]")),
    (chat(("user", "q"), ("bot", "a")), ("invalid_role", "messages[1].role")),
    ([{"content": "x"}], ("missing_field", "messages[0].role")),
    (chat(("user", "q"), ("assistant", "")), ("empty_value", "messages[1].content")),
    ([{"role": "user", "content": [{"type": "text", "text": "q"}]}], ("wrong_type", "messages[0].content")),
    (chat(("system", "s")), ("no_user_or_assistant", "messages")),
    (chat(("assistant", "a")), ("no_user_turn", "messages")),
    (chat(("user", "q")), ("no_final_assistant", "messages")),
    (chat(("user", "q"), ("user", "q"), ("assistant", "a")), ("bad_turn_order", "messages[1].role")),
    (chat(("user", "q"), ("system", "s"), ("assistant", "a")), ("bad_turn_order", "messages[1].role")),
])
def test_conversation_errors(messages, expected):
    assert reason("conversation", {"messages": messages}) == expected


def test_preference_shapes_normalize_to_trl_conversational():
    explicit = validate("preference", {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert explicit["prompt"] == chat(("user", "q"))
    assert explicit["chosen"] == chat(("assistant", "good"))
    implicit = validate("preference", {"chosen": chat(("user", "q"), ("assistant", "good")),
                                       "rejected": chat(("user", "q"), ("assistant", "bad"))})
    hh = validate("preference", {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"})
    conv = validate("preference", {"prompt": chat(("user", "q")), "chosen": chat(("assistant", "good")),
                                   "rejected": chat(("assistant", "bad"))})
    for row in (implicit, hh, conv):
        assert (row["prompt"], row["chosen"], row["rejected"]) == (explicit["prompt"], explicit["chosen"], explicit["rejected"])
        assert row["id"] == explicit["id"]  # same content, same id, whatever the input shape


@pytest.mark.parametrize("row,expected", [
    ({"prompt": "q", "chosen": "a"}, ("missing_field", "rejected")),
    ({"prompt": "q", "chosen": "a", "rejected": " a "}, ("identical_chosen_rejected", "rejected")),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, ("empty_value", "prompt")),
    ({"prompt": "q", "chosen": ["a"], "rejected": "b"}, ("wrong_type", "chosen")),
    ({"chosen": chat(("user", "q"), ("assistant", "a")), "rejected": chat(("user", "other"), ("assistant", "b"))},
     ("prompt_mismatch", "rejected")),
    ({"chosen": "no markers", "rejected": "\n\nHuman: q\n\nAssistant: b"}, ("unparseable_transcript", "chosen")),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b\n\nHuman: more"},
     ("no_final_assistant", "rejected")),
])
def test_preference_errors(row, expected):
    assert reason("preference", row) == expected


def test_error_message_is_one_line_and_names_field():
    with pytest.raises(RecordError) as err:
        validate("conversation", {"messages": chat(("user", "q"), ("bot", "a"))})
    assert "\n" not in str(err.value) and "messages[1].role" in str(err.value)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown record kind"):
        validate("image", {})


def test_prompt_rows_in_every_accepted_form():
    as_messages = validate("prompt", {"prompt": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Name a colour."}]})
    assert as_messages["prompt"][-1]["role"] == "user" and as_messages["id"]
    assert validate("prompt", {"prompt": "Name a colour."})["prompt"] == [{"role": "user", "content": "Name a colour."}]
    alpaca = validate("prompt", {"instruction": "Add the numbers.", "input": "2 and 3"})
    assert alpaca["prompt"][0]["content"] == "Add the numbers.\n\n2 and 3"
    assert validate("prompt", {"instruction": "Say hi.", "input": ""})["prompt"][0]["content"] == "Say hi."


@pytest.mark.parametrize("row, reason, field", [
    ({"text": "x"}, "missing_field", "prompt"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "bad_turn_order", "prompt[1].role"),
    ({"prompt": 3}, "wrong_type", "prompt"),
    ({"instruction": "x", "input": 5}, "wrong_type", "input"),
])
def test_bad_prompt_rows(row, reason, field):
    with pytest.raises(RecordError) as err:
        validate("prompt", row)
    assert (err.value.reason, err.value.field) == (reason, field)
