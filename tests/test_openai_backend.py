"""OpenAIBackend against real servers on loopback.

Two servers: ``transformers serve`` (the real thing, serving a tiny model built here; it ignores
``n`` and ``logprobs``, docs/sources.md#transformers-serve) for the protocol, and a scripted ``http.server`` for what a
healthy server will not do on demand: 429 with Retry-After, 5xx, hangs, empty or broken replies.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from serving import free_port, transformers_serve

from dataflywheel.synth.backends import Request, Sampling, sample_seed
from dataflywheel.synth.backends.openai_http import OpenAIBackend

CHAT = ({"role": "user", "content": "What is the capital of France?"},)


def _reply(body: dict, text: str = "hello", finish: str | None = "stop", tokens: int | None = 2,
           logprobs: Any = None) -> dict:
    """An OpenAI-format reply to ``body`` (chat when it has messages, else completions)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
    if "messages" in body:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    out: dict[str, Any] = {"id": "x", "choices": [choice], "model": body.get("model")}
    if tokens is not None:
        out["usage"] = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens}
    return out


# -- a scripted server ---------------------------------------------------------------------------

# respond(path, body, request_number) -> (status, headers, payload (dict or bytes), delay_s)
Respond = Callable[[str, dict, int], tuple[int, dict, Any, float]]


class _Script:
    def __init__(self, respond: Respond):
        self.respond, self.requests, self.lock = respond, [], threading.Lock()
        self.active = self.peak = 0


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        script: _Script = self.server.script  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with script.lock:
            script.requests.append((self.path, dict(self.headers), body))
            number = len(script.requests)
            script.active += 1
            script.peak = max(script.peak, script.active)
        done = False
        try:
            status, headers, payload, delay = script.respond(self.path, body, number)
            time.sleep(delay)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            # Leave the count before answering: once the client has the answer it may send the
            # next request, which must not be counted as overlapping this one.
            with script.lock:
                script.active -= 1
                done = True
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left
        finally:
            if not done:
                with script.lock:
                    script.active -= 1

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[Callable[[Respond], tuple[str, _Script]]]:
    servers = []

    def start(respond: Respond) -> tuple[str, _Script]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.script = _Script(respond)  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", server.script  # type: ignore[attr-defined]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _ok(path: str, body: dict, n: int) -> tuple[int, dict, Any, float]:
    return 200, {}, _reply(body, text=body.get("prompt") or body["messages"][-1]["content"]), 0.0


# -- request shape, parsing, secrets -------------------------------------------------------------


def test_one_request_per_sample_with_its_seed(fake):
    url, script = fake(_ok)
    backend = OpenAIBackend("m", url, api_key="sekrit-123", extra_body={"repetition_penalty": 1.1})
    sampling = Sampling(n=3, seed=7, stop=("\n\n",), max_tokens=5, logprobs=True)
    res = backend.generate([Request("c", messages=CHAT, sampling=sampling),
                            Request("p", prompt="Once", sampling=Sampling(top_k=5, presence_penalty=2.0))])
    assert [len(r.samples) for r in res] == [3, 1]
    assert [s.text for s in res[0].samples] == [CHAT[0]["content"]] * 3 and res[1].samples[0].text == "Once"
    sent = sorted(script.requests, key=lambda r: (r[0], r[2].get("seed") or 0))
    chat = [b for p, _, b in sent if p == "/v1/chat/completions"]
    (path, headers, comp), = [r for r in sent if r[0] == "/v1/completions"]
    assert {b["seed"] for b in chat} == {sample_seed(7, i) for i in range(3)}
    assert [s.seed for s in res[0].samples] == [sample_seed(7, i) for i in range(3)]
    for b in chat:
        assert b["n"] == 1 and b["stop"] == ["\n\n"] and b["logprobs"] is True and b["max_tokens"] == 5
        assert b["messages"] == list(CHAT) and "top_k" not in b and b["repetition_penalty"] == 1.1
    assert comp["prompt"] == "Once" and comp["top_k"] == 5 and comp["presence_penalty"] == 2.0
    assert "seed" not in comp and "logprobs" not in comp and "stop" not in comp
    assert headers["Authorization"] == "Bearer sekrit-123"
    assert "sekrit" not in repr(backend) and "sekrit" not in str(backend.counts)


def test_logprobs_parsed_or_recorded_missing(fake):
    chat_lp = {"content": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.25}]}
    comp_lp = {"tokens": ["a", "b"], "token_logprobs": [-0.5, -2.0], "top_logprobs": None}

    def respond(path, body, n):
        if body.get("max_tokens") == 9:  # a server that drops them
            return 200, {}, _reply(body, tokens=None, logprobs=None), 0.0
        return 200, {}, _reply(body, tokens=None, logprobs=chat_lp if "messages" in body else comp_lp), 0.0

    url, _ = fake(respond)
    backend = OpenAIBackend("m", url)
    on, off, dropped = Sampling(logprobs=True), Sampling(), Sampling(logprobs=True, max_tokens=9)
    res = backend.generate([Request("c", messages=CHAT, sampling=on), Request("p", prompt="x", sampling=on),
                            Request("off", prompt="x", sampling=off), Request("gone", prompt="x", sampling=dropped)])
    c, p, o, g = (r.samples[0] for r in res)
    assert c.logprobs == [-0.5, -1.25] and p.logprobs == [-0.5, -2.0]
    assert c.tokens == 2 and p.tokens == 2  # no usage: counted from the log-probs
    assert o.logprobs is None and g.logprobs is None and g.finish_reason == "stop" and g.error is None


def test_token_ids_read_when_the_server_returns_them(fake):
    """vLLM's server adds ``choices[i].token_ids`` when the request says ``return_token_ids``."""

    def respond(path, body, n):
        reply = _reply(body)
        if body.get("return_token_ids"):
            reply["choices"][0]["token_ids"] = [5, 9, 2] if body["prompt"] == "ok" else ["5", None]
        return 200, {}, reply, 0.0

    url, script = fake(respond)
    asked = OpenAIBackend("m", url, extra_body={"return_token_ids": True})
    ok, bad = (r.samples[0] for r in asked.generate([Request("a", prompt="ok"), Request("b", prompt="bad")]))
    assert ok.token_ids == [5, 9, 2] and bad.token_ids is None and bad.finish_reason == "stop"
    [plain] = OpenAIBackend("m", url).generate([Request("c", prompt="ok")])
    assert plain.samples[0].token_ids is None and "return_token_ids" not in script.requests[-1][2]


def test_finish_reasons_and_tokens(fake):
    cases = {"a": ("stop", 4), "b": ("length", 16), "c": ("content_filter", 3), "d": (None, 16), "e": ("eos", 1)}

    def respond(path, body, n):
        finish, tokens = cases[body["prompt"]]
        return 200, {}, _reply(body, finish=finish, tokens=tokens), 0.0

    url, _ = fake(respond)
    res = OpenAIBackend("m", url).generate([Request(k, prompt=k, sampling=Sampling(max_tokens=16)) for k in cases])
    got = {r.request_id: (r.samples[0].finish_reason, r.samples[0].tokens) for r in res}
    assert got == {"a": ("stop", 4), "b": ("length", 16), "c": ("error", 3), "d": ("length", 16), "e": ("stop", 1)}
    assert "content_filter" in res[2].samples[0].error and res[2].samples[0].text == "hello"


def test_api_key_from_env_never_pickled(fake, monkeypatch):
    url, script = fake(_ok)
    monkeypatch.setenv("DFW_TEST_KEY", "env-secret-9")
    backend = OpenAIBackend("m", url, api_key_env="DFW_TEST_KEY")
    backend.generate([Request("p", prompt="x")])
    assert script.requests[-1][1]["Authorization"] == "Bearer env-secret-9"
    blob = pickle.dumps(backend)  # Beam pickles stages with their backend
    assert b"env-secret-9" not in blob
    again = pickle.loads(blob)
    assert again.generate([Request("p", prompt="y")])[0].samples[0].text == "y"
    assert script.requests[-1][1]["Authorization"] == "Bearer env-secret-9"


# -- retries, timeouts, bounds -------------------------------------------------------------------


def test_429_honors_retry_after_then_succeeds(fake):
    def respond(path, body, n):
        if n == 1:
            return 429, {"Retry-After": "1"}, {"error": "slow down"}, 0.0
        if n == 2:
            return 503, {}, {"error": "busy"}, 0.0  # no header: our own (tiny) backoff
        return _ok(path, body, n)

    url, script = fake(respond)
    backend = OpenAIBackend("m", url, backoff_s=0.01, max_retries=2)
    t0 = time.perf_counter()
    sample = backend.generate([Request("p", prompt="fine")])[0].samples[0]
    elapsed = time.perf_counter() - t0
    assert sample.text == "fine" and sample.finish_reason == "stop"
    assert len(script.requests) == 3 and backend.counts["http_retries"] == 2
    assert 0.95 <= elapsed < 5


def test_retry_after_too_long_is_not_waited_for(fake):
    url, script = fake(lambda p, b, n: (429, {"retry-after-ms": "600000"}, {"error": "quota"}, 0.0))
    t0 = time.perf_counter()
    sample = OpenAIBackend("m", url).generate([Request("p", prompt="x")])[0].samples[0]
    assert sample.finish_reason == "error" and "429" in sample.error and "Retry-After" in sample.error
    assert len(script.requests) == 1 and time.perf_counter() - t0 < 2


def test_persistent_5xx_becomes_error_and_others_survive(fake):
    def respond(path, body, n):
        if body["prompt"] == "bad":
            return 500, {}, b"internal boom", 0.0
        return _ok(path, body, n)

    url, script = fake(respond)
    backend = OpenAIBackend("m", url, backoff_s=0.01, max_retries=2, max_in_flight=4)
    res = backend.generate([Request(str(i), prompt="bad" if i == 2 else f"ok{i}") for i in range(5)])
    texts = [r.samples[0].text for r in res]
    assert texts == ["ok0", "ok1", "", "ok3", "ok4"]
    bad = res[2].samples[0]
    assert bad.finish_reason == "error" and "HTTP 500" in bad.error and "boom" in bad.error
    assert "after 3 attempts" in bad.error
    assert sum(b["prompt"] == "bad" for _, _, b in script.requests) == 3
    assert backend.counts["errors"] == 1 and backend.counts["samples"] == 5


def test_client_error_not_retried(fake):
    url, script = fake(lambda p, b, n: (400, {}, {"detail": "prompt must be a string."}, 0.0))
    sample = OpenAIBackend("m", url, backoff_s=0.01).generate([Request("p", prompt="x")])[0].samples[0]
    assert sample.finish_reason == "error" and "HTTP 400" in sample.error and "must be a string" in sample.error
    assert len(script.requests) == 1


def test_timeout_is_retried_then_error(fake):
    url, script = fake(lambda p, b, n: (*_ok(p, b, n)[:3], 1.5))
    backend = OpenAIBackend("m", url, timeout_s=0.25, max_retries=1, backoff_s=0.01)
    t0 = time.perf_counter()
    sample = backend.generate([Request("p", prompt="x")])[0].samples[0]
    elapsed = time.perf_counter() - t0
    assert sample.finish_reason == "error" and "timeout" in sample.error and "after 2 attempts" in sample.error
    assert len(script.requests) == 2 and elapsed < 1.4


def test_connection_refused_is_an_error_not_a_crash():
    backend = OpenAIBackend("m", f"http://127.0.0.1:{free_port()}/v1", max_retries=1, backoff_s=0.01)
    sample = backend.generate([Request("p", prompt="x")])[0].samples[0]
    assert sample.finish_reason == "error" and "connection error" in sample.error


def test_reply_without_choices_is_topped_up(fake):
    def respond(path, body, n):
        if n == 1:
            return 200, {}, {"choices": [], "usage": {"completion_tokens": 0}}, 0.0
        if n == 2:
            return 200, {}, b"{not json", 0.0
        return _ok(path, body, n)

    url, script = fake(respond)
    backend = OpenAIBackend("m", url, backoff_s=0.01, max_retries=2)
    assert backend.generate([Request("p", prompt="there")])[0].samples[0].text == "there"
    assert len(script.requests) == 3


def test_in_flight_bound_and_concurrency(fake):
    url, script = fake(lambda p, b, n: (*_ok(p, b, n)[:3], 0.15))
    backend = OpenAIBackend("m", url, max_in_flight=3)
    t0 = time.perf_counter()
    res = backend.generate([Request(str(i), prompt=f"q{i}") for i in range(12)])
    elapsed = time.perf_counter() - t0
    assert [r.samples[0].text for r in res] == [f"q{i}" for i in range(12)]  # order kept
    assert 2 <= script.peak <= 3
    assert elapsed < 12 * 0.15 * 0.75  # 4 waves of 3, not 12 one after another


# -- the real server: transformers serve ---------------------------------------------------------


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(base_url, model folder) of ``transformers serve`` serving a tiny model, for the session."""
    from dataflywheel.models.tiny_lm import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("serve")
    folder = build_tiny_causal_lm(root / "tiny")
    with transformers_serve(folder, root) as url:
        yield url, folder


def _greedy(folder: Path, request: Request) -> str:
    """The same completion made in process: the server must match it token for token."""
    import torch

    from dataflywheel.models.tiny_lm import load_causal_lm

    model, tok = load_causal_lm(folder)
    if request.messages is not None:
        ids = tok.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(request.prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=request.sampling.max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_serve_chat_and_completions_match_in_process(served):
    url, folder = served
    greedy = Sampling(temperature=0.0, max_tokens=8)
    reqs = [Request("chat", messages=CHAT, sampling=greedy), Request("raw", prompt="The quick brown", sampling=greedy)]
    with OpenAIBackend(str(folder), url, timeout_s=60) as backend:
        res = backend.generate(reqs)
    for r, req in zip(res, reqs):
        (s,) = r.samples
        assert s.error is None and s.finish_reason in ("stop", "length")
        assert s.text == _greedy(folder, req)  # chat template applied by the server; raw prompt left raw
        assert 0 < s.tokens <= 8 and s.logprobs is None
        assert r.backend == "openai" and r.model == str(folder) and r.sampling["max_tokens"] == 8


def test_serve_ignores_n_and_logprobs_client_tops_up(served):
    url, folder = served
    # transformers serve samples only when a generation_config enables it (docs/sources.md#transformers-serve); one
    # request in flight because it sets the seed globally and overlapping requests race on it
    sample_on = {"generation_config": json.dumps({"do_sample": True})}

    def run(n: int) -> list:
        with OpenAIBackend(str(folder), url, max_in_flight=1, timeout_s=60, extra_body=sample_on) as backend:
            (res,) = backend.generate([Request("q", messages=CHAT,
                                               sampling=Sampling(n=n, seed=11, max_tokens=6, logprobs=True))])
            assert backend.counts["errors"] == 0
        return res.samples

    three = run(3)
    assert len(three) == 3 and all(s.logprobs is None and s.tokens > 0 for s in three)
    assert [s.seed for s in three] == [sample_seed(11, i) for i in range(3)]
    assert len({s.text for s in three}) >= 2  # three seeds, not one choice copied
    assert [s.text for s in run(3)] == [s.text for s in three]  # per-sample seeds reproduce
    assert run(1)[0].text == three[0].text  # sample 0 of n=1 is sample 0 of n=3


def test_serve_concurrent_requests_keep_order(served):
    url, folder = served
    greedy = Sampling(temperature=0.0, max_tokens=5)
    reqs = [Request(f"r{i}", prompt=p, sampling=greedy) for i, p in enumerate(
        ["The cat", "Water boils", "List the planets", "Please check", "A good dataset", "The train", "Sure!",
         "Count from"])]
    with OpenAIBackend(str(folder), url, max_in_flight=8, timeout_s=60) as backend:
        together = backend.generate(reqs)
        assert backend.counts["errors"] == 0
    with OpenAIBackend(str(folder), url, max_in_flight=1, timeout_s=60) as backend:
        alone = backend.generate(reqs)
    assert [r.request_id for r in together] == [r.id for r in reqs]
    assert [r.samples[0].text for r in together] == [r.samples[0].text for r in alone]
    assert len({r.samples[0].text for r in together}) > 1
