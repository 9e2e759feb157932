"""URL filter (datatrove ``url_filter.py``, docs/sources.md#url-filter; step 2 of #cleaning-pipeline-order): score, then decide.

Rules, checked in datatrove's order, each with its reason code:

- ``domain_blocklist``: the host or any parent domain is listed (``a.b.bad.test`` matches
  ``bad.test``), by set lookups over the host's suffixes, not a regex;
- ``url_blocklist``: the URL without scheme, or any of its path prefixes, is listed (UT1 ``urls``);
- ``banned_word``: any URL word is a banned word;
- ``soft_banned_words``: at least ``soft_word_threshold`` distinct soft-banned words occur;
- ``banned_substring``: a banned substring occurs in the URL with non-word characters removed
  (datatrove's ``normalize``), found by one Aho-Corasick automaton (pyahocorasick).

An allowlisted domain (same suffix rule) is always kept. Every rule is scored (``url_*`` counts),
so thresholds can be re-applied from the stored scores; which entry of which list matched is kept
in ``meta.url_matches`` for audit.

URL normalization (``normalize_url``): scheme and host lowercased; user info, default ports
(http 80, https 443, ftp 21), a trailing dot, a leading ``www.`` and the fragment dropped; unicode
hosts IDNA-encoded (punycode); an empty path becomes ``/``; percent-escapes of unreserved characters
(RFC 3986 §2.3: letters, digits, ``-._~``) decoded and the other escapes upper-cased, so the
canonical URL names the same resource. Words and substrings are matched on a fully decoded,
NFKC-normalized, casefolded text (unicode host, path, query), so ``%63asino`` and ``CASINO`` both
read ``casino``; words are the runs of unicode letters and digits.
"""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote_plus, urlsplit

import ahocorasick
from pydantic import Field

from ..errors import UserError
from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from .text import with_scores

SHIPPED_LISTS = Path(__file__).resolve().parent.parent / "data" / "blocklists"
_NON_WORD = re.compile(r"[\W_]+")  # datatrove splits on [^a-zA-Z0-9]+; this is its unicode form
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")  # RFC 3986 §2.3
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


def read_list(path: str | Path) -> list[str]:
    """A list file's entries: one per line; blank lines and lines starting with ``#`` skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [s for line in f if (s := line.strip()) and not s.startswith("#")]
    except OSError as err:
        raise UserError(f"cannot read list file {path}: {err.strerror or err}") from None


def list_label(path: str | Path) -> str:
    """A short name for a list in audit records: its last two path parts (UT1: ``adult/domains``)."""
    return "/".join(Path(path).parts[-2:])


def normalize_host(host: str) -> str:
    """Lowercase, no trailing dot, no leading ``www.``, IDNA (punycode) for unicode labels."""
    host = host.strip().rstrip(".").lower()
    host = host.removeprefix("www.")
    if host.isascii():  # the codec would only re-check label lengths
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:  # an empty or over-long label: keep it as written
        return host


def _unicode_host(host: str) -> str:
    if "xn--" not in host:
        return host
    try:
        return host.encode("ascii").decode("idna")
    except UnicodeError:
        return host


def _safe_unquote(part: str) -> str:
    def fix(m: re.Match) -> str:
        char = chr(int(m[1], 16))
        return char if char in _UNRESERVED else "%" + m[1].upper()

    return _PCT.sub(fix, part)


def match_text(text: str) -> str:
    """Fully percent-decoded, NFKC, casefolded: what words and substrings are matched in."""
    return unicodedata.normalize("NFKC", unquote_plus(text, errors="replace")).casefold()


def squash(text: str) -> str:
    """Non-word characters removed (datatrove ``normalize``): the banned-substring haystack."""
    return _NON_WORD.sub("", text)


@dataclass(frozen=True)
class NormalizedUrl:
    url: str  # canonical URL
    host: str  # ASCII host: no www., no port
    key: str  # canonical URL without scheme and trailing slash: the URL-list key
    text: str  # decoded, casefolded host + path + query (match_text)


def normalize_url(url: str) -> NormalizedUrl:
    """Canonical form of a URL (see the module doc); never raises, an unparsable URL keeps its text."""
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw.lstrip("/")
    try:
        parts = urlsplit(raw)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a bad port or IPv6 literal: no host rules, words still apply
        return NormalizedUrl(url=raw, host="", key=raw.split("://", 1)[1], text=match_text(raw.split("://", 1)[1]))
    scheme = parts.scheme.lower()
    host = normalize_host(host)
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and _DEFAULT_PORTS.get(scheme) != port:
        netloc += f":{port}"
    path = _safe_unquote(parts.path) or "/"
    query = _safe_unquote(parts.query)
    tail = path + (f"?{query}" if query else "")
    text = match_text(_unicode_host(host) + parts.path + (f"?{parts.query}" if parts.query else ""))
    return NormalizedUrl(url=f"{scheme}://{netloc}{tail}", host=host, key=(netloc + tail).rstrip("/"), text=text)


def url_words(text: str) -> set[str]:
    return {w for w in _NON_WORD.split(text) if w}


def _is_ip(host: str) -> bool:
    if ":" not in host and not host[-1].isdigit():  # no TLD ends in a digit: skip the parse
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def domain_match(host: str, domains: dict[str, str]) -> str | None:
    """The listed domain that ``host`` equals or is a subdomain of, or None (IPs match exactly)."""
    if not host or not domains:
        return None
    if _is_ip(host):
        return host if host in domains else None
    labels = host.split(".")
    for i in range(len(labels)):
        suffix = ".".join(labels[i:])
        if suffix in domains:
            return suffix
    return None


def url_match(key: str, urls: dict[str, str]) -> str | None:
    """The listed URL equal to ``key`` or to one of its path prefixes (``host/a`` covers ``host/a/b``)."""
    if not urls:
        return None
    if key in urls:
        return key
    base = key.split("?", 1)[0]
    while base:
        if base in urls:
            return base
        if "/" not in base:
            return None
        base = base.rsplit("/", 1)[0]
    return None


def _domain_entry(line: str) -> str:
    # hosts-file lines ("0.0.0.0 bad.test") name the domain last; "*.bad.test" means bad.test and below
    return normalize_host(line.split()[-1].lstrip("*."))


def load_entries(paths: list[str], normalize: Callable[[str], str]) -> dict[str, str]:
    """entry -> label of the first list that has it, over several list files."""
    entries: dict[str, str] = {}
    for path in paths:
        label = list_label(path)
        for line in read_list(path):
            if entry := normalize(line):
                entries.setdefault(entry, label)
    return entries


def substring_automaton(entries: dict[str, str]) -> ahocorasick.Automaton | None:
    """One Aho-Corasick automaton over all entries: a scan is linear in the text, whatever the list size."""
    if not entries:
        return None
    auto = ahocorasick.Automaton()
    for entry, label in entries.items():
        auto.add_word(entry, (entry, label))
    auto.make_automaton()
    return auto


def _word_entry(line: str) -> str:
    return squash(match_text(line))  # entries are normalized like the URL text they are matched in


def list_files(value: list[str] | None, shipped: str) -> list[str]:
    """The configured list files; None means the project's shipped file of that name."""
    return [str(SHIPPED_LISTS / shipped)] if value is None else value


class UrlFilterConfig(StageConfig):
    # None: the project's small illustrative list in dataflywheel/data/blocklists (see its README.md)
    domain_files: list[str] | None = None
    url_files: list[str] = []  # UT1 ``urls`` files: URLs without scheme, path prefixes block below them
    banned_word_files: list[str] | None = None
    soft_word_files: list[str] | None = None
    banned_substring_files: list[str] | None = None
    allow_domain_files: list[str] = []  # domains (and their subdomains) always kept
    soft_word_threshold: int = Field(2, ge=1)  # datatrove URLFilter(soft_word_threshold=2)
    url_field: str = "url"  # read from the row, else from row["meta"]
    missing_url: Literal["keep", "reject"] = "keep"
    batch_size: int = 1024


@register("url_filter")
class UrlFilter(Scorer, Filter):
    """Scores ``url_*`` rule counts and decides by them (module doc); rows without a URL per ``missing_url``."""

    Config = UrlFilterConfig
    resources = ("domains", "urls", "banned", "soft", "substrings", "allowed")  # the lists, read on each worker

    def build(self) -> None:
        cfg = self.config

        self.domains = load_entries(list_files(cfg.domain_files, "domains.txt"), _domain_entry)
        self.urls = load_entries(cfg.url_files, lambda line: normalize_url(line).key)
        self.banned = load_entries(list_files(cfg.banned_word_files, "banned_words.txt"), _word_entry)
        self.soft = load_entries(list_files(cfg.soft_word_files, "soft_banned_words.txt"), _word_entry)
        self.substrings = substring_automaton(load_entries(list_files(cfg.banned_substring_files, "banned_substrings.txt"), _word_entry))
        self.allowed = load_entries(cfg.allow_domain_files, _domain_entry)

    def _url(self, row: dict) -> str:
        url = row.get(self.config.url_field) or (row.get("meta") or {}).get(self.config.url_field)
        return url if isinstance(url, str) else ""

    def score_url(self, url: str) -> tuple[dict[str, float], list[dict]]:
        """The ``url_*`` scores of one URL and the list entries it matched."""
        norm = normalize_url(url)
        matches = []

        def hit(rule: str, entry: str | None, table: dict[str, str]) -> float:
            if entry is None:
                return 0.0
            matches.append({"rule": rule, "list": table[entry], "entry": entry})
            return 1.0

        words = url_words(norm.text)
        banned = sorted(words & self.banned.keys())
        soft = sorted(words & self.soft.keys())
        found = list(self.substrings.iter(squash(norm.text))) if self.substrings else []
        for word in banned:
            matches.append({"rule": "banned_word", "list": self.banned[word], "entry": word})
        for word in soft:
            matches.append({"rule": "soft_banned_words", "list": self.soft[word], "entry": word})
        for entry, label in dict(v for _, v in found).items():
            matches.append({"rule": "banned_substring", "list": label, "entry": entry})
        scores = {
            "url_allowed": 1.0 if domain_match(norm.host, self.allowed) else 0.0,
            "url_domain_hit": hit("domain_blocklist", domain_match(norm.host, self.domains), self.domains),
            "url_path_hit": hit("url_blocklist", url_match(norm.key, self.urls), self.urls),
            "url_banned_words": float(len(banned)),
            "url_soft_hits": float(len(soft)),
            "url_banned_substrings": float(len(found)),
        }
        hard = ("url_domain_hit", "url_path_hit", "url_banned_words", "url_banned_substrings")
        scores["url_banned"] = 1.0 if any(scores[k] for k in hard) else 0.0
        return scores, matches

    def score(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            url = self._url(row)
            if not url.strip():
                out.append(with_scores(row, {"url_missing": 1.0}))
                continue
            scores, matches = self.score_url(url)
            new = with_scores(row, scores)
            if matches:
                new["meta"] = {**(row.get("meta") or {}), "url_matches": matches}
            out.append(new)
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        s = row["scores"]
        if s.get("url_missing"):
            return (True, None) if self.config.missing_url == "keep" else (False, "missing_url")
        if s["url_allowed"]:
            return True, None
        for key, reason in (("url_domain_hit", "domain_blocklist"), ("url_path_hit", "url_blocklist"),
                            ("url_banned_words", "banned_word")):
            if s[key]:
                return False, reason
        if s["url_soft_hits"] >= self.config.soft_word_threshold:
            return False, "soft_banned_words"
        if s["url_banned_substrings"]:
            return False, "banned_substring"
        return True, None
