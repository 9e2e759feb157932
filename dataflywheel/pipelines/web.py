"""The web-curation pipeline: WARC/HTML in, clean deduplicated documents out (``dataflywheel curate``).

A web config names *steps*, not stages: the order is fixed here, in the order the field settled on
(FineWeb, Penedo et al. 2024: URL filter -> extraction -> language ID -> Gopher repetition ->
Gopher quality -> C4 -> FineWeb rules -> MinHash), cheap and row-shrinking steps first, and the
expensive perplexity model last, on the fewest rows. Each step is typed with its stage's config
(``pipelines/steps.py``): options, ``{}`` for the stage's defaults, or ``false`` to skip it;
perplexity and decontamination are off until given a model or evaluation sets. The result is an ordinary run config, so ``curate`` runs, reports and
reconciles exactly like ``run`` and a user can always drop down to a hand-written stage list.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field

from ..config import InputConfig, OutputConfig, Strict, read_yaml
from ..filters.basic import ExactDedup
from ..filters.decontam import DecontamConfig, Decontaminate
from ..filters.dedup.stage import MinHashDedup, MinHashDedupConfig
from ..filters.extract import Extract, ExtractConfig
from ..filters.langid import LangId, LangIdConfig
from ..filters.perplexity import Perplexity, PerplexityConfig
from ..filters.quality import (
    C4,
    C4Config,
    FineWebQuality,
    FineWebQualityConfig,
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
    LineFilter,
    LineFilterConfig,
)
from ..filters.safety import SensitiveContent, SensitiveContentConfig
from ..filters.url import UrlFilter, UrlFilterConfig
from ..registry import StageSpec
from ..runner import RunnerConfig
from ..stages import StageConfig
from .config import RunConfig, one_job
from .steps import Step, parse_front_end, step_specs


class WebLangIdConfig(LangIdConfig):
    languages: list[str] = ["en"]  # the web pipeline keeps English, as FineWeb does (lang_en >= 0.65)


class WebSteps(Strict):
    url_filter: Step[UrlFilterConfig] = UrlFilterConfig()
    extract: Step[ExtractConfig] = ExtractConfig()
    line_filter: Step[LineFilterConfig] = LineFilterConfig()
    langid: Step[WebLangIdConfig] = WebLangIdConfig()
    gopher_repetition: Step[GopherRepetitionConfig] = GopherRepetitionConfig()
    gopher_quality: Step[GopherQualityConfig] = GopherQualityConfig()
    c4: Step[C4Config] = C4Config()
    fineweb_quality: Step[FineWebQualityConfig] = FineWebQualityConfig()
    sensitive_content: Step[SensitiveContentConfig] = SensitiveContentConfig()
    exact_dedup: Step[StageConfig] = StageConfig()
    minhash_dedup: Step[MinHashDedupConfig] = MinHashDedupConfig()
    decontaminate: Step[DecontamConfig] = None  # needs evaluation sets
    perplexity: Step[PerplexityConfig] = None  # needs a model


# The order the steps run in, and each step's stage.
WEB_STEPS = {"url_filter": UrlFilter, "extract": Extract, "line_filter": LineFilter, "langid": LangId,
             "gopher_repetition": GopherRepetition, "gopher_quality": GopherQuality, "c4": C4,
             "fineweb_quality": FineWebQuality, "sensitive_content": SensitiveContent, "exact_dedup": ExactDedup,
             "minhash_dedup": MinHashDedup, "decontaminate": Decontaminate, "perplexity": Perplexity}


class WebConfig(Strict):
    name: str = "web"
    runner: RunnerConfig = RunnerConfig()
    input: InputConfig
    output: OutputConfig
    steps: WebSteps = WebSteps()
    report: str | None = None
    extra_stages: list[StageSpec] = Field(default_factory=list)  # appended after the steps, as in `run`


def web_run_config(data: Any, source: str = "<config>", inputs: list[str] | None = None,
                   output: str | None = None) -> RunConfig:
    """A web config (mapping) -> the equivalent run config; ``inputs`` / ``output`` override the file's."""
    web = parse_front_end(WebConfig, data, source, inputs, output)
    stages = step_specs(web.steps, WEB_STEPS) + web.extra_stages
    return one_job(web.name, web.runner, web.input, stages, web.output, web.report)


def load_web_config(path: str | os.PathLike, inputs: list[str] | None = None, output: str | None = None) -> RunConfig:
    return web_run_config(read_yaml(path), str(path), inputs, output)
