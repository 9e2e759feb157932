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


# -- token ids and the live-model backend (GRPO rollouts) ----------------------------------------


def test_token_ids_decode_back_to_the_text(llama, monkeypatch):
    backend = TransformersBackend(llama)
    model, tok = backend.load()
    eos = eos_ids(model, tok)
    (greedy,) = backend.generate([Request("g", prompt="Hi", sampling=Sampling(temperature=0, max_tokens=12))])[0].samples
    # make the 4th greedy token an EOS: the sample ends there, and its ids keep the EOS the text drops
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, greedy.token_ids[3]])
    requests = [Request("a", messages=CHAT, sampling=hot(n=3, logprobs=True)), Request("g", prompt="Hi",
                sampling=Sampling(temperature=0, max_tokens=12))]
    samples = [s for r in backend.generate(requests) for s in r.samples]
    assert samples[-1].finish_reason == "stop" and samples[-1].token_ids == greedy.token_ids[:4]
    for s in samples:
        assert len(s.token_ids) == s.tokens > 0 and all(isinstance(t, int) for t in s.token_ids)
        body = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
        assert s.finish_reason == "length" or s.token_ids[-1] in eos | {greedy.token_ids[3]}
        assert tok.decode(body, skip_special_tokens=True) == s.text
    assert all(len(s.logprobs) == len(s.token_ids) for s in samples[:3])


def _fresh_copy(folder):
    """A model object of its own (``load_causal_lm`` shares one per process; we perturb this one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(folder)


def test_live_backend_matches_the_folder_backend_and_sees_weight_changes(llama):
    model, tok = _fresh_copy(llama)
    live = TransformersBackend.from_model(model, tok, "policy", batch_size=4)
    requests = [Request("c", messages=CHAT, sampling=hot(n=3, logprobs=True)),
                Request("g", prompt="Count to ten:", sampling=Sampling(temperature=0, max_tokens=12))]
    got, want = live.generate(requests), TransformersBackend(llama).generate(requests)
    for a, b in zip(got, want):
        assert [(s.text, s.token_ids, s.seed) for s in a.samples] == [(s.text, s.token_ids, s.seed) for s in b.samples]
    assert got[0].samples[0].logprobs == pytest.approx(want[0].samples[0].logprobs, abs=1e-4)
    assert {r.model for r in got} == {"policy"} and not any(s.cached for r in got for s in r.samples)
    # an optimizer step changes the weights in place: the very same backend samples from the new ones
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    live.sync_weights(model)  # a no-op, here for symmetry with the vLLM backend
    moved = live.generate(requests[1:])[0].samples[0]
    assert moved.token_ids != got[1].samples[0].token_ids


def test_live_backend_decodes_in_eval_no_grad_and_restores_each_module_mode(llama):
    model, tok = _fresh_copy(llama)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((m.training, torch.is_grad_enabled())))
    live = TransformersBackend.from_model(model, tok, "policy")
    model.train()
    frozen = model.model.layers[0]
    frozen.eval()  # a submodule the trainer keeps in eval: model.train() afterwards would flip it
    sample = live.generate([Request("a", prompt="Hi", sampling=hot(n=2, max_tokens=5))])[0].samples[0]
    assert sample.tokens == 5 and seen and set(seen) == {(False, False)}
    assert model.training and model.model.layers[1].training and not frozen.training
    # what was made under inference is not in the way of the next training step
    ids = torch.tensor([tok("Hi there")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.lm_head.parameters())
    model.eval()
    live.generate([Request("b", prompt="Hi", sampling=hot(n=1, max_tokens=2))])
    assert not any(m.training for m in model.modules())


def test_live_backend_refuses_a_cache_and_pickling(llama, tmp_path):
    from dataflywheel.errors import UserError
    from dataflywheel.synth.cache import GenerationCache

    model, tok = _fresh_copy(llama)
    with pytest.raises(UserError, match="weights change every step"):
        TransformersBackend.from_model(model, tok, "policy", cache=GenerationCache(tmp_path / "c.sqlite"))
    with pytest.raises(TypeError, match="does not pickle"):
        pickle.dumps(TransformersBackend.from_model(model, tok, "policy"))
