"""The rounds config (``dataflywheel rounds configs/flywheel.yaml``): YAML validated by pydantic.

One config describes the whole loop: where prompts come from (a built-in verifiable task or a
prompt pool on disk), the seed data and the first policy, how each round samples, scores, pools,
curates and trains, and how it is evaluated. Every default is stated here once; the demo's values
(configs/flywheel.yaml) are explained there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import Strict, expand_env, load_yaml, read_yaml
from ..errors import UserError
from ..registry import StageSpec
from ..runner import RunnerConfig
from ..synth.backends.base import Sampling
from ..synth.backends.config import BackendConfig
from ..synth.pairs import PairsConfig
from ..train.config import LoopConfig
from ..train.model import TinyInit


class TaskConfig(Strict):
    """A built-in verifiable task (flywheel/tasks): it writes the seed set, each round's fresh
    prompts and the held-out set, all disjoint by construction (different seeds, id prefixes)."""

    kind: Literal["arithmetic"] = "arithmetic"
    width: int = Field(3, ge=0)  # operands zero-padded to this many digits (fixed positions); 0: as written
    reverse: bool = True  # digits least-significant first: the carry flows left to right (Lee et al. 2023)
    ops: tuple[str, ...] = ("+",)
    seed_rows: int = Field(500, ge=1)  # the seed SFT set of round 0
    seed_digits: tuple[int, int] = (1, 3)
    eval_rows: int = Field(300, ge=1)
    eval_digits: tuple[int, int] = (3, 3)
    template: str = "{a}{op}{b}="  # the question from the operands {a}, {b} and the operator {op}

    @model_validator(mode="after")
    def _template(self) -> TaskConfig:
        try:
            self.template.format(a="1", op="+", b="2")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template {self.template!r}: only {{a}}, {{op}} and {{b}} can be filled ({err})") from None
        return self


class PromptsConfig(Strict):
    per_round: int = Field(512, ge=1)  # fresh prompts each round (RLHFlow draws new prompts per iteration)
    curriculum: list[tuple[int, int]] = []  # task digits per round (easy -> hard); the last repeats
    paths: list[str] = []  # instead of the task: a prompt pool, split into disjoint per-round slices
    eval_paths: list[str] = []  # held-out prompts for a pool (the task writes its own)
    seed_paths: list[str] = []  # round 0's SFT rows for a pool (conversations; prompt + chosen of preference rows)
    # how pool files read: prompt rows, or preference rows (HH-RLHF transcripts too) whose prompt is taken
    kind: Literal["prompt", "preference"] = "prompt"
    max_prompt_chars: int | None = Field(None, ge=1)  # longer pool prompts are left out (counted)
    eval_rows: int | None = Field(None, ge=1)  # the first eval_rows held-out prompts (in a seeded order)
    # the held-out check: a verifiers.py name or "module:function"; None: prompts without answers
    # (evaluated by eval.reward_model and eval.judge)
    verifier: str | None = "exact_match"


class PoolConfig(Strict):
    mode: Literal["all_rounds", "last_round"] = "all_rounds"  # Llama 2's fix: the best of every round
    min_score: float = 1.0  # best_of_n threshold on the scorer field (1.0: a verified answer)
    field: str = "verifier"
    weight: float = Field(0.5, ge=0, le=1)  # share of each round's training rows drawn from the pool


class CurateConfig(Strict):
    """Curation and selection of each round's SFT rows (the `select` pipeline's steps)."""

    exact_dedup: bool = True
    select: Literal["none", "random", "ifd"] = "none"  # ifd: top by IFD under the current policy
    budget: int | None = Field(None, ge=1)  # rows kept by `select` (random and ifd at the same budget)


class TrainConfig(Strict):
    algorithm: Literal["sft", "sft+dpo", "dpo", "grpo"] = "sft"
    steps: int = Field(150, ge=1)  # fixed optimizer steps per round: compute-matched arms, not wall time
    loop: LoopConfig = LoopConfig(lr=5e-4, batch_size=8, warmup_ratio=0.05, progress=False)
    dpo_steps: int = Field(50, ge=1)
    dpo_loop: LoopConfig = LoopConfig(lr=1e-4, batch_size=8, progress=False)
    dpo_beta: float = Field(0.1, gt=0)  # TRL 1.16 DPOConfig's default
    dpo: dict[str, Any] = {}  # DpoConfig options (loss_type, loss_weights, dpop_lambda, simpo_gamma, ...)
    # the DPO reference: this round's starting policy (RLHFlow's online iterative DPO) or round 0's, fixed
    dpo_reference: Literal["round_start", "fixed"] = "round_start"
    grpo: dict[str, Any] = {}  # GrpoConfig options (prompts_per_step, beta, loss_type, ...); steps and lr as above
    max_length: int = Field(256, ge=8)


class RmRefreshConfig(Strict):
    """West-of-N's use (Pace et al. 2024): after sampling, the reward model is trained
    further on the round's West-of-N pairs (labelled by itself), plus labelled pairs when given;
    the next round scores with the refreshed model."""

    steps: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)  # TRL 1.16 RewardConfig's default
    batch_size: int = Field(8, ge=1)
    data: list[str] = []  # labelled preference rows (D_L) mixed with the synthetic pairs


class SeedPolicyConfig(Strict):
    model: str | None = None  # a folder or Hub id to start from ...
    tiny: TinyInit | None = None  # ... or a tiny model built here and trained on the seed set
    steps: int = Field(400, ge=0)  # round 0's SFT steps on the seed set; 0: round 0 is the model as given
    loop: LoopConfig = LoopConfig(lr=1e-3, batch_size=8, warmup_ratio=0.05, progress=False)

    @model_validator(mode="after")
    def _one(self) -> SeedPolicyConfig:
        if (self.model is None) == (self.tiny is None):
            raise ValueError("policy: give exactly one of model or tiny")
        if self.tiny is not None and self.steps == 0:
            raise ValueError("policy.steps: a tiny model is built untrained; give it steps >= 1")
        return self


class EvalConfig(Strict):
    n: int = Field(1, ge=1)  # samples per held-out prompt; accuracy is greedy pass@1 ...
    pass_at: int = Field(0, ge=0)  # ... plus pass@k with k samples at the sampling temperature when > 0
    # a fixed evaluation reward model (a `train rm` folder): mean reward of the greedy answers, and
    # the win rate against round 0's answers when there is no judge
    reward_model: str | None = None
    # an LLM judge of the round's answers against round 0's, MT-Bench's pairwise prompt in both orders
    judge: BackendConfig | None = None
    judge_samples: int = Field(1, ge=1)  # judge samples per ordered comparison


class PlateauConfig(Strict):
    patience: int = Field(1, ge=1)  # rounds without a gain of min_delta before --until-plateau stops
    min_delta: float = Field(0.01, ge=0)


class FlywheelConfig(Strict):
    name: str = "flywheel"
    output: str  # the run folder: round-000/, round-001/, ..., manifest.json, report.html
    seed: int = 0  # one seed for everything (task sets, sampling, training)
    rounds: int = Field(3, ge=0)
    task: TaskConfig | None = TaskConfig()
    prompts: PromptsConfig = PromptsConfig()
    policy: SeedPolicyConfig
    sampling: Sampling = Sampling(n=16, temperature=1.0, max_tokens=8)  # each round's samples; seed: round_seed
    batch_size: int = Field(128, ge=1)  # generation batch (prompts x samples per forward)
    scorers: list[StageSpec] = Field(  # the samples' scorers
        default_factory=lambda: [StageSpec.of("verify", {"verifier": "exact_match"})])
    # the round's preference pairs from its scored samples: West-of-N (best vs worst) by default;
    # max_min, and length control by length_penalty or max_length_ratio (synth/pairs.py)
    pairs: PairsConfig = PairsConfig()
    pool: PoolConfig = PoolConfig()
    curate: CurateConfig = CurateConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    plateau: PlateauConfig = PlateauConfig()
    rm_refresh: RmRefreshConfig | None = None  # needs a reward_model scorer
    control: bool = False  # True: rounds train on the seed set alone (the compute-matched control)
    runner: RunnerConfig = RunnerConfig()  # the engine of the Beam stages (samples, curate): local, dataflow or portable

    @model_validator(mode="after")
    def _check(self) -> FlywheelConfig:
        if self.task is None and not self.prompts.paths:
            raise ValueError("give a task or prompts.paths (a prompt pool)")
        if self.task is None and not self.prompts.eval_paths:
            raise ValueError("a prompt pool needs prompts.eval_paths (held-out prompts)")
        if self.task is None and self.policy.steps > 0 and not self.prompts.seed_paths:
            raise ValueError("a prompt pool with policy.steps > 0 needs prompts.seed_paths (round 0's SFT rows)")
        if self.prompts.verifier is None and self.eval.reward_model is None and self.eval.judge is None:
            raise ValueError("prompts without a verifier need eval.reward_model or eval.judge to be evaluated")
        if self.task is not None and self.prompts.verifier is None:
            raise ValueError("a task has answers: give prompts.verifier")
        if self.sampling.n < 2:
            raise ValueError(f"sampling.n must be >= 2 (got {self.sampling.n})")
        if self.rm_refresh is not None and not self.scorer("reward_model"):
            raise ValueError("rm_refresh needs a reward_model scorer to refresh")
        if self.curate.select != "none" and self.curate.budget is None:
            raise ValueError(f"curate.select {self.curate.select} needs a budget")
        return self

    def scorer(self, stage: str) -> StageSpec | None:
        """The first scorer of this stage (``reward_model``, ``verify``, ...), if any."""
        return next((s for s in self.scorers if s.stage == stage), None)

    def round_seed(self, k: int) -> int:
        """Round ``k``'s seed for everything random in it (sampling, selection, training): distinct
        per round and per run seed (rounds stay below 1000)."""
        return self.seed * 1000 + k


def load_flywheel_config(path: str | Path, overrides: dict | None = None) -> FlywheelConfig:
    """Read and validate (``${VAR}`` expanded); errors name the file and the key, as every config's do.
    ``runner`` may name a file holding a ``runner:`` section (configs/dataflow.yaml)."""
    def runner_file(data: dict[str, Any], source: str) -> dict[str, Any]:
        if isinstance(data.get("runner"), (str, Path)):
            section = expand_env(read_yaml(Path(data["runner"])), str(data["runner"]))
            if not isinstance(section, dict) or "runner" not in section:
                raise UserError(f"{data['runner']}: no runner section to use for {source}")
            data["runner"] = section["runner"]
        return data

    return load_yaml(path, FlywheelConfig, overrides, prepare=runner_file)
