"""URL filter: normalization, each rule on the shipped lists and on lists written to tmp_path,
score-then-decide re-application, and the Beam wrapper on the pinned FnApiRunner."""

from __future__ import annotations

import random
import re
import time

import pytest

from dataflywheel.errors import UserError
from dataflywheel.filters.url import (
    SHIPPED_LISTS,
    UrlFilter,
    domain_match,
    load_entries,
    normalize_url,
    read_list,
    squash,
    substring_automaton,
    url_match,
)
from dataflywheel.registry import stage_class
from dataflywheel.stages import process_batch


def make(**cfg) -> UrlFilter:
    stage = UrlFilter(**cfg)
    stage.setup()
    return stage


def docs(*urls):
    return [{"id": f"d{i}", "text": "body", "url": u} for i, u in enumerate(urls)]


def outcome(stage, rows):
    out = process_batch(stage, rows)
    assert out.rows_in == len(rows) and not out.dead
    return [r["id"] for r in out.kept], {r["id"]: r["rejected"]["reason"] for r in out.rejected}, out


@pytest.mark.parametrize("raw, url, host", [
    ("HTTP://WWW.Example.COM:80/a%7Eb%2Fc?q=1#frag", "http://example.com/a~b%2Fc?q=1", "example.com"),
    ("https://Example.com:443", "https://example.com/", "example.com"),
    ("https://example.com:8443/x", "https://example.com:8443/x", "example.com"),
    ("example.com/Path", "http://example.com/Path", "example.com"),  # paths keep their case
    ("http://user:pw@Host.TEST./p%2f", "http://host.test/p%2F", "host.test"),
    ("http://BÜCHER.test/", "http://xn--bcher-kva.test/", "xn--bcher-kva.test"),
    ("http://[::1]:80/x", "http://[::1]/x", "::1"),
])
def test_normalize_url(raw, url, host):
    norm = normalize_url(raw)
    assert (norm.url, norm.host) == (url, host)


def test_normalize_url_never_raises_and_decodes_the_match_text():
    assert normalize_url("http://bad host:99999/x").host == ""
    assert normalize_url("http://a.test/%43ASINO+Night").text == "a.test/casino night"
    assert normalize_url("http://xn--bcher-kva.test/Ä").text == "bücher.test/ä"


def test_domain_match_is_exact_or_parent_never_a_mere_suffix():
    domains = {"bad.test": "l", "10.0.0.1": "l"}
    assert domain_match("bad.test", domains) == "bad.test"
    assert domain_match("a.b.bad.test", domains) == "bad.test"
    assert domain_match("notbad.test", domains) is None
    assert domain_match("10.0.0.1", domains) == "10.0.0.1"
    assert domain_match("10.0.0.1", {"0.0.1": "l"}) is None  # an IP matches only exactly


def test_url_match_covers_paths_below_an_entry():
    urls = {"site.test/~user": "l", "other.test/a?q=1": "l"}
    assert url_match("site.test/~user/page.html", urls) == "site.test/~user"
    assert url_match("site.test/~username", urls) is None
    assert url_match("other.test/a?q=1", urls) == "other.test/a?q=1"
    assert url_match("other.test/a?q=2", urls) is None


def test_shipped_lists_reject_each_rule_with_its_reason():
    stage = make()
    rows = docs(
        "https://deep.sub.example-bad-casino.test/x",  # parent domain listed
        "http://ok.test/dfwsoftone/dfwsofttwo",  # two soft words
        "http://ok.test/dfwsoftone/dfwsoftone",  # one distinct soft word
        "http://ok.test/a-DFW-badsub-z",  # substring across punctuation
        "http://ok.test/%64fwbannedword/",  # banned word, percent-encoded
        "http://ok.test/xdfwbannedwordx",  # not a whole word
        "http://ok.test/",
    )
    kept, rejected, out = outcome(stage, rows)
    assert kept == ["d2", "d5", "d6"]
    assert rejected == {"d0": "domain_blocklist", "d1": "soft_banned_words", "d3": "banned_substring", "d4": "banned_word"}
    audit = {r["id"]: r["meta"]["url_matches"] for r in out.rejected}
    assert audit["d0"] == [{"rule": "domain_blocklist", "list": "blocklists/domains.txt", "entry": "example-bad-casino.test"}]
    assert audit["d3"][0]["entry"] == "dfwbadsub"
    scores = {r["id"]: r["scores"] for r in out.kept + out.rejected}
    assert scores["d1"]["url_soft_hits"] == 2 and scores["d1"]["url_banned"] == 0
    assert scores["d4"]["url_banned"] == 1 and scores["d6"]["url_banned"] == 0


def write(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def lists(tmp_path):
    (tmp_path / "adult").mkdir()
    return {
        "domain_files": [
            write(tmp_path / "adult" / "domains", "# UT1 style", "adult.test", "", "10.1.2.3"),
            write(tmp_path / "hosts.txt", "0.0.0.0 tracker.test", "*.wild.test", "BÜCHER.test"),
        ],
        "url_files": [write(tmp_path / "adult" / "urls", "pages.test/~bad", "https://cdn.test/x/")],
        "banned_word_files": [write(tmp_path / "banned.txt", "Forbidden", "#commented")],
        "soft_word_files": [write(tmp_path / "soft.txt", "cheap", "free", "pills")],
        "banned_substring_files": [write(tmp_path / "sub.txt", "evilcorp")],
        "allow_domain_files": [write(tmp_path / "allow.txt", "good.adult.test")],
    }


def test_user_lists_from_several_files(lists):
    stage = make(**lists)
    rows = docs(
        "http://www.adult.test/", "http://x.tracker.test", "http://a.b.wild.test/", "http://bücher.test/",
        "http://xn--bcher-kva.test/", "http://10.1.2.3/", "http://good.adult.test/forbidden",
        "http://pages.test/~bad/1.html", "http://cdn.test/x/y", "http://cdn.test/xy",
        "http://shop.test/FORBIDDEN", "http://shop.test/cheap-free", "http://shop.test/cheap",
        "http://shop.test/Evil-Corp.html", "http://commented.test/",
    )
    kept, rejected, out = outcome(stage, rows)
    assert kept == ["d6", "d9", "d12", "d14"]
    assert rejected == {
        "d0": "domain_blocklist", "d1": "domain_blocklist", "d2": "domain_blocklist", "d3": "domain_blocklist",
        "d4": "domain_blocklist", "d5": "domain_blocklist", "d7": "url_blocklist", "d8": "url_blocklist",
        "d10": "banned_word", "d11": "soft_banned_words", "d13": "banned_substring",
    }
    audit = {r["id"]: r["meta"]["url_matches"][0] for r in out.rejected}
    assert (audit["d0"]["list"], audit["d0"]["entry"]) == ("adult/domains", "adult.test")
    assert audit["d1"]["list"].endswith("/hosts.txt") and audit["d1"]["entry"] == "tracker.test"
    assert (audit["d8"]["list"], audit["d8"]["entry"]) == ("adult/urls", "cdn.test/x")
    allowed = next(r for r in out.kept if r["id"] == "d6")
    assert allowed["scores"]["url_allowed"] == 1 and allowed["scores"]["url_domain_hit"] == 1


def test_thresholds_reapply_from_stored_scores(lists):
    scored = make(**lists).score(docs("http://shop.test/cheap-free-pills", "http://shop.test/cheap-free"))
    strict = UrlFilter(**lists)  # keep() needs no lists: it reads only the stored scores
    lenient = UrlFilter(**{**lists, "soft_word_threshold": 3})
    assert [strict.keep(r) for r in scored] == [(False, "soft_banned_words")] * 2
    assert [lenient.keep(r) for r in scored] == [(False, "soft_banned_words"), (True, None)]


def test_missing_url_policy_and_url_in_meta():
    rows = [{"id": "a", "text": "t"}, {"id": "b", "text": "t", "url": "  "},
            {"id": "c", "text": "t", "meta": {"url": "http://example-malware.test/"}}]
    kept, rejected, _ = outcome(make(), rows)
    assert kept == ["a", "b"] and rejected == {"c": "domain_blocklist"}
    kept, rejected, _ = outcome(make(missing_url="reject"), rows)
    assert kept == [] and rejected == {"a": "missing_url", "b": "missing_url", "c": "domain_blocklist"}


def test_empty_lists_and_bad_paths(tmp_path):
    stage = make(domain_files=[], banned_word_files=[], soft_word_files=[], banned_substring_files=[])
    kept, _, _ = outcome(stage, docs("http://example-bad-casino.test/dfwbannedword"))
    assert kept == ["d0"]
    with pytest.raises(UserError, match="cannot read list file"):
        make(domain_files=[str(tmp_path / "absent.txt")])


def test_registered_and_config_checked():
    assert stage_class("url_filter") is UrlFilter
    with pytest.raises(ValueError):
        UrlFilter(soft_word_treshold=3)  # misspelt key: extra=forbid


def test_shipped_domains_are_illustrative_only():
    entries = read_list(SHIPPED_LISTS / "domains.txt")
    assert "example-bad-casino.test" in entries
    assert all(e.endswith(".test") for e in entries)  # RFC 2606 reserved TLD: no real site is listed


def test_beam_fnapi_runner_matches_the_plain_loop(lists):
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    from dataflywheel.pipelines.stage_transform import ApplyStage

    rows = docs(*[f"http://site{i}.test/p{i}" for i in range(20)], "http://adult.test/", "http://shop.test/cheap/free")
    kept, rejected, _ = outcome(make(**lists), rows)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        outs = p | beam.Create(rows) | ApplyStage(UrlFilter(batch_size=8, **lists), batched=False)
        ids = outs["kept"] | "K" >> beam.FlatMap(lambda b: [r["id"] for r in b])
        why = outs["rejected"] | "R" >> beam.FlatMap(lambda b: [(r["id"], r["rejected"]["reason"]) for r in b])
        assert_that(ids, equal_to(kept), label="kept")
        assert_that(why, equal_to(sorted(rejected.items())), label="rejected")


def test_benchmark_urls_per_second(lists, tmp_path):
    """Printed, not asserted: URLs/s through the stage, and Aho-Corasick vs one regex alternation."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    n_sub = 2000
    letters = "abcdefghijklmnopqrstuvwxyz"
    subs = write(tmp_path / "subs.txt", *["".join(rng.choices(letters, k=rng.randrange(8, 14))) for _ in range(n_sub)])
    urls = [f"https://{rng.choice(words)}.site{rng.randrange(1000)}.test/{'/'.join(rng.sample(words, 5))}?id={i}"
            for i in range(20_000)]
    stage = make(**{**lists, "banned_substring_files": [subs]})
    rows = docs(*urls)
    start = time.perf_counter()
    out = process_batch(stage, rows)
    rate = len(rows) / (time.perf_counter() - start)
    assert len(out.kept) == len(rows)  # none of the generated URLs is listed

    entries = load_entries([subs], squash)
    auto = substring_automaton(entries)
    alternation = re.compile("|".join(map(re.escape, sorted(entries, key=len, reverse=True))))
    texts = [squash(normalize_url(u).text) for u in urls]
    t0 = time.perf_counter()
    ac = sum(1 for t in texts if next(auto.iter(t), None))
    t1 = time.perf_counter()
    rx = sum(1 for t in texts if alternation.search(t))
    t2 = time.perf_counter()
    assert ac == rx == 0
    print(f"\nurl_filter: {rate:,.0f} URLs/s; banned substrings ({n_sub} entries): "
          f"Aho-Corasick {len(texts) / (t1 - t0):,.0f} URLs/s vs regex alternation {len(texts) / (t2 - t1):,.0f} URLs/s")
