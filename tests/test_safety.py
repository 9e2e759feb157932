"""Sensitive-content filter: whole-word unicode keyword matching, regex lists, per-list counts,
count and ratio decisions, bad list files, the Beam wrapper, and a long-document timing."""

from __future__ import annotations

import random
import re
import time

import pytest

from dataflywheel.errors import UserError
from dataflywheel.filters.safety import SensitiveContent, keyword_automaton, keyword_counts
from dataflywheel.registry import stage_class
from dataflywheel.stages import process_batch


def make(**cfg) -> SensitiveContent:
    stage = SensitiveContent(**cfg)
    stage.setup()
    return stage


def write(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def hits(phrases, text):
    return keyword_counts(keyword_automaton([phrases]), text, 1)[0]


@pytest.mark.parametrize("text, n", [
    ("a Bad Word here", 1),
    ("BAD\n\t  WORD", 1),  # any whitespace between the words of a phrase
    ("badword", 0),
    ("a bad wordy thing", 0),  # glued to a word character: not a whole word
    ("x_bad word", 0),  # underscore is a word character
    ("(bad word), bad-word; bad word.", 2),
])
def test_phrases_match_whole_words_case_insensitively(text, n):
    assert hits(["bad word"], text) == n


def test_unicode_casefold_nfkc_and_non_word_edges():
    assert hits(["straße"], "STRASSE und Straße, strassen") == 2
    assert hits(["ｆｕｌｌwidth"], "FULLWIDTH text") == 1  # NFKC folds full-width letters
    assert hits(["café"], "un cafe\u0301 noir") == 1  # combining accent composes under NFKC
    assert hits(["c++"], "I like c++, and c++x") == 2  # entry ends in a non-word char: no end boundary needed
    assert hits(["日本"], "日本語 and 日本") == 1  # CJK letters are word characters too


def test_overlapping_entries_count_once_leftmost_longest():
    assert hits(["bad", "bad word", "word"], "a bad word and a word") == 2
    assert hits(["ab", "bc"], "ab bc abc") == 2


def test_shipped_lists_per_list_counts():
    stage = make()
    text = ("A DFWSENSITIVE thing; Example   sensitive\nphrase; STRASSENBEISPIELWORT; xdfwsensitive; "
            "mail bob@Example-PII.test about DFW-secret-1234 and dfw-secret-12345")
    scores = stage.score_text(text)
    assert scores["sensitive_words"] == 3 and scores["sensitive_regex"] == 2
    assert scores["sensitive_hits"] == 5
    assert scores["sensitive_ratio"] == pytest.approx(5 / len(text.split()), abs=1e-6)
    assert stage.score_text("an ordinary sentence")["sensitive_hits"] == 0


def test_user_lists_counts_and_decisions(tmp_path):
    words = [write(tmp_path / "slurs.txt", "alpha", "beta gamma"), write(tmp_path / "drugs.txt", "alpha", "delta")]
    regexes = [write(tmp_path / "pii.txt", r"\b\d{3}-\d{4}\b", "x*")]  # x* can match empty: ignored
    rows = [
        {"id": "clean", "text": "nothing to see here at all"},
        {"id": "one", "text": "call 555-1234 now please, it is fine"},
        {"id": "many", "text": "alpha beta gamma delta alpha"},
        {"id": "chat", "messages": [{"role": "user", "content": "say Delta"}, {"role": "assistant", "content": "ok"}]},
    ]
    stage = make(keyword_files=words, regex_files=regexes)
    assert stage.names == ["sensitive_slurs", "sensitive_drugs", "sensitive_pii"]
    out = process_batch(stage, rows)
    assert [r["id"] for r in out.kept] == ["clean"]
    assert {r["id"]: r["rejected"]["reason"] for r in out.rejected} == dict.fromkeys(["one", "many", "chat"], "sensitive_content")
    many = next(r for r in out.rejected if r["id"] == "many")["scores"]
    # "alpha" is on both lists: once in all, once for each list
    assert (many["sensitive_slurs"], many["sensitive_drugs"], many["sensitive_pii"], many["sensitive_hits"]) == (3, 3, 0, 4)

    scored = out.kept + out.rejected
    lenient = SensitiveContent(keyword_files=words, regex_files=regexes, max_hits=1)
    assert sorted(r["id"] for r in scored if lenient.keep(r)[0]) == ["chat", "clean", "one"]
    by_ratio = SensitiveContent(keyword_files=words, regex_files=regexes, max_hit_ratio=0.2)
    assert sorted(r["id"] for r in scored if by_ratio.keep(r)[0]) == ["clean", "one"]  # 1/7 words vs 4/5 and 1/3


def test_bad_list_files(tmp_path):
    with pytest.raises(UserError, match="bad regex"):
        make(regex_files=[write(tmp_path / "a.txt", "(unclosed")])
    with pytest.raises(UserError, match="back-reference"):
        make(regex_files=[write(tmp_path / "b.txt", r"(\w)\1")])
    with pytest.raises(UserError, match="one alternation"):
        make(regex_files=[write(tmp_path / "c.txt", "(?P<n>a)", "(?P<n>b)")])
    with pytest.raises(UserError, match="cannot read list file"):
        make(keyword_files=[str(tmp_path / "absent.txt")])
    empty = make(keyword_files=[], regex_files=[])
    assert empty.score_text("dfwsensitive")["sensitive_hits"] == 0


def test_registered():
    assert stage_class("sensitive_content") is SensitiveContent


def test_beam_fnapi_runner(tmp_path):
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    from dataflywheel.pipelines.stage_transform import ApplyStage

    rows = [{"id": f"r{i}", "text": "dfwsensitive" if i % 3 == 0 else "fine text"} for i in range(12)]
    with beam.Pipeline(runner=FnApiRunner()) as p:
        outs = p | beam.Create([rows[:7], rows[7:]]) | ApplyStage(SensitiveContent())
        why = outs["rejected"] | beam.FlatMap(lambda b: [(r["id"], r["rejected"]["reason"]) for r in b])
        assert_that(why, equal_to([(f"r{i}", "sensitive_content") for i in range(0, 12, 3)]))


def test_agrees_with_a_word_boundary_regex_alternation():
    rng = random.Random(1)
    letters = "abcdefgh"  # a small alphabet, so entries often occur inside longer words too
    listed = sorted({"".join(rng.choices(letters, k=rng.randrange(2, 5))) for _ in range(300)}, key=len, reverse=True)
    text = " ".join("".join(rng.choices(letters, k=rng.randrange(1, 7))) for _ in range(5000))
    alternation = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, listed)) + r")(?!\w)")
    expected = sum(1 for _ in alternation.finditer(text))
    assert expected > 100
    assert keyword_counts(keyword_automaton([listed]), text, 1)[0] == expected


def test_long_document_is_one_scan():
    """Printed, not asserted: MB/s on a ~2 MB document against 5,000 keywords and phrases."""
    rng = random.Random(0)
    vocab = [f"tok{i}" for i in range(20_000)]
    listed = [f"bad{i}" for i in range(4000)] + [f"bad{i} phrase{i}" for i in range(1000)]
    body = [rng.choice(vocab) for _ in range(250_000)]
    for pos in range(0, len(body), 1000):
        body[pos] = f"BAD{pos % 4000}"
    text = " ".join(body)
    auto = keyword_automaton([listed])
    start = time.perf_counter()
    total, _ = keyword_counts(auto, text, 1)
    seconds = time.perf_counter() - start
    assert total == len(range(0, len(body), 1000))
    print(f"\nsensitive_content: {len(text) / seconds / 1e6:.1f} MB/s over {len(listed)} entries ({len(text) / 1e6:.1f} MB)")
