"""The web-curation pipeline: WARC/HTML in, clean deduplicated documents out (``dataflywheel curate``).

A web config names *steps*, not stages: the order is fixed here, in the order the field settled on
(FineWeb: URL filter -> extraction -> language ID -> Gopher repetition -> Gopher quality -> C4 ->
FineWeb rules -> MinHash; REFERENCES §2.1, §2.5), cheap and row-shrinking steps first, and the
expensive perplexity model last, on the fewest rows. Each step takes its stage's options, ``{}`` for
the defaults, or ``false`` to skip it; perplexity and decontamination are off until given a model
or evaluation sets. The result is an ordinary run config, so ``curate`` runs, reports and
reconciles exactly like ``run`` and a user can always drop down to a hand-written stage list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import (
    InputConfig,
    OutputConfig,
    RunConfig,
    Strict,
    read_yaml,
)
from ..runner import RunnerConfig
from .steps import Step, expand_steps, one_job_run, parse_pipeline

# (step key, registered stage, options applied under the user's); on/off defaults are in WebSteps
WEB_STEPS: list[tuple[str, str, dict[str, Any]]] = [
    ("url_filter", "url_filter", {}),
    # FineWeb / datatrove extract with favour_precision=True (REFERENCES §2.4)
    ("extract", "extract", {"mode": "precision"}),
    ("line_filter", "line_filter", {}),
    ("langid", "langid", {"languages": ["en"]}),
    ("gopher_repetition", "gopher_repetition", {}),
    ("gopher_quality", "gopher_quality", {}),
    ("c4", "c4", {}),
    ("fineweb_quality", "fineweb_quality", {}),
    ("sensitive_content", "sensitive_content", {}),
    ("exact_dedup", "exact_dedup", {}),
    ("minhash_dedup", "minhash_dedup", {}),
    ("decontaminate", "decontaminate", {}),
    ("perplexity", "perplexity", {}),
]

class WebSteps(Strict):
    url_filter: Step = True
    extract: Step = True
    line_filter: Step = True
    langid: Step = True
    gopher_repetition: Step = True
    gopher_quality: Step = True
    c4: Step = True
    fineweb_quality: Step = True
    sensitive_content: Step = True
    exact_dedup: Step = True
    minhash_dedup: Step = True
    decontaminate: Step = False  # needs eval sets
    perplexity: Step = False  # needs a model


class WebConfig(Strict):
    name: str = "web"
    runner: RunnerConfig = RunnerConfig()
    input: InputConfig
    output: OutputConfig
    steps: WebSteps = WebSteps()
    report: str | None = None
    extra_stages: list[dict[str, Any]] = Field(default_factory=list)  # appended after the steps, as in `run`


def web_stages(steps: WebSteps, source: str = "<config>") -> list[dict[str, Any]]:
    """The stage list of a web config: fixed order, defaults under user options, skipped steps out."""
    return expand_steps(WEB_STEPS, steps, source)


def web_run_config(data: Any, source: str = "<config>", inputs: list[str] | None = None,
                   output: str | None = None) -> RunConfig:
    """A web config (mapping) -> the equivalent run config; ``inputs`` / ``output`` override the file's."""
    web = parse_pipeline(WebConfig, data, source, inputs, output)
    return one_job_run(web, web_stages(web.steps, source), source)


def load_web_config(path: str | os.PathLike, inputs: list[str] | None = None, output: str | None = None) -> RunConfig:
    return web_run_config(read_yaml(Path(path)), str(path), inputs, output)

