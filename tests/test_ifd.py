"""The ifd stage on a real tiny Llama built locally (nothing downloads): our batched IFD against a
straightforward per-sample computation (model(ids, labels=...).loss), multi-turn aggregation,
truncation, thresholds, the score cache, and a real pipeline on Beam's FnApiRunner."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from dataflywheel.models.label_logps import backbone  # noqa: E402
from dataflywheel.models.tiny_lm import build_tiny_causal_lm, load_causal_lm  # noqa: E402
from dataflywheel.registry import stage_class  # noqa: E402
from dataflywheel.selectors.ifd import IFD  # noqa: E402
from dataflywheel.stages import process_batch  # noqa: E402

MAX_LEN = 160


def alpaca_row(rid: str, instruction: str, extra: str, output: str) -> dict:
    """An Alpaca row as the reader hands it on: its fields kept, messages built from them."""
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return {"id": rid, "instruction": instruction, "input": extra, "output": output,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


ROWS = [
    alpaca_row("a", "What is the capital of France?", "", "The capital of France is Paris."),
    alpaca_row("b", "Summarize the text.", "It rained all afternoon, so the football game was postponed.",
               "The game was postponed because of rain."),
    alpaca_row("c", "List three planets.", "", "Mercury, Venus and Earth."),
    alpaca_row("d", "Count from one to ten.", "", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."),
    {"id": "e", "messages": [{"role": "user", "content": "Explain why the sky looks blue during the day."},
                             {"role": "assistant", "content": "Sunlight is scattered by the air, and blue light "
                                                              "is scattered the most."}]},
]
CHAT = {"id": "m", "messages": [
    {"role": "system", "content": "Good answers are correct, complete, and easy to follow."},
    {"role": "user", "content": "Can you give me three tips for writing clear emails?"},
    {"role": "assistant", "content": "First, state your purpose early. Second, keep it short. Third, end with a clear request."},
    {"role": "user", "content": "Thank you."},
    {"role": "assistant", "content": "I am happy to help."},
]}
# Cherry_LLM's PROMPT_DICT, written out here independently of the module's constants
CHERRY_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
CHERRY_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("llama"), arch="llama", max_positions=512))


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_causal_lm(model_dir)


def stage(model_dir, **kw) -> IFD:
    s = IFD(model=model_dir, device="cpu", **{"max_length": MAX_LEN, **kw})
    s.setup()
    return s


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def masked_loss(model, context: list[int], answer: list[int]) -> float:
    """The reference: one unpadded forward, transformers' own mean loss over the unmasked labels."""
    ids = torch.tensor([context + answer])
    labels = torch.tensor([[-100] * len(context) + answer])
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def reference_pairs(tok, row: dict, template: str) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """(conditional context, answer, alone context, alone answer) token ids per assistant turn, built by hand."""
    msgs = row["messages"]
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        answer, before = m["content"], msgs[:i]
        if template == "chat":
            head = tok.apply_chat_template(before, add_generation_prompt=True, tokenize=False)
            a = encode(tok, answer + "<|im_end|>")
            out.append((encode(tok, head), a, [tok.bos_token_id] + encode(tok, "<|im_start|>assistant\n"), a))
            continue
        a = encode(tok, answer)
        if template == "plain":  # Superfiltering: instruction \n [input \n] output; the bare output alone
            if "instruction" in row:
                prompt = row["instruction"] + "\n" + (row["input"] + "\n" if row["input"] else "")
            else:
                prompt = "".join(b["content"] + "\n" for b in before)
            out.append((encode(tok, prompt), a, [a[0]], a[1:]))
            continue
        if "instruction" in row:
            q, x = row["instruction"], row["input"]
            prompt = CHERRY_INPUT.format(instruction=q, input=x) if x else CHERRY_NO_INPUT.format(instruction=q)
        else:  # a chat: earlier turns as Instruction / Response blocks, the system message as the preamble
            prompt = CHERRY_NO_INPUT.split("\n\n")[0] + "\n\n"
            for b in before:
                if b["role"] == "system":
                    prompt = b["content"] + "\n\n"
                elif b["role"] == "user":
                    prompt += f"### Instruction:\n{b['content']}\n\n"
                else:
                    prompt += f"### Response:{b['content']}\n\n"
            prompt += "### Response:"
        bos = [tok.bos_token_id]
        out.append((bos + encode(tok, prompt), a, bos + encode(tok, "### Response:"), a))
    return out


def test_registered_and_config_checked(model_dir):
    assert stage_class("ifd") is IFD
    with pytest.raises(ValidationError, match="model"):
        IFD()
    with pytest.raises(ValidationError):
        IFD(model=model_dir, template="vicuna")
    with pytest.raises(ValidationError):
        IFD(model=model_dir, max_lenght=512)  # unknown keys are errors


@pytest.mark.parametrize("template", ["plain", "alpaca", "chat"])
def test_batched_ifd_equals_per_sample_hf_loss(model_dir, lm, template):
    model, tok = lm
    out = process_batch(stage(model_dir, template=template, forward_batch_size=3, max_ifd=None), ROWS)
    assert not out.dead and not out.rejected and len(out.kept) == len(ROWS)
    for row in out.kept:
        [(q, a, q_alone, a_alone)] = reference_pairs(tok, row, template)
        cond, alone = masked_loss(model, q, a), masked_loss(model, q_alone, a_alone)
        s = row["scores"]
        assert s["ifd"] == pytest.approx(cond / alone, abs=1e-5), row["id"]
        assert s["ifd_ppl_ratio"] == pytest.approx(math.exp(cond - alone), abs=1e-5), row["id"]
        assert s["ifd_loss_cond"] == pytest.approx(cond, abs=1e-5)
        assert s["ifd_loss_alone"] == pytest.approx(alone, abs=1e-5)
        assert s["ifd_tokens"] == len(a) and s["ifd_truncated"] == 0
        assert (s["ifd"] > 1) == (s["ifd_ppl_ratio"] > 1)  # the two variants agree on the IFD > 1 cut
    # the ratio variants rank differently in general; here at least they are not the same numbers
    assert any(abs(r["scores"]["ifd"] - r["scores"]["ifd_ppl_ratio"]) > 1e-3 for r in out.kept)


@pytest.mark.parametrize("template", ["plain", "alpaca", "chat"])
def test_multi_turn_pooled_mean_and_last_from_per_turn_sums(model_dir, lm, template):
    model, tok = lm
    turns = [(masked_loss(model, q, a) * len(a), len(a), masked_loss(model, qa, aa) * len(aa), len(aa))
             for q, a, qa, aa in reference_pairs(tok, CHAT, template)]
    got = {}
    for how in ("pooled", "mean", "last"):
        [row] = process_batch(stage(model_dir, template=template, multi_turn=how, max_ifd=None), [CHAT]).kept
        got[how] = row
        assert len(row["meta"]["ifd_turns"]) == 2 and row["scores"]["ifd_truncated"] == 0
    per_turn = [t["ifd"] for t in got["pooled"]["meta"]["ifd_turns"]]
    assert got["mean"]["scores"]["ifd"] == pytest.approx(sum(per_turn) / 2, abs=1e-9)
    assert got["last"]["scores"]["ifd"] == pytest.approx(per_turn[1], abs=1e-9)
    assert got["last"]["scores"]["ifd_tokens"] < got["pooled"]["scores"]["ifd_tokens"]
    # the hand computation from the per-turn sums of the reference forwards
    (c1, n1, a1, m1), (c2, n2, a2, m2) = turns
    pooled = ((c1 + c2) / (n1 + n2)) / ((a1 + a2) / (m1 + m2))
    assert got["pooled"]["scores"]["ifd"] == pytest.approx(pooled, abs=1e-5)
    assert per_turn == pytest.approx([(c1 / n1) / (a1 / m1), (c2 / n2) / (a2 / m2)], abs=1e-5)
    assert got["pooled"]["scores"]["ifd_tokens"] == n1 + n2
    # the pooled value is token-weighted: it lies between the per-turn values, not at their mean
    assert min(per_turn) <= got["pooled"]["scores"]["ifd"] <= max(per_turn)
    # a one-turn conversation: every aggregation is the single-turn IFD, and it equals the first
    # turn of the longer chat (same context, same answer)
    first = {"id": "one", "messages": CHAT["messages"][:3]}
    values = {how: process_batch(stage(model_dir, template=template, multi_turn=how, max_ifd=None), [first])
              .kept[0]["scores"]["ifd"] for how in ("pooled", "mean", "last")}
    assert values["pooled"] == values["mean"] == values["last"]
    # equal to float rounding: the head runs over a batch's scored positions gathered together,
    # so a row's log-probs can differ in their last bits from batch to batch
    assert values["pooled"] == pytest.approx(per_turn[0], abs=1e-7)


def test_truncation_is_reported_and_filtered(model_dir):
    long = alpaca_row("long", "Repeat the sentence many times.", "", "The quick brown fox jumps over the lazy dog. " * 20)
    rows = [ROWS[0], long]
    out = process_batch(stage(model_dir, max_ifd=None), rows)
    assert [r["id"] for r in out.kept] == ["a"] and out.stats["truncated"] == 1
    [cut] = out.rejected
    assert cut["rejected"]["reason"] == "truncated" and cut["scores"]["ifd_truncated"] == 1
    assert 0 < cut["scores"]["ifd_tokens"] < len(long["output"].split())  # scored, on the tokens that fit
    assert math.isfinite(cut["scores"]["ifd"])
    kept = process_batch(stage(model_dir, max_ifd=None, drop_truncated=False), rows)
    assert len(kept.kept) == 2 and kept.stats["truncated"] == 1


def test_missing_answers_get_no_ifd_and_are_rejected(model_dir, lm):
    _, tok = lm
    one_token = next(w for w in ("Yes", "Hi", "a") if len(encode(tok, w)) == 1)
    rows = [{"id": "empty", "messages": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]},
            {"id": "short", "messages": [{"role": "user", "content": "Answer."}, {"role": "assistant", "content": one_token}]},
            ROWS[0]]
    out = process_batch(stage(model_dir, max_ifd=None), rows)  # plain: the bare one-token answer has nothing scored alone
    assert [r["id"] for r in out.kept] == ["a"]
    assert {r["id"]: r["rejected"]["reason"] for r in out.rejected} == {"empty": "no_answer_tokens", "short": "no_answer_tokens"}
    for r in out.rejected:
        assert "ifd" not in r["scores"] and "ifd_ppl_ratio" not in r["scores"]
        assert all(math.isfinite(v) for v in r["scores"].values())  # no NaN anywhere
    assert out.rejected[0]["scores"]["ifd_tokens"] == 0
    with_chat = process_batch(stage(model_dir, template="chat", max_ifd=None), rows[:1]).kept
    assert with_chat and with_chat[0]["scores"]["ifd_tokens"] == 1  # chat: the end-of-turn token is still an answer


def test_max_ifd_reapplies_to_stored_scores(model_dir):
    scored = process_batch(stage(model_dir, max_ifd=None, forward_batch_size=2), ROWS + [CHAT]).kept
    values = sorted(r["scores"]["ifd"] for r in scored)
    cut = (values[2] + values[3]) / 2
    fresh = IFD(model="unused", max_ifd=cut)  # never set up: keep() reads stored scores only
    decisions = {r["id"]: fresh.keep(r) for r in scored}
    assert {rid for rid, (ok, _) in decisions.items() if not ok} == {r["id"] for r in scored if r["scores"]["ifd"] > cut}
    assert {reason for ok, reason in decisions.values() if not ok} == {"ifd_above_max"}
    default = IFD(model="unused")  # max_ifd 1.0: Cherry_LLM's cut
    assert all(default.keep(r)[0] == (r["scores"]["ifd"] <= 1.0) for r in scored)


def test_cache_makes_a_rerun_forward_free(model_dir, tmp_path):
    path = str(tmp_path / "scores.sqlite")
    scorer = stage(model_dir, cache=path, max_ifd=None)
    calls = []
    # stages share the loaded model; its backbone runs once per forward (the head runs in chunks)
    hook = backbone(scorer.model).register_forward_hook(lambda *_: calls.append(1))
    try:
        rows = ROWS + [CHAT]
        first = process_batch(scorer, rows)
        n_first = len(calls)
        assert n_first > 0 and len(first.kept) == len(rows)
        again = process_batch(stage(model_dir, cache=path, max_ifd=1.0), rows)  # a new threshold, a new stage
        assert len(calls) == n_first  # not one forward
        scores = {r["id"]: (r["scores"], r["meta"]) for r in first.kept}
        assert {r["id"]: (r["scores"], r["meta"]) for r in again.kept + again.rejected} == scores
        grown = process_batch(stage(model_dir, cache=path, max_ifd=None), rows + [alpaca_row("new", "Say hello.", "", "Hello!")])
        assert len(calls) == n_first + 1  # only the new pair: its two sequences in one forward
        assert len(grown.kept) == len(rows) + 1
        process_batch(stage(model_dir, cache=path, template="alpaca", max_ifd=None), rows)
        assert len(calls) > n_first + 1  # another template is another key
    finally:
        hook.remove()


def test_chat_template_required_for_chat(tmp_path):
    from dataflywheel.errors import UserError

    folder = build_tiny_causal_lm(tmp_path / "m", arch="gpt2", max_positions=64)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(UserError, match="chat template"):
        IFD(model=str(folder), template="chat", device="cpu", max_length=64).setup()


def test_ifd_and_select_top_on_beam_equal_the_plain_loop(model_dir, lm, tmp_path):
    from dataflywheel.io import read
    from dataflywheel.pipelines.config import parse_config
    from dataflywheel.pipelines.job import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    rows = ROWS + [CHAT]
    rows += [{"id": f"g{i:02d}", "messages": [{"role": "user", "content": f"Row {i}: when did the train leave?"},
                                              {"role": "assistant", "content": f"The train left at {i} o'clock."}]}
             for i in range(8)]
    one_token = next(w for w in ("Yes", "Hi", "a") if len(encode(lm[1], w)) == 1)  # plain: nothing scored alone
    rows.append({"id": "short", "messages": [{"role": "user", "content": "Quiet."}, {"role": "assistant", "content": one_token}]})
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stages = [{"stage": "ifd", "model": model_dir, "max_length": MAX_LEN, "device": "cpu", "batch_size": 4,
               "forward_batch_size": 4, "max_ifd": None},
              {"stage": "select_top", "field": "ifd", "fraction": 0.5}]
    kept = {}
    for engine in ("plain", "local"):
        cfg = {"name": "ifd", "runner": {"engine": engine}, "stages": stages,
               "input": {"paths": str(folder / "*.jsonl"), "kind": "conversation", "batch_rows": 5},
               "output": {"path": str(tmp_path / engine), "format": "jsonl"}}
        parsed = parse_config(cfg, "<test>")
        report = run_job(parsed.jobs[0], parsed.runner)
        by = {s.stage: s for s in report.stages}
        n = len(rows)
        assert by["ifd"].rows_in == n and by["ifd"].kept == n - 1 and by["ifd"].rejected == {"no_answer_tokens": 1}
        assert by["select_top"].rows_in == n - 1 and by["select_top"].kept == (n - 1) // 2
        assert by["select_top"].rejected == {"not_selected": n - 1 - (n - 1) // 2}
        assert by["select_top"].stats == {"selected": (n - 1) // 2, "budget": (n - 1) // 2}
        assert all(s.balanced for s in report.stages)
        out = list(read(str(tmp_path / engine)))
        kept[engine] = sorted(r["id"] for r in out)
        assert min(r["scores"]["ifd"] for r in out) >= max(
            r["scores"]["ifd"] for r in read(str(tmp_path / engine / "_rejected")) if "ifd" in r["scores"]
            and r["rejected"]["stage"] == "select_top")
    assert kept["plain"] == kept["local"]


def test_alpaca_subset_scores_are_finite_and_reconcile(shared_data, model_dir):
    from dataflywheel.io import read

    path = shared_data / "alpaca_subset" / "alpaca_cherry5pct_shared.jsonl"
    rows = [r for _, r in zip(range(50), read(str(path), kind="conversation"))]  # the first 50 lines
    assert len(rows) == 50 and all("instruction" in r for r in rows)
    out = process_batch(stage(model_dir, template="alpaca", max_length=512, forward_batch_size=8), rows)
    assert out.rows_in == 50 and not out.dead
    reasons = {r["rejected"]["reason"] for r in out.rejected}
    assert reasons <= {"truncated", "ifd_above_max", "no_answer_tokens"}
    scored = out.kept + out.rejected
    assert all(math.isfinite(v) for r in scored for v in r["scores"].values())
    assert sum("ifd" in r["scores"] for r in scored) >= 45
    assert all(r["scores"]["ifd"] <= 1.0 for r in out.kept)
    assert out.stats["truncated"] == sum(r["scores"]["ifd_truncated"] for r in scored)
