"""Which backend a config asks for, and building it (once per worker, in a stage's ``setup``)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ...errors import UserError
from .base import Backend


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["transformers", "openai", "vllm"] = "transformers"
    model: str  # Hub name or local folder (transformers, vllm); the served model name (openai)
    revision: str | None = None  # part of every cache key
    cache: str | None = None  # sqlite file of the generation cache; None: no cache
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # openai: the environment variable holding the key (never the key itself)
    options: dict[str, Any] = {}  # backend keyword arguments (device, dtype, batch_size, max_in_flight, engine kwargs)


def build_backend(cfg: BackendConfig) -> Backend:
    cache = None
    if cfg.cache:
        from ..cache import GenerationCache

        cache = GenerationCache(cfg.cache)
    if cfg.kind == "transformers":
        from .transformers import TransformersBackend

        return TransformersBackend(cfg.model, revision=cfg.revision, cache=cache, **cfg.options)
    if cfg.kind == "vllm":
        from .vllm_offline import VLLMBackend

        return VLLMBackend(cfg.model, revision=cfg.revision, cache=cache, **cfg.options)
    if not cfg.base_url:
        raise UserError("backend kind openai needs base_url (e.g. http://127.0.0.1:8000/v1)")
    if cfg.api_key_env and cfg.api_key_env not in os.environ:
        raise UserError(f"backend api_key_env: environment variable {cfg.api_key_env} is not set")
    from .openai_http import OpenAIBackend

    env = {"api_key_env": cfg.api_key_env} if cfg.api_key_env else {}
    return OpenAIBackend(cfg.model, base_url=cfg.base_url, revision=cfg.revision, cache=cache, **env, **cfg.options)
