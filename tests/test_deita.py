"""Deita scorers against the straightforward computation (one prompt, one unpadded forward, the full
softmax restricted to the six digit ids), on real tiny Llama and GPT-2 models built locally; and
combine_scores."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from transformers import AutoModelForCausalLM  # noqa: E402

from dataflywheel.errors import UserError  # noqa: E402
from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_causal_lm  # noqa: E402
from dataflywheel.registry import stage_class  # noqa: E402
from dataflywheel.selectors.deita import (  # noqa: E402
    CombineScores,
    DeitaScore,
    deita_prompt,
    digit_token_ids,
    expected_score,
)
from dataflywheel.stages import process_batch  # noqa: E402

# hkust-nlp/deita src/deita/selection/scorer/llama_scorer.py, copied here as the independent reference
COMPLEXITY = ("You are a helpful assistant. Please identify the complexity score of the following user query. \n"
              "##Query: {instruction}  \n##Complexity: ")
QUALITY = ("You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
           "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: ")

ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"},
                             {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Count from one to ten."},
                             {"role": "assistant", "content": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."},
                             {"role": "user", "content": "Now list the planets of the solar system in order."},
                             {"role": "assistant", "content": "Mercury, Venus, Earth, Mars, Jupiter, Saturn, "
                                                              "Uranus and Neptune."}]},
    {"id": "c", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def any_arch(request, tmp_path_factory):
    """Rotary (Llama) and absolute (GPT-2) positions: left padding must be exact for both."""
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch=request.param, max_positions=256))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("llama"), arch="llama", max_positions=256))


def reference(folder: str, text: str, template: str = "deita") -> float:
    """Expected score the plain way: one prompt, no padding, full log-softmax, the six digits renormalized."""
    model, tok = load_causal_lm(folder)
    if template == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(text, add_special_tokens=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    p = torch.exp(logp[[tok.convert_tokens_to_ids(str(d)) for d in range(1, 7)]])
    p = p / p.sum()
    return float((p * torch.arange(1, 7, dtype=torch.float64)).sum())


def stage(folder: str, **kw) -> DeitaScore:
    s = DeitaScore(model=folder, device="cpu", **kw)
    s.setup()
    return s


def test_prompts_are_deitas_verbatim():
    q, a = "Explain {this}\n with {{ braces }}", "Sure.\n"
    assert deita_prompt("complexity", q) == COMPLEXITY.format(instruction=q)
    assert deita_prompt("quality", q, a) == QUALITY.format(instruction=q, output=a)


def test_digit_ids_single_tokens_vocab_fallback_and_failure(model_dir):
    _, tok = load_causal_lm(model_dir)
    ids = digit_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5", "6"]

    class SentencePieceLike:  # "1" encodes to ["▁", "1"], but "1" is a vocabulary entry (LLaMA)
        unk_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [7, 100 + int(text)]

        def convert_tokens_to_ids(self, token):
            return 100 + int(token) if token != "4" or self.has_four else 0

    sp = SentencePieceLike()
    sp.has_four = True
    assert digit_token_ids(sp) == [101, 102, 103, 104, 105, 106]
    sp.has_four = False
    with pytest.raises(UserError, match="'4' is not a single token"):
        digit_token_ids(sp)


def test_expected_value_equals_full_softmax_reference_batched_and_alone(any_arch):
    model_dir = any_arch
    turns = [(m[i - 1]["content"], m[i]["content"]) for r in ROWS for m in [r["messages"]]
             for i in range(len(m)) if m[i]["role"] == "assistant"]
    batched = stage(model_dir, forward_batch_size=3)
    alone = stage(model_dir, forward_batch_size=1)
    for kind, fmt in (("complexity", COMPLEXITY), ("quality", QUALITY)):
        prompts = [deita_prompt(kind, q, a) for q, a in turns]
        got = batched.scorers[kind].score(prompts)
        one = [alone.scorers[kind].score([p])[0] for p in prompts]
        for (q, a), (value, cut), (single, _) in zip(turns, got, one, strict=True):
            ref = reference(model_dir, fmt.format(instruction=q, output=a))
            assert not cut and 1.0 <= value <= 6.0
            assert value == pytest.approx(ref, abs=1e-5)
            assert value == pytest.approx(single, abs=1e-5)
    # the prompts differ in length, so the batch really was padded
    lengths = {len(batched.scorers["quality"].encode(deita_prompt("quality", q, a))) for q, a in turns}
    assert len(lengths) > 2


def test_multi_turn_sum_of_products_and_means(any_arch):
    model_dir = any_arch
    s = stage(model_dir)
    out = process_batch(s, [dict(r) for r in ROWS])
    assert not out.dead and len(out.kept) == 3
    by = {r["id"]: r for r in out.kept}
    b = by["b"]
    pairs = [("Count from one to ten.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."),
             ("Now list the planets of the solar system in order.",
              "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.")]
    c = [reference(model_dir, COMPLEXITY.format(instruction=q)) for q, _ in pairs]
    q = [reference(model_dir, QUALITY.format(instruction=u, output=a)) for u, a in pairs]
    assert b["meta"]["deita"]["complexity"] == pytest.approx(c, abs=1e-5)
    assert b["meta"]["deita"]["quality"] == pytest.approx(q, abs=1e-5)
    assert b["scores"]["deita_score"] == pytest.approx(c[0] * q[0] + c[1] * q[1], abs=1e-4)
    assert b["scores"]["deita_complexity"] == pytest.approx(sum(c) / 2, abs=1e-5)
    assert b["scores"]["deita_quality"] == pytest.approx(sum(q) / 2, abs=1e-5)
    a = by["a"]["scores"]
    assert a["deita_score"] == pytest.approx(a["deita_complexity"] * a["deita_quality"], rel=1e-9)
    assert out.stats == {"fallback": 0, "truncated": 0, "cache_hits": 0, "prompts_scored": 8}  # no cache: every distinct prompt computed


def test_one_scorer_sums_its_own_turn_scores(model_dir):
    s = stage(model_dir, scorers=["complexity"])
    row = process_batch(s, [ROWS[1]]).kept[0]
    assert "deita_quality" not in row["scores"] and "quality" not in row["meta"]["deita"]
    assert row["scores"]["deita_score"] == pytest.approx(sum(row["meta"]["deita"]["complexity"]), rel=1e-12)


def test_chat_template_and_middle_truncation(model_dir):
    s = stage(model_dir, template="chat")
    row = process_batch(s, [ROWS[0]]).kept[0]
    user, answer = ROWS[0]["messages"][0]["content"], ROWS[0]["messages"][1]["content"]
    assert row["meta"]["deita"]["quality"][0] == pytest.approx(
        reference(model_dir, QUALITY.format(instruction=user, output=answer), "chat"), abs=1e-5)
    short = stage(model_dir, max_length=24)
    prompt = deita_prompt("quality", user, answer)
    ids = short.scorers["quality"].encode(prompt)
    assert len(ids) > 24
    (value, cut), = short.scorers["quality"].score([prompt])
    model, tok = load_causal_lm(model_dir)
    kept = ids[:12] + ids[-12:]  # the preamble and the "##Quality: " cue both stay
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([kept])).logits[0, -1]
    assert cut and value == pytest.approx(expected_score(logits[digit_token_ids(tok)].double().tolist()), abs=1e-5)
    assert process_batch(short, [ROWS[0]]).stats["truncated"] >= 1


def test_cache_answers_a_rerun_without_the_model(model_dir, tmp_path):
    first = process_batch(stage(model_dir, cache=str(tmp_path / "c.sqlite")), [dict(r) for r in ROWS]).kept
    again = stage(model_dir, cache=str(tmp_path / "c.sqlite"))
    for scorer in again.scorers.values():
        scorer.model = None  # any forward would now raise
    second = process_batch(again, [dict(r) for r in ROWS])
    assert not second.dead and [r["scores"] for r in second.kept] == [r["scores"] for r in first]
    other = stage(model_dir, cache=str(tmp_path / "c.sqlite"), template="chat")  # other settings, other keys
    for scorer in other.scorers.values():
        scorer.model = None
    assert len(process_batch(other, [ROWS[0]]).dead) == 1


def test_non_finite_logits_fall_back_to_3_and_are_counted(tmp_path):
    folder = build_tiny_causal_lm(tmp_path / "m", arch="llama", max_positions=256)
    _, tok = load_causal_lm(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[digit_token_ids(tok)[2]] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    out = process_batch(stage(str(tmp_path / "nan")), [dict(r) for r in ROWS])
    assert out.stats["fallback"] == 2 * 4  # two scorers x four turns
    b = next(r for r in out.kept if r["id"] == "b")
    assert b["meta"]["deita"]["complexity"] == [3.0, 3.0] and b["scores"]["deita_score"] == 18.0


def test_on_error_fallback_or_dead_letter(model_dir):
    class Broken:
        def parameters(self):
            raise RuntimeError("forward failed")

    s = stage(model_dir, on_error="fallback")
    s.scorers["quality"].model = Broken()
    out = process_batch(s, [dict(r) for r in ROWS])
    assert not out.dead and out.stats["fallback"] == 4
    assert all(v == 3.0 for r in out.kept for v in r["meta"]["deita"]["quality"])
    assert not any(v == 3.0 for r in out.kept for v in r["meta"]["deita"]["complexity"])
    strict = stage(model_dir)
    strict.scorers["quality"].model = Broken()
    assert len(process_batch(strict, [dict(r) for r in ROWS]).dead) == 3


def test_config_errors_and_registry(model_dir):
    assert stage_class("deita_score") is DeitaScore and stage_class("combine_scores") is CombineScores
    with pytest.raises(ValueError, match="no model for the quality scorer"):
        DeitaScore(complexity_model=model_dir)
    assert DeitaScore(complexity_model=model_dir, scorers=["complexity"]).config.model_for("complexity") == model_dir
    with pytest.raises(UserError, match="exceeds the context"):
        stage(model_dir, max_length=100_000)
    with pytest.raises(UserError, match="needs 6 ids"):
        stage(model_dir, digit_token_ids=[1, 2, 3])


def test_expected_score_math():
    assert expected_score([0.0] * 6) == pytest.approx(3.5)
    assert expected_score([0, 0, 0, 0, 0, 50.0]) == pytest.approx(6.0)
    assert expected_score([1000.0, 0, 0, 0, 0, 0]) == pytest.approx(1.0)  # no overflow
    assert expected_score([0, math.nan, 0, 0, 0, 0]) is None


def test_combine_scores_product_sum_weights_missing():
    rows = [{"id": "x", "scores": {"c": 2.0, "q": 3.0, "combined": 99.0}},
            {"id": "y", "scores": {"c": 4.0}},
            {"id": "z", "scores": {"c": 1.0, "q": float("nan"), "combined": 5.0}}]
    out = process_batch(CombineScores(fields=["c", "q"]), rows)
    assert [r["scores"]["combined"] for r in out.kept] == [6.0]
    assert [(r["id"], r["rejected"]["reason"]) for r in out.rejected] == [("y", "missing_score"), ("z", "missing_score")]
    assert "combined" not in out.rejected[1]["scores"]  # a stale value is never kept
    weighted = CombineScores(fields=["c", "q"], op="sum", weights=[0.5, 2.0], out="rank")
    assert process_batch(weighted, rows[:1]).kept[0]["scores"]["rank"] == pytest.approx(7.0)
    power = CombineScores(fields=["c", "q"], weights=[2.0, 1.0])
    assert process_batch(power, rows[:1]).kept[0]["scores"]["combined"] == pytest.approx(12.0)
    with pytest.raises(ValueError):
        CombineScores(fields=["c"], out="c")
    with pytest.raises(ValueError):
        CombineScores(fields=["c", "q"], weights=[1.0])
