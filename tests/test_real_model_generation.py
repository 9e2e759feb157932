"""Generation with a real chat model (SmolLM2-135M-Instruct): the transformers backend's greedy
text equals ``model.generate``'s, stops at the end-of-turn token, and samples reproduce per sample
seed; the OpenAI backend against ``transformers serve`` serving the same folder on loopback
returns the same greedy text."""

from __future__ import annotations

import pytest
import torch
from serving import transformers_serve

from dataflywheel.synth.backends import Request, Sampling
from dataflywheel.synth.backends.openai_http import OpenAIBackend
from dataflywheel.synth.backends.transformers import TransformersBackend, chat_prompt_ids

CHATS = [({"role": "user", "content": "What is the capital of France? Answer in one word."},),
         ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}),
         ({"role": "user", "content": "Write a haiku about rain."},)]
GREEDY = Sampling(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def backend(smollm2):
    return TransformersBackend(smollm2, device="cpu", batch_size=4)


def _reference(model, tok, messages, max_new_tokens: int) -> tuple[list[int], str]:
    ids = chat_prompt_ids(tok, messages)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def greedy(backend):
    return backend.generate([Request(f"c{i}", messages=m, sampling=GREEDY) for i, m in enumerate(CHATS)])


def test_greedy_equals_model_generate_and_stops_at_end_of_turn(backend, greedy):
    model, tok = backend.load()
    stopped = 0
    for res, messages in zip(greedy, CHATS):
        (s,) = res.samples
        ids, text = _reference(model, tok, messages, GREEDY.max_tokens)
        assert s.text == text and s.token_ids == ids, messages
        assert "<|im_end|>" not in s.text and s.tokens == len(ids)
        if s.finish_reason == "stop":  # ended by the end-of-turn token, which is kept in the ids
            assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
            stopped += 1
    assert stopped >= 2 and "Paris" in greedy[0].samples[0].text


def test_samples_reproduce_per_sample_seed(backend):
    hot = Sampling(n=3, temperature=1.0, top_p=0.95, max_tokens=16, seed=7)
    (three,) = backend.generate([Request("s", messages=CHATS[2], sampling=hot)])
    (again,) = backend.generate([Request("s", messages=CHATS[2], sampling=hot)])
    (one,) = backend.generate([Request("s", messages=CHATS[2], sampling=hot.model_copy(update={"n": 1}))])
    texts = [s.text for s in three.samples]
    assert texts == [s.text for s in again.samples] and len(set(texts)) >= 2
    assert one.samples[0].text == texts[0]  # sample 0 alone is sample 0 of three


def test_openai_backend_on_transformers_serve_returns_the_same_greedy_text(smollm2, greedy, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_smollm2")
    with transformers_serve(smollm2, root) as url, OpenAIBackend(smollm2, url, timeout_s=120) as client:
        served = client.generate([Request(f"c{i}", messages=m, sampling=GREEDY) for i, m in enumerate(CHATS)])
        assert client.counts["errors"] == 0
    assert [r.samples[0].text for r in served] == [r.samples[0].text for r in greedy]
