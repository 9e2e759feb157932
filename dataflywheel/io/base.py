"""What every reader yields: a record dict, or a DeadLetter saying where and why a record was lost."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DeadLetter:
    """A record, or a whole file or byte stream, that could not be read or processed.

    Exactly the fields a person needs to find the bad input: the file, the 1-based line, the byte
    offset or the row number, a stable reason code and a human detail.

    ``scope`` is ``"record"`` for one bad record and ``"file"`` for a report about a whole file or
    byte stream (a broken gzip / zstd stream, trailing garbage, an unreadable Parquet footer, not a
    WARC...). ``records`` is how many input records the letter stands for as lost: 1 for a record,
    the known count for a file (e.g. a Parquet footer's row count), 0 for a warning that loses
    nothing, and 0 when the count cannot be known, in which case the detail says "row count unknown".
    """

    source: str
    reason: str
    detail: str = ""
    line: int | None = None
    offset: int | None = None
    row: int | None = None
    records: int = 1  # input records this letter stands for as lost (0: none, or unknown: see the detail)
    stage: str = "read"
    snippet: str | None = None  # first bytes of the bad record, for eyeballing (never the whole)
    scope: str = "record"  # RECORD, or FILE for a whole file or byte stream

    def to_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def where(self) -> str:
        loc = self.source
        for name in ("line", "row", "offset"):
            value = getattr(self, name)
            if value is not None:
                loc += f":{name} {value}"
        return loc

    def __str__(self) -> str:
        return f"{self.where()}: {self.reason}" + (f": {self.detail}" if self.detail else "")


RECORD, FILE = "record", "file"  # the values of DeadLetter.scope
UNKNOWN_COUNT = "row count unknown"  # said by every file-level letter whose lost records cannot be counted

Item = dict | DeadLetter
Items = Iterator[Item]


def snippet(raw: bytes | str, limit: int = 120) -> str:
    """A short printable prefix of a bad record for the dead-letter output."""
    if isinstance(raw, bytes):
        raw = raw[:limit].decode("utf-8", errors="backslashreplace")
    return raw[:limit]
