"""Prompt templates: Jinja files in ``synth/prompts/``, each stating its source in a header."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

PROMPTS = Path(__file__).with_name("prompts")


@functools.cache
def _template(name: str, keep_trailing_newline: bool) -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(PROMPTS), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=keep_trailing_newline, autoescape=False)
    return env.get_template(name)


def render(name: str, *, keep_trailing_newline: bool = False, **variables: Any) -> str:
    """Render ``prompts/<name>``; values are inserted as they are, never parsed as template."""
    return _template(name, keep_trailing_newline).render(**variables)
