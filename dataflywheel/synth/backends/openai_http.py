"""OpenAI-compatible HTTP backend: ``vllm serve``, ``transformers serve`` and other compatible servers.

One HTTP request per sample (``n=1``, the sample's own seed), never ``n=k`` per prompt. Servers
differ on ``n``: vLLM honors it, ``transformers serve`` silently returns one choice
(docs/sources.md#transformers-serve). Asking for one choice per unit makes the client independent of
that: a request for n samples is n units (``base.py``), each sent on its own, so a short answer
cannot happen and nothing needs topping up except a reply with no choice at all, which is retried
like a failure. It also keeps the base class's promise that sample i is the same text however it was
made: with ``n=k`` a server draws all k choices from one seed, so sample i would depend on k and on
whether the server honored n. The cost is k prefills instead of one; vLLM's prefix cache and
continuous batching absorb most of it.

Log-probs are never trusted either: a server that ignores ``logprobs`` (``transformers serve``
returns null) gives ``Sample.logprobs = None``, recorded as missing, not as an error.

Requests run on a thread pool with at most ``max_in_flight`` at once (one ``httpx2`` client and
connection pool shared by the threads). Retries follow the openai-python client: 408/409/429/5xx,
timeouts and connection errors are retried with exponential backoff (0.5 s doubling to 8 s, minus up
to 25% jitter), ``Retry-After``/``retry-after-ms`` is honored up to 2 minutes. A unit that still fails
becomes ``Sample(finish_reason="error")``; ``_complete`` never raises for one bad unit.

HTTP client: ``httpx2`` (the successor of ``httpx``), already installed as a dependency of
``huggingface_hub`` (transformers) and ``openai``; the openai SDK itself is not needed.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .base import Backend, Sample, SampleCache, Unit

# openai-python 3.54 `_constants.py` / `_base_client.py` (the reference client):
DEFAULT_TIMEOUT_S = 600.0  # DEFAULT_TIMEOUT: 10 minutes for the whole request
DEFAULT_CONNECT_TIMEOUT_S = 5.0  # DEFAULT_TIMEOUT.connect
DEFAULT_MAX_RETRIES = 2  # DEFAULT_MAX_RETRIES
INITIAL_RETRY_DELAY_S = 0.5  # INITIAL_RETRY_DELAY
MAX_RETRY_DELAY_S = 8.0  # MAX_RETRY_DELAY
MAX_RETRY_AFTER_S = 120.0  # MAX_RETRY_AFTER_DELAY: a server asking for a longer wait is not retried
RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx (`_should_retry`)
DEFAULT_MAX_IN_FLIGHT = 16  # the task's default bound; vLLM batches whatever arrives concurrently

# OpenAI finish reasons -> ours (base.FINISH_REASONS). vLLM adds "abort"; anything not listed
# (content_filter, abort, unknown) becomes an error that keeps the text.
FINISH_MAP = {"stop": "stop", "eos": "stop", "tool_calls": "stop", "function_call": "stop", "length": "length"}
ERROR_BODY_CHARS = 300  # how much of a failing response body an error message quotes


def _import_httpx() -> Any:
    try:
        import httpx2
    except ImportError:  # pragma: no cover - huggingface_hub depends on it
        raise ImportError("the OpenAI HTTP backend needs httpx2: pip install httpx2") from None
    return httpx2


def retry_after_s(headers: Any) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, then ``Retry-After`` as seconds or an
    HTTP date), or None; as openai-python's ``_parse_retry_after_header``."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        parsed = email.utils.parsedate_tz(value)
        if parsed is not None:
            return email.utils.mktime_tz(parsed) - time.time()
    return None


class OpenAIBackend(Backend):
    """Client of an OpenAI-compatible server: ``/chat/completions`` for ``messages`` requests,
    ``/completions`` for raw ``prompt`` requests (the server applies the model's chat template).

    ``base_url`` includes the API prefix (``http://host:8000/v1``), as in the openai SDK. The API key
    is ``api_key`` or, when that is None, the environment variable named by ``api_key_env`` read at
    connect time (so a pickled backend carries only the variable's name). It is sent as a bearer
    token and never printed, logged or put in an error. ``extra_body`` is merged into every request
    body: vLLM's extra sampling fields, or ``transformers serve``'s ``generation_config`` (a JSON
    string; that server samples only when it sets ``do_sample``).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",  # the openai SDK's variable
        revision: str | None = None,
        cache: SampleCache | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_s: float = INITIAL_RETRY_DELAY_S,
        max_backoff_s: float = MAX_RETRY_DELAY_S,
        extra_body: dict[str, Any] | None = None,
    ):
        super().__init__(model, revision=revision, cache=cache)
        if max_in_flight < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("max_in_flight >= 1, max_retries >= 0 and timeout_s > 0 are required")
        self.base_url = base_url.rstrip("/")
        self._api_key, self.api_key_env = api_key, api_key_env
        self.max_in_flight, self.max_retries = max_in_flight, max_retries
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.extra_body = dict(extra_body or {})
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # no key, ever
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, max_in_flight={self.max_in_flight})"

    def __getstate__(self) -> dict[str, Any]:
        # Beam pickles the backend into the pipeline: the client and lock cannot travel and are rebuilt
        state = dict(self.__dict__)
        state["_client"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _http(self) -> Any:
        with self._lock:
            if self._client is None:
                httpx = _import_httpx()
                key = self._api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None)
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                self._client = httpx.Client(
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                    limits=httpx.Limits(max_connections=self.max_in_flight,
                                        max_keepalive_connections=self.max_in_flight),
                )
            return self._client

    # -- one unit ---------------------------------------------------------------------------------

    def payload(self, unit: Unit) -> tuple[str, dict[str, Any]]:
        """(endpoint path, JSON body) for one unit: always ``n=1`` and the unit's seed."""
        r, s = unit.request, unit.request.sampling
        body: dict[str, Any] = {"model": self.model, "n": 1, "max_tokens": s.max_tokens,
                                "temperature": s.temperature, "top_p": s.top_p}
        if r.messages is not None:
            path, body["messages"] = "/chat/completions", [dict(m) for m in r.messages]
        else:
            path, body["prompt"] = "/completions", r.prompt
        if s.stop:
            body["stop"] = list(s.stop)
        if unit.seed is not None:
            body["seed"] = unit.seed
        if s.top_k:  # not an OpenAI field: vLLM takes it, strict servers reject it (transformers serve: 422)
            body["top_k"] = s.top_k
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.logprobs:
            # chat: a boolean; legacy completions: how many alternatives besides the sampled token,
            # 1 being the smallest value every server treats as "on" (some read 0 as off)
            body["logprobs"] = True if r.messages is not None else 1
        body.update(self.extra_body)
        return path, body

    def parse(self, unit: Unit, data: Any) -> Sample | None:
        """The sample in a 200 reply, or None when it holds no choice (retried, i.e. topped up)."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices[0], dict):
            return None
        choice, chat = choices[0], unit.request.messages is not None
        if chat:
            text = (choice.get("message") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        logprobs = _logprobs(choice.get("logprobs"), chat) if unit.request.sampling.logprobs else None
        usage = data.get("usage") or {}
        tokens = usage.get("completion_tokens")
        if isinstance(tokens, int):
            tokens = tokens // len(choices)  # one choice asked for; split if a server sent more
        else:
            tokens = len(logprobs) if logprobs is not None else 0
        reason = choice.get("finish_reason")
        if reason is None:  # not reported: infer from the budget
            reason = "length" if tokens >= unit.request.sampling.max_tokens else "stop"
        # vLLM's server returns a choice's token ids when asked (extra_body {"return_token_ids": true})
        ids = choice.get("token_ids")
        token_ids = ids if isinstance(ids, list) and all(isinstance(t, int) for t in ids) else None
        if reason in FINISH_MAP:
            return Sample(text, FINISH_MAP[reason], tokens=tokens, logprobs=logprobs, token_ids=token_ids)
        return Sample(text, "error", tokens=tokens, logprobs=logprobs, error=f"finish_reason {reason!r}")

    def _backoff(self, retry: int, headers: Any = None) -> float | None:
        """Seconds before retry number ``retry`` (0-based), or None when the server's Retry-After is
        longer than we wait."""
        if headers is not None:
            asked = retry_after_s(headers)
            if asked is not None and math.isfinite(asked):
                if asked > MAX_RETRY_AFTER_S:
                    return None
                if asked > 0:
                    return asked
        return min(self.backoff_s * 2.0**retry, self.max_backoff_s) * (1 - 0.25 * random.random())

    def _one(self, unit: Unit) -> tuple[Sample, int]:
        """One unit with retries: (sample, retries used). Never raises."""
        httpx = _import_httpx()
        try:
            path, body = self.payload(unit)
            client = self._http()
        except Exception as err:  # noqa: BLE001 - a bad request becomes an error sample
            return Sample("", "error", error=f"request not built: {type(err).__name__}: {err}"), 0
        url, attempts, why = self.base_url + path, self.max_retries + 1, ""
        for attempt in range(attempts):
            headers = None
            try:
                resp = client.post(url, json=body)
            except httpx.TimeoutException:
                why = f"timeout after {self.timeout_s:g} s"
            except httpx.TransportError as err:
                why = f"connection error: {type(err).__name__}: {err}"
            except Exception as err:  # noqa: BLE001 - never crash on one unit
                return Sample("", "error", error=f"{type(err).__name__}: {err}"), attempt
            else:
                headers = resp.headers
                if resp.status_code == 200:
                    try:
                        sample = self.parse(unit, resp.json())
                    except (json.JSONDecodeError, ValueError, TypeError, AttributeError, KeyError) as err:
                        sample, why = None, f"unparsable reply: {type(err).__name__}: {err}"
                    else:
                        why = "reply without choices"
                    if sample is not None:
                        return sample, attempt
                else:
                    why = f"HTTP {resp.status_code}: {resp.text[:ERROR_BODY_CHARS]}"
                    if not (resp.status_code in RETRY_STATUS or resp.status_code >= 500):
                        return Sample("", "error", error=why), attempt
            if attempt + 1 < attempts:
                delay = self._backoff(attempt, headers)
                if delay is None:
                    return Sample("", "error", error=f"{why} (Retry-After over {MAX_RETRY_AFTER_S:g} s)"), attempt
                time.sleep(delay)
        return Sample("", "error", error=f"{why} (after {attempts} attempts)"), attempts - 1

    def _complete(self, todo: list[Unit]) -> list[Sample]:
        workers = min(self.max_in_flight, len(todo))
        if workers <= 1:
            done = [self._one(u) for u in todo]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-http") as pool:
                done = list(pool.map(self._one, todo))  # map keeps unit order
        self.counts.update(http_retries=sum(n for _, n in done))
        return [s for s, _ in done]


def _logprobs(block: Any, chat: bool) -> list[float] | None:
    """Sampled-token log-probs from a choice's ``logprobs`` field (chat: ``content[].logprob``;
    completions: ``token_logprobs``), or None when the server left them out."""
    if not isinstance(block, dict):
        return None
    if chat:
        content = block.get("content")
        values = [t.get("logprob") for t in content] if isinstance(content, list) else None
    else:
        values = block.get("token_logprobs")
    if not isinstance(values, list) or any(not isinstance(v, int | float) for v in values):
        return None
    return [float(v) for v in values]
