"""Extraction backends for the ``extract`` stage, named in its config as ``backend:``.

- ``trafilatura`` (default): ``bare_extraction`` with the stage's mode switches;
- ``resiliparse``: ``extract_plain_text(main_content=True)``, ~10x faster than trafilatura and
  about 11 F1 points behind it on trafilatura's benchmark (docs/evaluation.rst, 990 pages:
  resiliparse 1.0.9 F1 0.811 at 0.3x the baseline's time, trafilatura 2.2.0 F1 0.924 at 3.2x);
  an optional extra;
- ``module:function``: any function with the signature below, e.g. a site-specific extractor.

A backend is ``fn(html, url, *, mode, include_comments, include_tables, metadata) -> dict | None``
returning ``{"text", "title", "date"}`` (None or empty text: nothing found; ``title`` and ``date``
are only asked for with ``metadata=True``). Backends are named by string, not passed as objects,
because the sandbox's child process imports them itself.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from ..errors import UserError

Backend = Callable[..., "dict | None"]

# The optional dependency and the extra that installs it (pyproject ``extract`` extra).
RESILIPARSE_HINT = "backend 'resiliparse' needs the 'extract' extra: pip install 'dataflywheel[extract]' (resiliparse==2.0.1)"


def trafilatura_backend(html: str, url: str | None, *, mode: str = "precision", include_comments: bool = False,
                        include_tables: bool = True, metadata: bool = False) -> dict | None:
    import trafilatura

    doc = trafilatura.bare_extraction(
        html, url=url, with_metadata=metadata, include_comments=include_comments, include_tables=include_tables,
        favor_precision=mode == "precision", favor_recall=mode == "recall", fast=mode == "fast",
    )
    if doc is None:
        return None
    return {"text": (getattr(doc, "text", None) or "").strip(), "title": getattr(doc, "title", None),
            "date": getattr(doc, "date", None)}


def resiliparse_backend(html: str, url: str | None, *, mode: str = "precision", include_comments: bool = False,
                        include_tables: bool = True, metadata: bool = False) -> dict | None:
    """resiliparse has one main-content heuristic: ``mode`` and ``include_tables`` do not apply; with
    ``metadata`` it gives the title (no date)."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)  # parsed once, for the text and the title
    text = extract_plain_text(tree, main_content=True, comments=include_comments)
    return {"text": (text or "").strip(), "title": (tree.title or None) if metadata else None, "date": None}


BUILTIN: dict[str, str] = {
    "trafilatura": f"{__name__}:trafilatura_backend",
    "resiliparse": f"{__name__}:resiliparse_backend",
}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_backend_spec(spec: str) -> str:
    """Config-time check (no import of user code): a built-in name, or ``module:function``."""
    if spec == "resiliparse" and not _installed("resiliparse"):
        raise ValueError(RESILIPARSE_HINT)
    if spec in BUILTIN:
        return spec
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"unknown backend {spec!r}; allowed: {', '.join(BUILTIN)} or module:function")
    return spec


def backend_target(spec: str) -> str:
    """The ``module:function`` path of a backend spec (what the sandbox's child imports)."""
    return BUILTIN.get(spec, spec)


def resolve_backend(spec: str) -> Backend:
    """Import a backend; UserError naming the missing extra or the bad path."""
    target = backend_target(spec)
    module, _, attr = target.partition(":")
    if spec == "resiliparse":
        try:
            importlib.import_module("resiliparse.extract.html2text")
        except ImportError:
            raise UserError(RESILIPARSE_HINT) from None
    try:
        fn: Any = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import extraction backend {spec!r}: {err}") from None
    if not callable(fn):
        raise UserError(f"extraction backend {spec!r} is not callable")
    return fn
