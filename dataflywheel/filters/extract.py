"""Main-content extraction from raw HTML, in a killable sandbox.

``backend`` picks the extractor (``filters/extract_backends.py``): ``trafilatura`` (default),
``resiliparse`` (optional extra, faster, lower quality) or ``module:function``. Modes map to
trafilatura's switches: ``precision`` (favor_precision; the default, as FineWeb: datatrove's
trafilatura extractor passes favour_precision=True), ``recall`` (favor_recall), ``balanced``
(trafilatura's own default) and ``fast`` (no fallback extractors). Precision mode drops what
balanced mode keeps from weak candidates, e.g. the ``<noscript>`` notice of a JavaScript-only page.

Extraction runs in a child process (``filters/sandbox.py``) started once per stage instance by
``build()`` and reused for every page, because trafilatura can hang on some pages
(adbar/trafilatura#704) and a hung call cannot be stopped in-process. A page over ``timeout_s``
is rejected ``timeout``; a page that kills the child (crash, OOM) is rejected
``extractor_crashed``; both keep their ``html`` so they can be retried, and the child is
respawned for the next pages. A backend that raises on a page makes that page a dead letter.
``sandbox: false`` runs the backend in-process (debugging; no timeout). Pages over
``max_html_bytes`` are rejected before they are sent, because parse time grows with page size.

Kept rows get ``text``, ``meta.url`` when known and ``meta.extractor`` (backend and mode), so a
dataset records how its text was made; with ``metadata: true`` also ``meta.title`` / ``meta.date``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..registry import register
from ..stages import Filter, Scorer, StageConfig
from .extract_backends import backend_target, check_backend_spec, resolve_backend
from .sandbox import CRASHED, ERROR, TIMEOUT, Answer, Sandbox

# Extracted once at child start-up, so lazy initialisation is not timed as a page. With metadata, the
# byline's date goes to dateparser, whose first call compiles regexes for ~200 locales (~1.5-2 s of
# CPU, measured): without this, the first dated page of every fresh child timed out at 1 s.
WARMUP_HTML = ("<html><head><title>Warm up</title></head><body><article><p>" + "Warm up text. " * 20
               + "</p><div class='byline'>Posted 3rd of Sept. 2019, 4pm</div></article></body></html>")


class ExtractError(RuntimeError):
    """The backend raised on a page; ``keep()`` raises it so the page becomes a dead letter."""


class ExtractConfig(StageConfig):
    backend: str = "trafilatura"  # trafilatura | resiliparse | module:function (extract_backends.py)
    # FineWeb's choice: datatrove's trafilatura extractor calls it with favour_precision=True
    # (trafilatura's benchmark, 990 pages: precision P 0.925 / R 0.915 vs balanced P 0.906 / R 0.943).
    mode: Literal["balanced", "precision", "recall", "fast"] = "precision"
    # meta.title / meta.date (trafilatura's with_metadata=True): off unless asked for, as they cost time.
    # Measured by benchmarks/extraction.py (trafilatura 2.3.1, 2 CPU cores): with metadata the default stage
    # ran at 0.64x its speed without it on the 693 trafilatura-eval pages (0.72x on the 127 article-benchmark
    # pages), i.e. 0.76x (0.82x) the speed of a bare trafilatura.extract() call timed alongside.
    metadata: bool = False
    include_comments: bool = False
    include_tables: bool = True
    max_html_bytes: int = Field(5_000_000, gt=0)
    keep_html: bool = False  # raw HTML is large; drop it once the text is out
    batch_size: int = 32  # pages per score() call, sent to the sandbox as one message
    sandbox: bool = True  # false: extract in-process, no timeout (debugging, overhead benchmark)
    # Per page, in CPU seconds of the sandbox child (wall time where /proc is missing): datatrove's
    # trafilatura extractor uses timeout=1 s per document.
    timeout_s: float = Field(1.0, gt=0)

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        return check_backend_spec(value)


@register("extract")
class Extract(Scorer, Filter):
    """``html`` -> ``text`` (+ ``meta.url``/``extractor``, and ``title``/``date`` with ``metadata``); rejects
    pages with no main text."""

    Config = ExtractConfig

    resources = ("_backend", "_sandbox")  # built by build(); never pickled (a live child stays behind)

    @property
    def extractor_name(self) -> str:
        backend = self.config.backend
        return backend if backend == "resiliparse" else f"{backend}/{self.config.mode}"

    @property
    def _settings(self) -> dict:
        c = self.config
        return {"mode": c.mode, "include_comments": c.include_comments, "include_tables": c.include_tables,
                "metadata": c.metadata}

    def build(self) -> None:
        self._backend = resolve_backend(self.config.backend)  # a missing extra fails here, in the parent
        sandbox = None
        if self.config.sandbox:  # set only once started: a failed start is retried, never run unsandboxed
            sandbox = Sandbox(backend_target(self.config.backend), self._settings, self.config.timeout_s,
                              warmup=(WARMUP_HTML, None))
            sandbox.start()  # boots while the pipeline starts; the first batch waits for it
        self._sandbox: Sandbox | None = sandbox

    def teardown(self) -> None:
        sandbox = self.__dict__.get("_sandbox")  # not self._sandbox: that would build one to stop it
        if sandbox is not None:
            sandbox.stop()
        super().teardown()

    def _answers(self, tasks: list[tuple]) -> list[Answer]:
        if self._sandbox is not None:
            return self._sandbox.run(tasks)
        answers = []
        for task in tasks:
            try:
                answers.append(Answer(value=self._backend(*task, **self._settings)))
            except Exception as err:  # noqa: BLE001 - the same outcome as in the sandbox
                answers.append(Answer(error=ERROR, detail=f"{type(err).__name__}: {err}"))
        return answers

    def score(self, rows: list[dict]) -> list[dict]:
        todo = [i for i, row in enumerate(rows) if self._small_enough(row.get("html") or "")]
        answers = dict(zip(todo, self._answers([(rows[i].get("html") or "", rows[i].get("url")) for i in todo])))
        return [self._finish(row, answers.get(i)) for i, row in enumerate(rows)]

    def _small_enough(self, html: str) -> bool:
        limit = self.config.max_html_bytes
        if len(html) * 4 <= limit:  # a character is at most 4 bytes of UTF-8: no need to encode
            return True
        return len(html) <= limit and len(html.encode("utf-8", errors="ignore")) <= limit

    def _finish(self, row: dict, answer: Answer | None) -> dict:
        meta = dict(row.get("meta") or {})
        meta.pop("extract_error", None)  # a row being re-extracted starts clean
        meta.pop("extract_error_detail", None)
        meta["extractor"] = self.extractor_name
        if row.get("url"):
            meta["url"] = row["url"]
        text, keep_html = "", self.config.keep_html
        if answer is None:
            meta["extract_error"] = "too_large"
        elif answer.error is not None:
            meta["extract_error"] = answer.error
            meta["extract_error_detail"] = answer.detail
            keep_html = True  # a page that timed out or crashed can be retried with other settings
        else:
            doc = answer.value or {}
            text = (doc.get("text") or "").strip()
            for key in ("title", "date") if self.config.metadata else ():
                if doc.get(key):
                    meta[key] = doc[key]
        out = {**row, "text": text, "meta": meta}
        if not keep_html:
            out.pop("html", None)
        return out

    def keep(self, row: dict) -> tuple[bool, str | None]:
        error = row["meta"].get("extract_error")
        if error == ERROR:
            raise ExtractError(row["meta"].get("extract_error_detail", ""))
        if error in (TIMEOUT, CRASHED, "too_large"):
            return False, error
        return (True, None) if row["text"] else (False, "no_text")
