"""Generation backends behind one interface (``base.py``): in-process transformers, an
OpenAI-compatible HTTP client, and the vLLM offline engine (``gpu`` extra)."""

from .base import Backend, Request, Result, Sample, Sampling, Unit, cache_key, sample_seed

__all__ = ["Backend", "Request", "Result", "Sample", "Sampling", "Unit", "cache_key", "sample_seed"]
