"""Self-Instruct (Wang et al., ACL 2023, arXiv 2212.10560) over any generation backend.

The reference is ``yizhongw/self-instruct`` (docs/sources.md#self-instruct); where the paper is silent this
follows its code: ``bootstrap_instructions.py`` (prompt, sampling, post-filters, ROUGE-L
novelty), ``identify_clf_or_not.py`` (classification detection), ``generate_instances.py``
(output-first / input-first instances) and ``prepare_for_finetuning.py`` (instance parsing and
filters). Its four steps are separate scripts over files; here they are one object over a
``Backend`` (``synth/backends/base.py``), so the same loop runs on a tiny CPU model, a vLLM
server or GPU workers, and every model call goes through the generation cache.

Each rejected candidate is recorded with a reason (``rejected``, counted in ``rejections``), so
``candidates == accepted + rejected candidates`` and nothing disappears silently. Prompts are data
files in ``prompts/self_instruct_*.jinja`` with their sources.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dataflywheel.records import content_id
from dataflywheel.synth import templates
from dataflywheel.synth.backends.base import Backend, Request, Sample, Sampling, sample_seed
from dataflywheel.synth.novelty import NoveltyIndex

STAGE = "self_instruct"

# Sampling of bootstrap_instructions.py (docs/sources.md#self-instruct, step 3): stop at a blank line or at item 16.
BOOTSTRAP_STOP = ("\n\n", "\n16", "16.", "16 .")
BOOTSTRAP_SAMPLING = Sampling(temperature=0.7, top_p=0.5, presence_penalty=2.0, frequency_penalty=0.0,
                              max_tokens=1024, stop=BOOTSTRAP_STOP)
# identify_clf_or_not.py: greedy, 3 tokens, stop at a newline or "Task". Its top_p=0 is greedy
# decoding in the OpenAI API; Sampling requires top_p > 0, and temperature 0 is greedy already.
CLASSIFY_SAMPLING = Sampling(temperature=0.0, max_tokens=3, stop=("\n", "Task"))
# generate_instances.py: greedy, presence_penalty 1.5, 300 tokens for classification tasks
# (the longer prompt) and 350 otherwise, stop at "Example <max+1>" or "Task:".
INSTANCE_SAMPLING = Sampling(temperature=0.0, presence_penalty=1.5, max_tokens=350)
CLF_INSTANCE_MAX_TOKENS = 300
# post_process_gpt3_response (docs/sources.md#self-instruct, step 4), matched as whole words, case-insensitive.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to")
YES = ("Yes", "yes", "YES")  # generate_instances.py: is_classification.strip() in these


class SelfInstructConfig(BaseModel):
    """Settings; defaults are the reference's (docs/sources.md#self-instruct; the scripts' argparse defaults)."""

    model_config = ConfigDict(extra="forbid")

    num_instructions: int = Field(100, ge=1)  # --num_instructions_to_generate
    num_prompt_instructions: int = Field(8, ge=1)  # 8 demos per prompt
    num_machine_demos: int = Field(2, ge=0)  # of which up to 2 from the machine pool
    request_batch_size: int = Field(5, ge=1)  # prompts per backend call
    classification_only: bool = False  # --use_clf_seed_tasks_only: clf seeds and the clf header
    chat: bool = False  # send each prompt as one user message (chat models) instead of a raw prompt
    bootstrap_sampling: Sampling = BOOTSTRAP_SAMPLING
    classify_sampling: Sampling = CLASSIFY_SAMPLING
    instance_sampling: Sampling = INSTANCE_SAMPLING
    rouge_threshold: float = Field(0.7, gt=0, le=1)  # reject if max ROUGE-L F > 0.7
    min_words: int = 3  # keep min_words < words <= max_words
    max_words: int = 150
    blacklist: tuple[str, ...] = BLACKLIST
    max_instances: int = Field(5, ge=1)  # --max_instances_to_generate; prepare_for_finetuning keeps <= 5
    seed: int = 42  # random.seed(42) in the scripts; also the base of every request's sampling seed
    max_requests: int | None = Field(None, ge=1)  # guard against a model that never yields a usable
    # instruction: stop after this many bootstrap requests (None: 10 x num_instructions)
    prefilter: bool = True  # MinHash/LSH prefilter for the ROUGE-L check (synth/novelty.py)


@dataclass
class MachineTask:
    """One accepted machine-written instruction and what was generated for it."""

    instruction: str
    round: int  # the bootstrap batch it came from (1-based): request_idx + 1 in the reference
    request_id: str
    most_similar: dict[str, float]
    avg_similarity_score: float
    is_classification: bool | None = None
    raw_instances: str | None = None
    instances: list[tuple[str, str]] = field(default_factory=list)  # (input, output)

    @property
    def id(self) -> str:
        return content_id(STAGE, self.instruction)


render = templates.render


def load_seed_tasks(path: str | Path) -> list[dict]:
    """Seed tasks in the reference format, one JSON object per line: ``id``, ``name``,
    ``instruction``, ``instances: [{input, output}]``, ``is_classification``."""
    tasks = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            task = json.loads(line)
            if not isinstance(task, dict) or not isinstance(task.get("instruction"), str):
                raise ValueError(f"{path}:{n}: a seed task needs a string 'instruction'")
            tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no seed tasks")
    return tasks


def encode_prompt(instructions: list[str], classification: bool = False) -> str:
    """The bootstrap prompt: numbered demos, left open at the next number (encode_prompt)."""
    cleaned = [re.sub(r"\s+", " ", i).strip().rstrip(":") for i in instructions]
    return render("self_instruct_bootstrap.jinja", instructions=cleaned, classification=classification)


def split_instructions(text: str, chat: bool = False) -> list[str]:
    """A completion -> candidate instructions: split at "\\n<number>. ", collapse whitespace,
    ``str.capitalize()`` (as the reference does: it also lowercases the rest). A chat model
    restates the open number ("9. ..."); that prefix is removed first."""
    if chat:
        text = re.sub(r"^\s*\d+\s?\.\s*", "", text)
    return [re.sub(r"\s+", " ", piece).strip().capitalize() for piece in re.split(r"\n\d+\s?\. ", text)]


def instruction_reason(inst: str, cfg: SelfInstructConfig) -> tuple[str, str] | None:
    """Why the post-filters drop a candidate, as (reason, detail), or None to keep it."""
    if not inst:
        return "empty", ""
    words = len(inst.split())
    if words <= cfg.min_words:
        return "too_short", f"{words} words <= {cfg.min_words}"
    if words > cfg.max_words:
        return "too_long", f"{words} words > {cfg.max_words}"
    for word in cfg.blacklist:
        if re.search(rf"\b({re.escape(word)})\b", inst, flags=re.IGNORECASE):
            return "blacklisted_word", word
    if inst.startswith("Write a program"):
        return "write_a_program", ""
    if inst[0] in string.punctuation:
        return "starts_with_punctuation", inst[0]
    if not inst[0].isascii():
        return "starts_with_non_ascii", inst[0]
    return None


# Instances: prepare_for_finetuning.py.
_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT = re.compile(r"Input\s*\d*\s*:")
_EXAMPLE = re.compile(r"Example\s?\d*\.?")


def parse_input_output(text: str) -> tuple[str, str]:
    """One example's text -> (input, output): split at the first "Output:", cut the output at a
    further "Input:", drop a leading "Input:" label."""
    parts = _OUTPUT.split(text)
    inp, out = (parts[0].strip(), parts[1].strip()) if len(parts) > 1 else ("", text.strip())
    out = _INPUT.split(out)[0].strip()
    return re.sub(r"^Input\s*\d*\s*:", "", inp).strip(), out


def parse_generation_instances(raw: str) -> list[tuple[str, str]]:
    """Input-first output: "Example N" blocks, or one "Output:" pair; [] if neither is there."""
    raw = raw.strip()
    if _EXAMPLE.search(raw):
        return [parse_input_output(t.strip()) for t in _EXAMPLE.split(raw) if t.strip()]
    if _OUTPUT.search(raw):
        return [parse_input_output(raw)]
    return []


def parse_classification_instances(raw: str) -> list[tuple[str, str]]:
    """Output-first output: each "Class label:" starts an instance, the label on its line and the
    input on the lines after it."""
    if "Class label:" not in raw:
        return []
    out = []
    for text in raw.split("Class label:")[1:]:
        label, _, inp = text.strip().partition("\n")
        out.append((inp.strip(), label.strip()))
    return out


def filter_instances(instances: list[tuple[str, str]], truncated: bool) -> tuple[list[tuple[str, str]], list[tuple]]:
    """The fine-tuning filters (docs/sources.md#self-instruct, step 8) -> (kept, [(reason, instance)]): the last
    instance of a truncated generation; input == output; empty output; input or output ending in
    ":"; then every instance if one non-empty input has two different outputs; then duplicates."""
    dropped: list[tuple] = []
    if truncated and instances:
        dropped.append(("instance_truncated", instances[-1]))
        instances = instances[:-1]
    valid = []
    for inp, out in instances:
        if inp == out:
            dropped.append(("instance_input_equals_output", (inp, out)))
        elif out == "":
            dropped.append(("instance_empty_output", (inp, out)))
        elif inp.strip().endswith(":") or out.strip().endswith(":"):
            dropped.append(("instance_ends_with_colon", (inp, out)))
        else:
            valid.append((inp, out))
    outputs: dict[str, set[str]] = {}
    for inp, out in valid:
        if inp:
            outputs.setdefault(inp, set()).add(out)
    if any(len(v) > 1 for v in outputs.values()):
        return [], dropped + [("instance_conflicting_outputs", i) for i in valid]
    kept: list[tuple[str, str]] = []
    for inst in valid:  # the reference's list(set(...)), in first-seen order
        if inst in kept:
            dropped.append(("instance_duplicate", inst))
        else:
            kept.append(inst)
    return kept, dropped


def user_content(instruction: str, inp: str) -> str:
    """The user turn: prepare_for_finetuning's plain encoding, instruction + blank line + input."""
    return instruction.strip() + ("\n\n" + inp.strip() if inp.strip() else "")


@dataclass
class SelfInstructResult:
    tasks: list[MachineTask]
    prompt_rows: list[dict]  # operation "bootstrap": the instruction as a user turn, no answer yet
    instance_rows: list[dict]  # operation "instances": complete conversations
    rejected: list[dict]
    rejections: Counter
    counts: Counter


class SelfInstruct:
    """The bootstrap loop, classification detection, instance generation and filters."""

    def __init__(self, backend: Backend, seed_tasks: list[dict], config: SelfInstructConfig | None = None):
        self.backend, self.cfg = backend, config or SelfInstructConfig()
        if self.cfg.classification_only:
            seed_tasks = [t for t in seed_tasks if t.get("is_classification")]
        self.seed_instructions = [t["instruction"] for t in seed_tasks]
        if not self.seed_instructions:
            raise ValueError("no seed tasks to prompt with")
        self.rng = random.Random(self.cfg.seed)
        self.index = NoveltyIndex(self.cfg.rouge_threshold, prefilter=self.cfg.prefilter)
        for inst in self.seed_instructions:
            self.index.add(inst)
        self.tasks: list[MachineTask] = []
        self.rejected: list[dict] = []
        self.rejections: Counter = Counter()
        self.counts: Counter = Counter()
        self._request_idx = 0

    def reject(self, reason: str, text: str, request_id: str, detail: str = "", step: str = "bootstrap") -> None:
        self.rejections[reason] += 1
        self.rejected.append({"stage": STAGE, "step": step, "reason": reason, "detail": detail,
                              "text": text, "request_id": request_id})

    def _request(self, rid: str, prompt: str, sampling: Sampling) -> Request:
        if self.cfg.chat:
            return Request(rid, messages=({"role": "user", "content": prompt},), sampling=sampling)
        return Request(rid, prompt=prompt, sampling=sampling)

    def compose_demos(self) -> list[str]:
        """Up to ``num_machine_demos`` from the machine pool, the rest from the seeds, shuffled."""
        machine = [t.instruction for t in self.tasks]
        demos = self.rng.sample(machine, min(self.cfg.num_machine_demos, len(machine)))
        human = self.cfg.num_prompt_instructions - len(demos)
        demos += self.rng.sample(self.seed_instructions, min(human, len(self.seed_instructions)))
        self.rng.shuffle(demos)
        return demos


    def bootstrap(self) -> list[MachineTask]:
        """Generate until ``num_instructions`` are accepted (a batch is finished, so a few more may
        be, as in the reference) or ``max_requests`` have been sent."""
        cfg = self.cfg
        limit = cfg.max_requests or 10 * cfg.num_instructions
        while len(self.tasks) < cfg.num_instructions and self._request_idx < limit:
            batch_no = self._request_idx // cfg.request_batch_size + 1
            requests = []
            for _ in range(min(cfg.request_batch_size, limit - self._request_idx)):
                prompt = encode_prompt(self.compose_demos(), cfg.classification_only)
                sampling = cfg.bootstrap_sampling.model_copy(update={"seed": sample_seed(cfg.seed, self._request_idx)})
                requests.append(self._request(f"{STAGE}/bootstrap/{self._request_idx}", prompt, sampling))
                self._request_idx += 1
            for request, result in zip(requests, self.backend.generate(requests)):
                self.counts["requests"] += 1
                for sample in result.samples:  # one unless the config asks for n > 1
                    self._take(sample, request.id, batch_no)
        return self.tasks

    def _take(self, sample: Sample, rid: str, batch_no: int) -> None:
        if sample.finish_reason == "error":
            return self.reject("backend_error", "", rid, sample.error or "")
        if sample.finish_reason == "length":  # the reference drops the whole response
            return self.reject("truncated", sample.text, rid, "finish_reason length")
        for inst in split_instructions(sample.text, self.cfg.chat):
            self.counts["candidates"] += 1
            why = instruction_reason(inst, self.cfg)
            if why:
                self.reject(why[0], inst, rid, why[1])
                continue
            first = self.index.query(inst, stats=False)
            if first.max > self.cfg.rouge_threshold:
                self.reject("too_similar", inst, rid, f"ROUGE-L {first.max:.3f} with {self.index.texts[first.argmax]!r}")
                continue
            found = self.index.query(inst)
            self.tasks.append(MachineTask(inst, batch_no, rid, self.index.most_similar(found), found.mean))
            self.index.add(inst)
            self.counts["accepted"] += 1

    def classify(self, tasks: list[MachineTask]) -> None:
        """Set ``is_classification`` from the few-shot yes/no prompt (identify_clf_or_not.py)."""
        todo = [t for t in tasks if t.is_classification is None]
        sampling = self.cfg.classify_sampling.model_copy(update={"seed": self.cfg.seed})
        requests = [self._request(f"{STAGE}/classify/{t.id}", render("self_instruct_is_classification.jinja",
                                                                      instruction=t.instruction.strip()), sampling)
                    for t in todo]
        for task, result in zip(todo, self.backend.generate(requests) if requests else []):
            sample = result.samples[0]
            if sample.finish_reason == "error":
                self.counts["classify_errors"] += 1  # the reference reads a failed call as "not classification"
            task.is_classification = sample.text.strip() in YES
            self.counts["classification" if task.is_classification else "generation"] += 1

    def generate_instances(self, tasks: list[MachineTask]) -> None:
        """Instances, output-first for classification tasks, then the fine-tuning filters."""
        stop = (f"Example {self.cfg.max_instances + 1}", "Task:")
        requests = []
        for t in tasks:
            clf = bool(t.is_classification)
            update: dict[str, Any] = {"seed": self.cfg.seed, "stop": stop}
            if clf:
                update["max_tokens"] = min(self.cfg.instance_sampling.max_tokens, CLF_INSTANCE_MAX_TOKENS)
            name = "self_instruct_instances_clf.jinja" if clf else "self_instruct_instances_gen.jinja"
            requests.append(self._request(f"{STAGE}/instances/{t.id}", render(name, instruction=t.instruction.strip()),
                                          self.cfg.instance_sampling.model_copy(update=update)))
        for task, request, result in zip(tasks, requests, self.backend.generate(requests) if requests else []):
            sample = result.samples[0]
            if sample.finish_reason == "error":
                self.reject("instance_backend_error", task.instruction, request.id, sample.error or "", "instances")
                continue
            task.raw_instances = sample.text
            parse = parse_classification_instances if task.is_classification else parse_generation_instances
            parsed = parse(sample.text)
            if not parsed:
                self.reject("instances_unparsable", sample.text, request.id, task.instruction, "instances")
                continue
            self.counts["instances_parsed"] += len(parsed)
            kept, dropped = filter_instances(parsed, sample.finish_reason == "length")
            if len(kept) > self.cfg.max_instances:  # "we only allow max 5 instances per task"
                chosen = self.rng.sample(kept, self.cfg.max_instances)
                dropped += [("instance_over_limit", i) for i in kept if i not in chosen]
                kept = chosen
            for reason, (inp, out) in dropped:
                self.reject(reason, json.dumps({"input": inp, "output": out}, ensure_ascii=False), request.id,
                            task.instruction, "instances")
            task.instances = kept
            self.counts["instances_kept"] += len(kept)

    def _meta(self, task: MachineTask, operation: str) -> dict:
        return {"synth": {"method": STAGE, "round": task.round, "parent_id": None, "operation": operation},
                STAGE: {"task_id": task.id, "instruction": task.instruction, "request_id": task.request_id,
                        "is_classification": task.is_classification, "most_similar": task.most_similar,
                        "avg_similarity_score": task.avg_similarity_score}}

    def prompt_rows(self, tasks: list[MachineTask]) -> list[dict]:
        """One row per instruction, the instruction as the only (user) turn: a prompt to answer."""
        return [{"id": t.id, "messages": [{"role": "user", "content": t.instruction}],
                 "meta": self._meta(t, "bootstrap")} for t in tasks]

    def instance_rows(self, tasks: list[MachineTask]) -> list[dict]:
        """One Conversation row per kept instance: user = instruction (+ input), assistant = output."""
        rows = []
        for t in tasks:
            if not t.instances:
                self.counts["tasks_without_instances"] += 1
            for inp, out in t.instances:
                messages = [{"role": "user", "content": user_content(t.instruction, inp)},
                            {"role": "assistant", "content": out.strip()}]
                meta = self._meta(t, "instances")
                meta[STAGE]["input"] = inp
                rows.append({"id": content_id(messages), "messages": messages, "meta": meta})
        return rows

    def run(self, instances: bool = True) -> SelfInstructResult:
        """Bootstrap, then (with ``instances``) classify and generate instances; all rows."""
        tasks = self.bootstrap()
        if instances:
            self.classify(tasks)
            self.generate_instances(tasks)
        return SelfInstructResult(tasks, self.prompt_rows(tasks), self.instance_rows(tasks) if instances else [],
                                  self.rejected, self.rejections, self.counts)
