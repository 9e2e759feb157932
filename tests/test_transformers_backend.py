"""The in-process transformers backend on real tiny Llama / GPT-2 models built locally (nothing is
downloaded): per-sample seeds independent of the batch, greedy equal to HF generate, raw log-probs,
stop strings, EOS, context limits and bad prompts."""

from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")

from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_causal_lm  # noqa: E402
from dataflywheel.synth.backends.base import Request, Sampling  # noqa: E402
from dataflywheel.synth.backends.transformers import (  # noqa: E402
    TransformersBackend,
    _draw,
    decode,
    eos_ids,
)

CONTEXT = 96
CHAT = ({"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Explain why the sky looks blue during the day, in two sentences."})
PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog. The train left the station at 7:45", "Count to ten:"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama"), max_positions=CONTEXT)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def folder(request, tmp_path_factory):
    if request.param == "llama":
        return request.getfixturevalue("llama")
    return build_tiny_causal_lm(tmp_path_factory.mktemp("gpt2"), arch="gpt2", max_positions=CONTEXT)


def hot(seed: int | None = 7, n: int = 3, **kw) -> Sampling:
    return Sampling(**{"n": n, "temperature": 1.0, "top_p": 0.9, "top_k": 200, "max_tokens": 10, "seed": seed, **kw})


def test_same_unit_alone_or_batched(folder):
    backend = TransformersBackend(folder, batch_size=3)
    target = Request("t", messages=CHAT, sampling=hot(logprobs=True, presence_penalty=0.5, frequency_penalty=0.3))
    alone = backend.generate([target])[0].samples
    crowd = [Request(f"p{i}", prompt=p, sampling=hot(seed=i, n=2, temperature=0.8, max_tokens=4 + 5 * i))
             for i, p in enumerate(PROMPTS)]
    crowd.insert(1, Request("g", prompt="Water boils at", sampling=Sampling(temperature=0, max_tokens=6)))
    mixed = backend.generate(crowd[:2] + [target] + crowd[2:])
    assert [r.request_id for r in mixed] == ["p0", "g", "t", "p1", "p2"]
    together = mixed[2].samples
    assert [s.text for s in together] == [s.text for s in alone]
    assert [s.tokens for s in together] == [s.tokens for s in alone]
    for a, b in zip(alone, together):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert len(a.logprobs) == a.tokens == 10 and a.finish_reason == "length"
    assert all(s.logprobs is None for r in mixed if r.request_id != "t" for s in r.samples)
    assert [s.tokens for s in mixed[0].samples] == [4, 4] and [s.tokens for s in mixed[4].samples] == [14, 14]
    # a larger batch size and another order give the same samples too
    again = TransformersBackend(folder, batch_size=8).generate(list(reversed(crowd)) + [target])[-1].samples
    assert [s.text for s in again] == [s.text for s in alone]


def test_seeds_make_distinct_reproducible_samples(llama):
    backend = TransformersBackend(llama)
    first = backend.generate([Request("a", prompt="Hi", sampling=hot(n=4))])[0].samples
    assert len({s.text for s in first}) == 4 and len({s.seed for s in first}) == 4
    other = backend.generate([Request("a", prompt="Hi", sampling=hot(seed=8, n=4))])[0].samples
    assert {s.text for s in other}.isdisjoint({s.text for s in first})
    # sample i of n=2 is sample i of n=4
    assert [s.text for s in backend.generate([Request("a", prompt="Hi", sampling=hot(n=2))])[0].samples] == [
        s.text for s in first[:2]]
    unseeded = backend.generate([Request("u", prompt="Hi", sampling=hot(seed=None, n=2))])[0].samples
    assert unseeded[0].text != unseeded[1].text and unseeded[0].seed is None


def hf_greedy(model, tok, prompts: list[list[int]], max_new: int):
    """HF generate on a left-padded batch: token ids (EOS cut) and raw log-probs per prompt."""
    width = max(map(len, prompts))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             pad_token_id=pad, eos_token_id=sorted(eos_ids(model, tok)), output_logits=True,
                             return_dict_in_generate=True, top_k=None, top_p=None, temperature=None)
    raw = torch.stack(out.logits, dim=1).float().log_softmax(-1)
    rows = []
    for r in range(len(prompts)):
        gen = out.sequences[r, width:].tolist()
        stop = next((i + 1 for i, t in enumerate(gen) if t in eos_ids(model, tok)), len(gen))
        rows.append((gen[:stop], [raw[r, i, t].item() for i, t in enumerate(gen[:stop])]))
    return rows


def test_greedy_equals_hf_generate(folder):
    model, tok = load_causal_lm(folder)
    backend = TransformersBackend(folder, batch_size=4)
    greedy = Sampling(temperature=0, max_tokens=12, logprobs=True)
    results = backend.generate([Request(str(i), prompt=p, sampling=greedy) for i, p in enumerate(PROMPTS)])
    reference = hf_greedy(model, tok, [tok(p)["input_ids"] for p in PROMPTS], 12)
    for res, (ids, logprobs) in zip(results, reference):
        (sample,) = res.samples
        assert sample.text == tok.decode([t for t in ids if t not in eos_ids(model, tok)], skip_special_tokens=True)
        assert sample.tokens == len(ids)
        assert sample.logprobs == pytest.approx(logprobs, abs=1e-4)


def test_logprobs_are_raw_model_logprobs_of_the_sampled_tokens(llama):
    """vLLM's default: log-softmax of the logits before temperature and top-k/top-p."""
    model, tok = load_causal_lm(llama)
    prompt = tok("Count to ten:")["input_ids"]
    settings = Sampling(temperature=0.5, top_k=5, max_tokens=8, logprobs=True)
    (got,) = decode(model, tok, [prompt], [settings], [3], [8])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got.ids])).logits[0].float()
    want = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(1, torch.tensor(got.ids).unsqueeze(1)).squeeze(1)
    assert got.logprobs == pytest.approx(want.tolist(), abs=1e-4)
    tempered = (logits / 0.5).log_softmax(-1)[len(prompt) - 1:-1]
    assert all(tempered[i].topk(5).indices.tolist().count(t) == 1 for i, t in enumerate(got.ids))  # top-k held


def test_draw_samples_the_processed_distribution():
    """One token per row, each row its own generator: frequencies match softmax(logits / T) after
    top-k / top-p, and a row's draw depends on its seed only."""
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    rows = 6000
    cases = [  # settings -> expected distribution
        (Sampling(temperature=1.0), [0.4, 0.3, 0.2, 0.06, 0.04]),
        (Sampling(temperature=1.0, top_k=2), [4 / 7, 3 / 7, 0, 0, 0]),
        (Sampling(temperature=1.0, top_p=0.75), [4 / 9, 3 / 9, 2 / 9, 0, 0]),  # smallest set with mass >= 0.75
        (Sampling(temperature=0.5), (torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]) ** 2 / 0.2952).tolist()),
    ]
    for settings, want in cases:
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        tokens = _draw(logits.repeat(rows, 1), list(range(rows)), [settings] * rows, gens)
        freq = torch.bincount(tokens, minlength=5).float() / rows
        assert freq.tolist() == pytest.approx(want, abs=0.02), settings
    # the same seeds in another batch (reversed, mixed with greedy rows) draw the same tokens
    settings = [Sampling(temperature=1.0), Sampling(temperature=0)] * 50
    gens = [torch.Generator().manual_seed(i) for i in range(100)]
    first = _draw(logits.repeat(100, 1), list(range(100)), settings, gens)
    gens = [torch.Generator().manual_seed(i) for i in range(100)]
    again = _draw(logits.repeat(100, 1), list(range(99, -1, -1)), settings, gens)
    assert again.flip(0).tolist() == first.tolist() and set(first[1::2].tolist()) == {0}


def test_top_k_1_top_p_tiny_and_penalties(llama):
    backend = TransformersBackend(llama)
    greedy = Sampling(temperature=0, max_tokens=24)

    def text(**kw):
        return backend.generate([Request("a", prompt="Hi", sampling=greedy.model_copy(update=kw))])[0].samples[0].text

    assert text(temperature=1.0, top_k=1, seed=4) == text(temperature=1.0, top_p=1e-6, seed=5) == text()
    model, tok = backend.load()
    prompt = tok("Hi")["input_ids"]
    (plain,) = decode(model, tok, [prompt], [greedy], [None], [24])
    assert len(set(plain.ids)) < len(plain.ids)  # the random tiny model loops on one token
    (fresh,) = decode(model, tok, [prompt], [greedy.model_copy(update={"presence_penalty": 50.0})], [None], [24])
    assert len(set(fresh.ids)) == len(fresh.ids) and fresh.ids[0] == plain.ids[0]  # nothing to penalize at first


def test_stop_strings_and_eos(llama, monkeypatch):
    backend = TransformersBackend(llama)
    greedy = Sampling(temperature=0, max_tokens=16)
    (full,) = backend.generate([Request("a", prompt="Hi", sampling=greedy)])[0].samples
    assert full.finish_reason == "length" and full.tokens == 16
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    (cut,) = backend.generate([Request("a", prompt="Hi", sampling=greedy.model_copy(update={"stop": ("@@", stop)}))])[
        0].samples
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)] and cut.tokens < 16
    # declare the 4th greedy token an EOS: generation stops there and the text leaves it out
    model, tok = backend.load()
    (run,) = decode(model, tok, [tok("Hi")["input_ids"]], [greedy], [None], [16])
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, run.ids[3]])
    (eos,) = backend.generate([Request("a", prompt="Hi", sampling=greedy)])[0].samples
    assert eos.finish_reason == "stop" and eos.tokens == 4
    assert eos.text == tok.decode(run.ids[:3], skip_special_tokens=True)


def test_bad_prompts_fail_alone_and_context_caps_length(llama):
    backend = TransformersBackend(llama)
    model, tok = backend.load()
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    near_end = " ".join(["water"] * 200)
    while len(tok(near_end)["input_ids"]) > CONTEXT - 5:  # leave room for fewer than max_tokens
        near_end = near_end[: len(near_end) - 6]
    bad_chat = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": 3})
    requests = [Request("long", prompt=long_prompt), Request("empty", prompt=""),
                Request("ok", prompt="Hi", sampling=Sampling(max_tokens=5, seed=1)),
                Request("edge", prompt=near_end, sampling=Sampling(max_tokens=50, seed=1)),
                Request("chat", messages=bad_chat, sampling=Sampling(max_tokens=5, seed=1))]
    out = {r.request_id: r.samples[0] for r in backend.generate(requests)}
    assert out["long"].finish_reason == "error" and "context" in out["long"].error
    assert out["empty"].finish_reason == "error" and "empty" in out["empty"].error
    assert out["ok"].finish_reason == "length" and out["ok"].tokens == 5
    room = CONTEXT - len(tok(near_end)["input_ids"])
    assert out["edge"].finish_reason == "length" and out["edge"].tokens == room < 50
    assert out["chat"].finish_reason == "error" and "encode" in out["chat"].error
    assert backend.counts["errors"] == 3


def test_pickles_without_the_model_and_reloads(llama):
    backend = TransformersBackend(llama)
    request = Request("a", prompt="Hi", sampling=hot(n=2))
    before = backend.generate([request])[0].samples
    clone = pickle.loads(pickle.dumps(backend))
    assert clone._lm is None and clone.revision == backend.revision and clone.revision.startswith("local-")
    assert [s.text for s in clone.generate([request])[0].samples] == [s.text for s in before]
