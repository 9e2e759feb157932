"""Rule verifiers (synth/verifiers.py) on tricky inputs, the RewardFn built from them, loading a
user verifier by path, and the arithmetic task (flywheel/tasks/arithmetic.py)."""

from __future__ import annotations

import re
import sys
from fractions import Fraction

import pytest

from dataflywheel.errors import UserError
from dataflywheel.flywheel.tasks import arithmetic
from dataflywheel.synth.verifiers import (
    exact_match,
    extract_numbers,
    load_verifier,
    numeric_match,
    parse_number,
    regex_match,
    verifier_reward,
)


@pytest.mark.parametrize("text, want", [
    ("The answer is 1,234.", ["1234"]),  # thousands separator; the full stop is not a decimal point
    ("12+7=19", ["12", "7", "19"]),
    ("5-3=2", ["5", "3", "2"]),  # a minus between numbers is subtraction, not a sign
    ("so x = -5.", ["-5"]),
    ("\u22127 degrees", ["-7"]),  # the Unicode minus sign
    ("+3 and 2.50", ["3", "5/2"]),
    ("3/4 of it", ["3/4"]),
    ("-3/4 cup", ["-3/4"]),
    (r"$\frac{3}{4}$ and \dfrac{1}{2}", ["3/4", "1/2"]),
    ("on 1/2/2024", ["1", "2", "2024"]),  # a date is not a fraction
    ("10/0", ["10", "0"]),  # nor is a division by zero
    ("1,2,3", ["1", "2", "3"]),  # a list, not 123
    ("1,2345", ["1", "2345"]),
    ("$1,000.50", ["2001/2"]),
    ("about .5", ["1/2"]),
    ("1e3 or 2.5E-2", ["1000", "1/40"]),
    ("version v1.2 of x2", []),  # digits inside words are not numbers
    ("no digits here", []),
])
def test_extract_numbers(text, want):
    assert [str(x) for x in extract_numbers(text)] == want


def test_parse_number_needs_exactly_one():
    assert parse_number("19") == 19 and parse_number(" $1,000 ") == 1000 and parse_number("3/4") == Fraction(3, 4)
    assert parse_number(7) == 7 and parse_number(0.25) == Fraction(1, 4)
    for bad in ("x", "1 or 2", "", True, float("nan")):
        with pytest.raises(ValueError):
            parse_number(bad)


def test_numeric_match_takes_the_last_number_within_tolerance():
    assert numeric_match("12 apples plus 7 is 19.", "19") == 1.0
    assert numeric_match("19, no wait: 20", "19") == 0.0  # the conclusion counts, not the first guess
    assert numeric_match("The total is $1,234.00", 1234) == 1.0
    assert numeric_match("It is -0.75", "-3/4") == 1.0 and numeric_match("It is 3/4", "0.75") == 1.0
    assert numeric_match("0.333333", "1/3") == 1.0  # equal to 6 decimals (Math-Verify's rounding)
    assert numeric_match("0.3333", "1/3") == 0.0
    assert numeric_match("0.3333", "1/3", abs_tol=1e-3) == 1.0
    assert numeric_match("1000001", "1000000") == 0.0 and numeric_match("1000001", 1e6, rel_tol=1e-5) == 1.0
    assert numeric_match("no number", "3") == 0.0 and numeric_match("", "3") == 0.0
    assert numeric_match("9" * 400, "9" * 400) == 1.0 and numeric_match("9" * 400, "1") == 0.0  # past float range
    with pytest.raises(ValueError, match="exactly one"):
        numeric_match("3", "three")


def test_exact_match_normalization():
    assert exact_match("  The Eiffel  Tower. ", "eiffel tower") == 1.0  # case, article, spaces, end punctuation
    assert exact_match('"Paris"', "paris") == 1.0
    assert exact_match("3.5", "35") == 0.0  # inner punctuation is kept
    assert exact_match("Paris, France", "paris") == 0.0
    assert exact_match("Paris.", "Paris", normalize=False) == 0.0 and exact_match("Paris", "Paris", normalize=False) == 1.0
    assert exact_match("ＰＡＲＩＳ", "paris") == 1.0  # NFKC folds full-width letters


def test_regex_match():
    assert regex_match("Final answer: B", r"answer:\s*[A-D]\b") == 1.0
    assert regex_match("Final answer: E", r"answer:\s*[A-D]\b") == 0.0
    assert regex_match("yes", r"^YES$", flags=re.IGNORECASE) == 1.0
    assert regex_match("oh yes", re.compile(r"^yes$")) == 0.0


def test_verifier_reward_reads_the_row_answer_and_marks_what_it_cannot_score():
    reward = verifier_reward("numeric_match")
    rows = [{"answer": "19"}, {"meta": {"answer": 4}}, {"id": "no answer"}, {"answer": "not a number"}]
    assert reward(rows, ["it is 19", "2+2=4", "4", "4"]) == [1.0, 1.0, None, None]
    assert reward.__name__ == "numeric_match"
    by_field = verifier_reward("exact_match", field="meta.gold", normalize=False)
    assert by_field([{"meta": {"gold": "A"}, "answer": "B"}, {"answer": "B"}], ["A", "B"]) == [1.0, None]
    fixed = verifier_reward("regex_match", pattern=r"^\d+$")
    assert fixed([{}, {}], ["42", "42 apples"]) == [1.0, 0.0]
    per_row = verifier_reward("regex_match")
    assert per_row([{"answer": "^a"}, {"answer": "^b"}], ["abc", "abc"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 prompt rows for 1"):
        reward(rows[:2], ["19"])
    with pytest.raises(ValueError, match="exactly one"):  # every row failing is a broken setup, not bad luck
        reward([{"answer": "x"}, {"answer": "y"}], ["1", "2"])


def test_verifier_reward_rejects_bad_names_and_options():
    with pytest.raises(UserError, match="unknown verifier 'fuzzy'"):
        verifier_reward("fuzzy")
    with pytest.raises(UserError, match="bad options.*tolerance"):
        verifier_reward("numeric_match", tolerance=0.1)
    with pytest.raises(UserError, match="bad regex pattern"):
        verifier_reward("regex_match", pattern="(")


def test_load_verifier_by_module_or_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def starts_with(completion, answer, *, n=1):\n    return float(completion[:n] == str(answer)[:n])\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    fn = load_verifier("my_rewards:starts_with")
    assert fn("abc", "axe") == 1.0 and fn("abc", "axe", n=2) == 0.0
    assert load_verifier(f"{tmp_path / 'my_rewards.py'}:starts_with")("b", "b") == 1.0
    assert load_verifier("dataflywheel.synth.verifiers:exact_match") is exact_match
    reward = verifier_reward("my_rewards:starts_with", n=2)
    assert reward([{"answer": "abz"}, {"answer": "xbz"}], ["abc", "abc"]) == [1.0, 0.0]
    for path, why in [("my_rewards", "expected 'module:function'"),
                      ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                      ("my_rewards:missing", "has no attribute 'missing'"),
                      ("my_rewards:NOT_CALLABLE", "is a int, not a function"),
                      (f"{tmp_path / 'absent.py'}:f", "no such file")]:
        with pytest.raises(UserError, match=re.escape(why)) as err:
            load_verifier(path)
        assert repr(path) in str(err.value)  # the message names the path the user wrote


def test_arithmetic_prompts_are_deterministic_and_correct():
    rows = arithmetic.make_prompts(200, digits=(1, 2), seed=3, ops=("+", "-", "*"))
    assert rows == arithmetic.make_prompts(200, digits=(1, 2), seed=3, ops=("+", "-", "*"))
    assert rows != arithmetic.make_prompts(200, digits=(1, 2), seed=4, ops=("+", "-", "*"))
    assert len({r["id"] for r in rows}) == 200
    ops = set()
    for r in rows:
        (msg,) = r["messages"]
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", msg["content"]).groups()
        assert msg["role"] == "user" and 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] >= 0
        ops.add(op)
    assert ops == {"+", "-", "*"}
    widths = {len(str(int(x))) for r in rows for x in re.findall(r"\d+", r["messages"][0]["content"])}
    assert widths == {1, 2}
    three = arithmetic.make_prompts(20, digits=(3, 3))
    assert all(re.fullmatch(r"\d{3}\+\d{3}=", r["messages"][0]["content"]) for r in three)
    worded = arithmetic.make_prompts(20, digits=(3, 3), template="What is {a} {op} {b}? Reply with the number only.")
    assert [r["answer"] for r in worded] == [r["answer"] for r in three]
    assert all(re.fullmatch(r"What is \d{3} \+ \d{3}\? Reply with the number only\.", r["messages"][0]["content"])
               for r in worded)
    with pytest.raises(ValueError):
        arithmetic.make_prompts(1, digits=(2, 1))
    with pytest.raises(ValueError):
        arithmetic.make_prompts(1, ops=("/",))


def test_arithmetic_reward_reads_the_first_number():
    rows = [{"answer": "19"}] * 5
    got = arithmetic.reward(rows, ["19", "19<|im_end|> 20", "20 or 19", " = 19.0", "nineteen"])
    assert got == [1.0, 1.0, 0.0, 1.0, 0.0]
