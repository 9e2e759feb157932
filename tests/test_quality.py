"""Heuristic quality stages: statistics checked against hand counts, decisions re-applied from
stored scores, real article bodies mostly kept, generated junk rejected, and a Beam run."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from dataflywheel.filters import quality_rules as rules
from dataflywheel.filters.quality import C4, FineWebQuality, GopherQuality, GopherRepetition, LineFilter
from dataflywheel.registry import stage_class
from dataflywheel.stages import process_batch


def one(stage, text: str) -> dict:
    out = process_batch(stage, [{"id": "d", "text": text}])
    assert out.rows_in == 1 and not out.dead
    return (out.kept + out.rejected)[0]


# --- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_splits_symbols_and_keeps_numbers_whole():
    tokens, n_words = rules.tokenize("It costs $1,000 at 2:55... don’t well-known #1")
    assert tokens == ["It", "costs", "$", "1,000", "at", "2:55", "...", "don’t", "well", "-", "known", "#", "1"]
    assert n_words == 9


# --- Gopher quality ------------------------------------------------------------------------------

# 4 lines, 19 tokens, 13 of them words (letters/digits):
#   "The cat and the dog."   The cat and the dog .      6 tokens, 5 words, 15 chars of words
#   "- a list item"          - a list item              4 tokens, 3 words,  9 chars
#   "• another #1 ..."       • another # 1 ...          5 tokens, 2 words,  8 chars
#   "End of it…"             End of it …                4 tokens, 3 words,  7 chars
GOPHER_TEXT = "The cat and the dog.\n- a list item\n• another #1 ...\nEnd of it…"


def test_gopher_quality_statistics_by_hand():
    s = rules.gopher_quality_stats(GOPHER_TEXT)
    assert s["gopher_n_words"] == 13
    assert s["gopher_mean_word_len"] == pytest.approx(39 / 13)  # = 3.0
    assert s["gopher_hash_word_ratio"] == pytest.approx(1 / 19)
    assert s["gopher_ellipsis_word_ratio"] == pytest.approx(2 / 19)  # "..." and "…"
    assert s["gopher_bullet_line_frac"] == pytest.approx(2 / 4)  # "-" and "•"
    assert s["gopher_ellipsis_line_frac"] == pytest.approx(2 / 4)
    assert s["gopher_alpha_word_frac"] == pytest.approx(12 / 19)  # "1" and 6 symbols have no letter
    assert s["gopher_n_stop_words"] == 3  # the, and, of ("The" does not count: case-sensitive)


def test_gopher_quality_decides_from_stored_scores_only():
    stage = GopherQuality()
    row = one(stage, GOPHER_TEXT)
    assert row["rejected"] == {"stage": "gopher_quality", "reason": "gopher_short_doc"}
    stored = {"id": row["id"], "scores": row["scores"]}  # no text at all: keep() must not need it
    assert GopherQuality(min_doc_words=10).keep(stored) == (False, "gopher_too_many_ellipsis")
    assert GopherQuality(min_doc_words=10, max_symbol_word_ratio=0.2).keep(stored) == (False, "gopher_too_many_end_ellipsis")
    relaxed = GopherQuality(min_doc_words=10, max_symbol_word_ratio=0.2, max_ellipsis_lines_ratio=0.5)
    assert relaxed.keep(stored) == (False, "gopher_below_alpha_threshold")
    assert GopherQuality(min_doc_words=None, max_symbol_word_ratio=None, max_ellipsis_lines_ratio=None,
                         min_alpha_words_ratio=0.6).keep(stored) == (True, None)
    assert GopherQuality(min_doc_words=None, max_symbol_word_ratio=None, max_ellipsis_lines_ratio=None,
                         min_alpha_words_ratio=None, min_stop_words=4).keep(stored) == (False, "gopher_few_stop_words")


def test_gopher_quality_empty_text_is_short_not_an_error():
    row = one(GopherQuality(), "")
    assert row["rejected"]["reason"] == "gopher_short_doc" and row["scores"]["gopher_mean_word_len"] == 0


# --- Gopher repetition ---------------------------------------------------------------------------

# Two identical paragraphs of 27 characters; 56 characters in all; tokens:
# alpha beta alpha beta gamma alpha beta alpha beta gamma
REP_TEXT = "alpha beta\nalpha beta\ngamma\n\nalpha beta\nalpha beta\ngamma"


def test_gopher_repetition_statistics_by_hand():
    assert len(REP_TEXT) == 56
    s = rules.gopher_repetition_stats(REP_TEXT)
    assert s["gopher_dup_para_frac"] == pytest.approx(1 / 2)
    assert s["gopher_dup_para_char_frac"] == pytest.approx(27 / 56)
    assert s["gopher_dup_line_frac"] == pytest.approx(4 / 6)  # lines split on runs of newlines
    assert s["gopher_dup_line_char_frac"] == pytest.approx((3 * 10 + 5) / 56)
    assert s["gopher_top_2gram_frac"] == pytest.approx(4 * len("alpha beta") / 56)
    # three 3-grams occur twice; the first one seen wins the tie, as Counter.most_common does
    assert s["gopher_top_3gram_frac"] == pytest.approx(2 * len("alpha beta alpha") / 56)
    assert s["gopher_top_4gram_frac"] == pytest.approx(2 * len("alpha beta alpha beta") / 56)
    # the 5-gram at token 5 repeats the one at token 0; characters counted without separators
    assert s["gopher_dup_5gram_frac"] == pytest.approx(len("alphabetaalphabetagamma") / 56)
    assert s["gopher_dup_6gram_frac"] == 0 and s["gopher_dup_10gram_frac"] == 0


def test_duplicated_ngrams_do_not_overlap_a_counted_repeat():
    text = " ".join(["a"] * 12)  # 23 characters; 8 identical 5-grams
    s = rules.gopher_repetition_stats(text, top_ns=(), dup_ns=(5,))
    # windows 0 (new), 1 (repeat: +5, jump to 6), 6 (repeat: +5, jump to 11 = end)
    assert s["gopher_dup_5gram_frac"] == pytest.approx(10 / 23)


def test_gopher_repetition_reasons_in_datatrove_order_and_reapplied():
    row = one(GopherRepetition(), REP_TEXT)
    assert row["rejected"]["reason"] == "gopher_dup_para_frac"
    stored = {"id": "x", "scores": row["scores"]}
    assert GopherRepetition(dup_para_frac=None, dup_para_char_frac=0.5).keep(stored) == (False, "gopher_dup_line_frac")
    no_lines = GopherRepetition(dup_para_frac=None, dup_para_char_frac=None, dup_line_frac=None, dup_line_char_frac=None)
    assert no_lines.keep(stored) == (False, "gopher_top_2gram")
    only_dup = GopherRepetition(dup_para_frac=None, dup_para_char_frac=None, dup_line_frac=None,
                                dup_line_char_frac=None, top_n_grams={2: None, 3: None, 4: None})
    assert only_dup.keep(stored) == (False, "gopher_dup_5gram")


def test_gopher_repetition_config_rejects_unigrams():
    with pytest.raises(ValidationError):
        GopherRepetition(top_n_grams={1: 0.5})


# --- C4 ------------------------------------------------------------------------------------------

C4_LINES = [
    "This is a good sentence. And another one here.",  # kept, 2 sentences
    "Too short.",  # 2 words
    "No punctuation at the end",
    "Please enable JavaScript to view this.",
    "Read our privacy policy for details.",
    "Ends with an ellipsis like this...",
    "",  # blank: a paragraph break, not counted
    "Citation here is fine.[1]",  # kept without "[1]"
    "A line with a { curly brace.",  # kept, flags the document
    "x" * 1001 + " end.",  # a word over 1000 characters
]


def test_c4_line_rules_by_hand():
    text, s = rules.c4_clean("\n".join(C4_LINES))
    assert text == "This is a good sentence. And another one here.\nCitation here is fine.\nA line with a { curly brace."
    assert s["c4_n_lines"] == 9 and s["c4_lines_removed"] == 6
    assert s["c4_removed_line_frac"] == pytest.approx(6 / 9)
    kept_chars = len(C4_LINES[0]) + len("Citation here is fine.") + len(C4_LINES[8])
    assert s["c4_removed_char_frac"] == pytest.approx(1 - kept_chars / sum(len(x) for x in C4_LINES))
    assert (s["c4_lines_long_word"], s["c4_lines_no_terminal_punct"], s["c4_lines_too_few_words"],
            s["c4_lines_javascript"], s["c4_lines_policy"]) == (1, 2, 1, 1, 1)
    assert s["c4_n_sentences"] == 4 and s["c4_curly_bracket"] == 1 and s["c4_lorem_ipsum"] == 0


def test_c4_document_rules_reapplied_after_text_is_gone():
    row = one(C4(), "\n".join(C4_LINES))
    assert row["rejected"]["reason"] == "c4_curly_bracket"
    assert row["text"].count("\n") == 2  # the row carries the cleaned text
    stored = {"id": "x", "scores": row["scores"]}
    assert C4(filter_curly_bracket=False).keep(stored) == (False, "c4_too_few_sentences")
    assert C4(filter_curly_bracket=False, min_num_sentences=4).keep(stored) == (True, None)
    assert C4(filter_curly_bracket=False, min_num_sentences=-1).keep(stored) == (True, None)


def test_c4_lorem_ipsum_only_counts_on_surviving_lines():
    assert rules.c4_clean("Lorem ipsum dolor sit amet.")[1]["c4_lorem_ipsum"] == 1
    assert rules.c4_clean("lorem ipsum dolor sit amet")[1]["c4_lorem_ipsum"] == 0  # line dropped first
    assert C4().keep({"scores": rules.c4_clean("Lorem ipsum dolor sit amet.")[1]}) == (False, "c4_lorem_ipsum")


def test_c4_sentence_count_and_disabled_line_rules():
    assert rules.count_sentences("One is here. Two is here! Three? four.") == 3  # no break before lowercase
    text, s = rules.c4_clean("no punctuation at all\nok", filter_no_terminal_punct=False, min_words_per_line=-1)
    assert text == "no punctuation at all\nok" and s["c4_lines_removed"] == 0


def test_c4_leaves_conversations_untouched():
    row = {"id": "c", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there you."}]}
    out = process_batch(C4(min_num_sentences=1), [row])
    assert out.kept[0]["messages"] == row["messages"] and "text" not in out.kept[0]
    assert out.kept[0]["scores"]["c4_lines_removed"] == 1


# --- FineWeb -------------------------------------------------------------------------------------

# non-blank lines: 29, 9, 9 and 37 characters; 88 characters with 4 newlines; 18 tokens
FW_TEXT = "This line ends with a period.\nshort one\nshort one\n\nAnother long line without a stop mark"


def test_fineweb_statistics_by_hand():
    assert len(FW_TEXT) == 88
    s = rules.fineweb_stats(FW_TEXT)
    assert s["fineweb_n_lines"] == 4
    assert s["fineweb_line_punct_ratio"] == pytest.approx(1 / 4)
    assert s["fineweb_short_line_ratio"] == pytest.approx(3 / 4)  # <= 30 characters
    assert s["fineweb_char_dup_ratio"] == pytest.approx(9 / 84)  # the second "short one"
    assert s["fineweb_list_ratio"] == pytest.approx(4 / 18)


def test_fineweb_decisions_reapplied():
    row = one(FineWebQuality(), FW_TEXT)
    assert row["rejected"]["reason"] == "fineweb_short_line_ratio"
    stored = {"id": "x", "scores": row["scores"]}
    assert FineWebQuality(line_punct_thr=0.3).keep(stored) == (False, "fineweb_line_punct_ratio")
    assert FineWebQuality(short_line_thr=0.8).keep(stored) == (False, "fineweb_char_dup_ratio")
    assert FineWebQuality(short_line_thr=0.8, char_duplicates_ratio=0.2).keep(stored) == (True, None)
    assert FineWebQuality(short_line_thr=0.8, char_duplicates_ratio=0.2, new_line_ratio=0.2).keep(stored) == (False, "fineweb_list_ratio")
    assert one(FineWebQuality(), "\n \n")["rejected"]["reason"] == "fineweb_empty"


def test_fineweb_exclude_zero_lets_unpunctuated_text_through():
    s = {"scores": rules.fineweb_stats("a long line of words without any stop\n" * 2)}
    assert FineWebQuality().keep(s) == (False, "fineweb_line_punct_ratio")
    assert FineWebQuality(line_punct_exclude_zero=True, char_duplicates_ratio=None).keep(s) == (True, None)


# --- line filter ---------------------------------------------------------------------------------

PROSE = ("More real prose about the privacy policy debate in Congress, which goes on for many words, "
         "well past thirty of them, so that it is clearly a paragraph of prose and not a cookie banner "
         "at all, as anyone reading it can tell.")


def test_line_filter_drops_short_boilerplate_lines_only():
    assert len(PROSE.split()) > 30
    text = f"Welcome to the article body.\n\nWe use cookies to improve your experience.\n\nAll rights reserved 2024\n\n{PROSE}"
    row = one(LineFilter(), text)
    assert "rejected" not in row
    assert row["text"] == f"Welcome to the article body.\n\n{PROSE}"
    s = row["scores"]
    assert s["line_filter_lines_removed"] == 2 and s["line_filter_lines_left"] == 2
    assert s["line_filter_removed_frac"] == pytest.approx(2 / 4)
    removed = len("We use cookies to improve your experience.") + len("All rights reserved 2024")
    assert s["line_filter_removed_char_frac"] == pytest.approx(removed / len(text))
    stored = {"id": "x", "scores": s}
    assert LineFilter(max_removed_frac=0.4).keep(stored) == (False, "line_filter_boilerplate")


def test_line_filter_user_patterns_file_and_empty_result(tmp_path):
    patterns = tmp_path / "p.txt"
    patterns.write_text("# one regex per line\n^menu\\b\n", encoding="utf-8")
    stage = LineFilter(name="nav", patterns=[], patterns_file=str(patterns))
    row = one(stage, "Menu | Home | About\nMENU again")
    assert row["rejected"] == {"stage": "nav", "reason": "nav_empty"} and row["scores"]["nav_lines_left"] == 0
    assert one(stage, "We use cookies on this site.")["text"] == "We use cookies on this site."  # defaults replaced


def test_line_filter_bad_config_is_a_clear_error(tmp_path):
    from dataflywheel.errors import UserError

    with pytest.raises(ValidationError, match="bad regex"):
        LineFilter(patterns=["(unclosed"])
    with pytest.raises(UserError, match="patterns_file"):
        LineFilter(patterns_file=str(tmp_path / "missing.txt"))


def test_stages_are_registered():
    assert [stage_class(n) for n in ("gopher_quality", "gopher_repetition", "c4", "fineweb_quality", "line_filter")] == [
        GopherQuality, GopherRepetition, C4, FineWebQuality, LineFilter]


# --- real articles vs generated junk -------------------------------------------------------------

STAGES = (GopherQuality, GopherRepetition, C4, FineWebQuality, LineFilter)


def _articles(shared_data, n: int = 40) -> list[dict]:
    truth = json.loads((shared_data / "article_extraction_benchmark" / "ground-truth.json").read_text(encoding="utf-8"))
    return [{"id": k, "text": v["articleBody"]} for k, v in sorted(truth.items())[:n]]


def _junk() -> list[dict]:
    words = "buy cheap pills online now best price".split()
    texts = {
        "repeated_sentence": "Buy cheap pills online now at the best price and save. " * 60,
        "repeated_lines": "\n".join(["Click the link below to win a prize today"] * 40),
        "hashtags": " ".join(f"#{w}{i} #{w}" for i, w in enumerate(words * 12)),
        "symbols": "\n".join("$$$ ** >> << || ~~ " + " ".join(words) + " ..." for _ in range(30)),
        "word_salad": " ".join(words[i * 7 % len(words)] for i in range(400)),
        "nav_list": "\n".join(f"- {w.title()}" for w in words * 10),
    }
    return [{"id": k, "text": t} for k, t in texts.items()]


def test_real_articles_mostly_kept_junk_rejected(shared_data):
    articles = _articles(shared_data)
    for cls in STAGES:
        kept = len(process_batch(cls(), articles).kept)
        assert kept >= 0.75 * len(articles), (cls.stage_name, kept)
    survivors = _junk()
    for cls in (GopherQuality, GopherRepetition, FineWebQuality):
        survivors = process_batch(cls(), survivors).kept
    assert survivors == []


def test_beam_fnapirunner_matches_plain_loop(shared_data):
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    from dataflywheel.pipelines.stage_transform import ApplyStage

    rows = _articles(shared_data, 20) + _junk()
    expected_kept, expected_rejected, batch = [], [], rows
    for cls in STAGES:
        out = process_batch(cls(), batch)
        expected_rejected += [(r["id"], r["rejected"]["stage"], r["rejected"]["reason"]) for r in out.rejected]
        batch = out.kept
    expected_kept = [(r["id"], r["text"], json.dumps(r["scores"], sort_keys=True)) for r in batch]
    assert expected_kept and expected_rejected

    with beam.Pipeline(runner=FnApiRunner()) as p:
        pcoll = p | beam.Create(rows)
        rejected = []
        for i, cls in enumerate(STAGES):
            outs = pcoll | f"S{i}" >> ApplyStage(cls(batch_size=7), batched=(i > 0))
            rejected.append(outs["rejected"])
            pcoll = outs["kept"]
        kept = pcoll | "K" >> beam.FlatMap(lambda b: [(r["id"], r["text"], json.dumps(r["scores"], sort_keys=True)) for r in b])
        rej = (tuple(rejected) | beam.Flatten()
               | "R" >> beam.FlatMap(lambda b: [(r["id"], r["rejected"]["stage"], r["rejected"]["reason"]) for r in b]))
        assert_that(kept, equal_to(expected_kept), label="kept")
        assert_that(rej, equal_to(expected_rejected), label="rejected")
