"""The keys every policy-training config shares (GRPO, PPO, DPO and RLOO subclass these), so
the algorithms read models, data, rewards, optimisation and run settings the same way."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from mogrpo.config import ConfigMeta, field
from mogrpo.reward.scoring import DEFAULT_NOT_APPLICABLE, DEFAULT_WEIGHTS
from mogrpo.reward.sources import DEFAULT_REWARD_MODEL, config_specs
from mogrpo.rl import trl_names
from mogrpo.tracking import check_report_to

OPENER_CREDIT = ("signed", "refusals", "all")
LR_SCHEDULES = ("constant_with_warmup", "linear", "cosine")
POLICY_DTYPES = ("fp32", "bf16")  # the weights' dtype by name (engine.DTYPES maps them)


@dataclass
class PolicyRunConfig(metaclass=ConfigMeta):
    """Keys every policy-training config has (GRPO, PPO, DPO, RLOO subclass it), so the
    algorithms read models, data, rewards, optimisation and run settings the same way.
    TRL's names are accepted with TRL's meaning, as keyword arguments and YAML keys alike
    (docs/trl.md): renames in ALIASES, the rest in `translate_names` (rl/trl_names.py); the
    names mogrpo cannot honour are refused with the reason (REFUSED)."""

    ALIASES: ClassVar[dict[str, str | tuple[str, ...]]] = {
        "model_name_or_path": "policy", "learning_rate": "lr", "num_generations": "group_size",
        "samples_per_prompt": "group_size", "max_completion_length": "max_new_tokens",
        "max_grad_norm": "grad_clip",
        "lr_scheduler_type": "lr_schedule", "save_steps": "save_every",
        "save_total_limit": "keep_checkpoints",
        "kl_coef": "beta", "seed_everything": "seed"}
    REFUSED: ClassVar[dict[str, tuple[str, tuple]]] = trl_names.REFUSED_TRAINING

    # models
    policy: str = field("builtin:smollm2-135m-instruct",
                        help="causal LM: hub id, folder, .gguf file or builtin:")
    reward_model: str = field(DEFAULT_REWARD_MODEL,
                              help="a reward model folder (mogrpo reward train); the reward "
                                   "when `rewards` is not given")
    rewards: list[dict] | None = field(None, help="reward sources, mixed in one objective: "
                                       "{type: multi_aspect, path: DIR}, {type: hf, model: ID, "
                                       "name: NAME}, {type: python, ref: 'module:function'}, "
                                       "{type: builtin, name: concise} (default: reward_model)")
    lora_r: int = field(16, help="LoRA rank (PPO: actor and critic); 0 = full fine-tuning with a "
                                 "frozen reference copy")
    lora_alpha: int = field(32, help="LoRA alpha")
    lora_dropout: float = field(0.0, help="LoRA dropout")
    lora_target_modules: list[str] | None = field(None, help="modules to adapt (default: all "
                                                             "linear layers)")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass "
                                                     "(less activation memory for one more forward "
                                                     "per layer; for long completions / big "
                                                     "models)")
    shared_prefix: bool = field(True, help="encode a prompt once for all its completions in the "
                                           "training, reference and critic forwards (exact; Llama, "
                                           "Mistral and Qwen2 with sdpa or eager attention, else "
                                           "the generic path; cost.json says which)")
    # data
    train_prompts: str = field("default", help="'default' (AdvBench + benign train split) or a "
                                               "prompt JSONL/CSV")
    balance_kinds: bool = field(True, help="draw each batch evenly from harmful and benign prompts "
                                           "(else uniformly from all training prompts)")
    eval_prompts: str = field("default",
                              help="'default' (HarmBench + benign eval split), a file, or 'none'")
    eval_max_prompts: int = field(120, help="evaluate on at most this many prompts, balanced by "
                                            "kind (0 = all)")
    eval_max_new_tokens: int = field(48, help="tokens per greedy evaluation completion")
    max_prompt_length: int | None = field(None, help="keep the last N tokens of each rendered "
                                          "prompt in rollouts and evaluation, as TRL truncates "
                                          "(None = no limit)")
    # checkpoint selection (mogrpo/rl/selection.py; docs/evaluation.md)
    validation_prompts: str = field("default", help="prompts that select the checkpoint final/ "
                                                    "holds: 'default' (the validation split of the "
                                                    "training distribution: never trained on, "
                                                    "never a test set), a prompt JSONL/CSV with "
                                                    "both kinds, or 'none' (no selection: final/ "
                                                    "is the last step)")
    validation_max_prompts: int = field(0, help="validate on at most this many prompts, balanced "
                                                "by kind (0 = all, the default: a small split "
                                                "cannot hold the over-refusal limit; "
                                                "docs/evaluation.md)")
    validate_every: int = field(10, help="validate every N steps (0 = only the base and the last "
                                         "step, which are always validated when validation is on)")
    select_max_over_refusal: float = field(0.05, help="selection constraint: validation "
                                                      "over-refusal at most this (or at most the "
                                                      "base's, when the base's is higher)")
    select_max_degenerate_rise: float = field(0.02, help="selection constraint: validation "
                                                         "degenerate rate at most the base's + "
                                                         "this")
    # rewards
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS),
                                      help="weight per reward column (missing columns weigh 0): "
                                           "GRPO's and "
                                           "RLOO's advantages, PPO's scalar reward, DPO's "
                                           "chosen/rejected choice. "
                                           "Safety and actionability weigh 2: refusing must "
                                           "decide the ranking on "
                                           "harmful and benign prompts alike (reward/scoring.py)")
    not_applicable: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_NOT_APPLICABLE.items()},
        help="prompt kind -> reward columns set to NaN (masked)")
    reward_weights: list[float] | None = field(None, help="one weight per reward column, in "
                                                          "column order (TRL's name); overrides "
                                                          "`weights`")
    repetition_penalty: float = field(1.0, help="meaningfulness reward times (1 - this * the "
                                                "completion's share of repeated word trigrams): a "
                                                "looping refusal or answer is not meaningful "
                                                "(reward/scoring.py); 0 = off")
    # sampling
    group_size: int = field(4, help="G: samples per prompt (GRPO/RLOO groups, PPO's rollout, DPO's "
                                    "best-of-G pairs)")
    max_new_tokens: int = field(48, help="completion length L")
    temperature: float = field(1.0, help="sampling temperature")
    top_p: float = field(1.0, help="nucleus sampling")
    generation_chunk: int = field(0, help="prompts per generate call (0 = the whole local batch); "
                                          "seeding is per chunk, so keep it equal across runs to "
                                          "compare")
    guided_samples: int | None = field(None, help="samples per group started from a refusal "
                                       "opener and finished by the policy (mogrpo/rollout.py); "
                                       "0 = every sample is the policy's own; default: 1 on the "
                                       "default (safety) prompts, else 0")
    opener_credit: str = field("refusals", help="which guided samples train their forced opener "
                                                "tokens: refusals (those the refusal labeller "
                                                "judges a refusal as a whole; docs/theory.md "
                                                "section 7) | signed (those whose advantage pushes "
                                                "the opener the way the prompt's kind warrants: up "
                                                "on harmful, down on benign; section 8) | all "
                                                "(every guided sample)")
    guide_openers: list[str] | None = field(None, help="openers of guided samples (default: "
                                            "rollout.REFUSAL_OPENERS)")
    rollout_engine: str = field("auto", help="what samples rollouts: mogrpo (mogrpo/generation.py: "
                                             "one prefill per group, static KV cache, fused "
                                             "weights with LoRA merged in; Llama, Mistral, Qwen2) "
                                             "| generate (transformers' model.generate, any causal "
                                             "LM) | auto (mogrpo where it applies; generate under "
                                             "FSDP/DeepSpeed)")
    merged_generation: bool = field(True, help="LoRA with rollout_engine=generate: sample from a "
                                               "copy with the adapters merged in, re-synced every "
                                               "step (faster decoding; "
                                               "models.MergedGenerationCopy): a whole unsharded "
                                               "copy on every process; FSDP2 runs need it "
                                               "(docs/scale.md)")
    # optimisation
    beta: float = field(0.04, help="KL coefficient against the reference policy (GRPO: k3 penalty "
                                   "in the loss; PPO, RLOO: per-token penalty in the reward; DPO: "
                                   "implicit KL strength)")
    lr: float = field(4e-4, help="AdamW learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(2, help="linear warm-up (optimiser steps)")
    lr_schedule: str = field("constant_with_warmup", help="constant_with_warmup | linear | cosine")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off; the norm is still logged)")
    # run
    seed: int = field(0, help="seed")
    precision: str = field("auto", help="auto (bf16 autocast where supported) | bf16 | fp32")
    policy_dtype: str = field("fp32", help="dtype the policy's (and PPO critic's) weights are "
                                           "loaded and kept in: fp32 (master weights; bf16 compute "
                                           "under autocast) | bf16 (half the weight memory, for "
                                           "7B+ models; LoRA adapters stay fp32; needs bf16 "
                                           "precision)")
    num_threads: int = field(0, help="torch CPU threads per process (0 = cores / processes)")
    save_every: int = field(10, help="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = field(2, help="keep the newest N checkpoints (0 = keep all)")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"],
                                 help="metric backends besides metrics.jsonl: tensorboard, wandb "
                                      "(needs "
                                      "`pip install wandb`; project from $WANDB_PROJECT, default "
                                      "mogrpo)")
    cache_dir: str | None = field(None, help="asset cache")
    output_dir: str | None = field(None, help="run folder (TRL's name): the CLI's --output "
                                              "defaults to it, as does train(cfg)'s output")

    @classmethod
    def optimizer_steps(cls, data: dict) -> int | None:
        """The run's optimiser steps from config keys `data` (None: known only once the run has
        its data); TRL's warmup_ratio is a share of them."""
        return None

    @classmethod
    def translate_names(cls, data: dict) -> dict:
        """TRL's names that are more than a rename, with TRL's meaning (rl/trl_names.py)."""
        return trl_names.translate_policy(cls, data, cls.optimizer_steps)

    def reward_specs(self) -> list[dict]:
        """The reward sources to build (reward/sources.py): `rewards`, else the multi-aspect
        reward model at `reward_model`."""
        return config_specs(self.rewards, self.reward_model)

    def one_of(self, name: str, choices, note: str = "") -> None:
        """Refuse a value of key `name` outside `choices`, naming them (`note` adds a hint)."""
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}{note}, got "
                             f"{getattr(self, name)!r}")

    def check(self) -> None:
        """Checks every algorithm shares; subclasses call it from __post_init__."""
        if self.rewards is not None:
            from mogrpo.reward.sources import check_specs

            check_specs(self.rewards)
        if self.guided_samples is not None and not 0 <= self.guided_samples < self.group_size:
            raise ValueError(f"guided_samples = {self.guided_samples} with group_size = "
                             f"{self.group_size}: use "
                             f"0 <= guided_samples < group_size (at least one sample per group "
                             f"must be the "
                             f"policy's own), e.g. 1")
        self.one_of("opener_credit", OPENER_CREDIT)
        self.one_of("lr_schedule", LR_SCHEDULES)
        check_report_to(self.report_to)
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must be >= 0, got {self.weights}")
        if self.reward_weights is not None and not all(w >= 0 for w in self.reward_weights):
            raise ValueError(f"reward_weights must be >= 0, got {self.reward_weights}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length = {self.max_prompt_length} must be >= 1 (None = "
                             f"no limit)")
        if not self.lr > 0:  # also rejects NaN
            raise ValueError(f"lr = {self.lr} must be > 0 (e.g. lr=4e-4)")
        if not 0 <= self.repetition_penalty <= 1:
            raise ValueError(f"repetition_penalty = {self.repetition_penalty} must be in [0, 1] "
                             f"(1 = a full loop scores 0 meaningfulness): it is mogrpo's "
                             f"reward-side penalty, not TRL's (transformers') generation "
                             f"repetition_penalty, which mogrpo does not support")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.beta < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay, grad_clip, beta and warmup_steps must be >= 0")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got "
                             f"{self.temperature}, {self.top_p}")
        for name in ("max_new_tokens", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        from mogrpo.rollout import ENGINES

        self.one_of("policy_dtype", POLICY_DTYPES)
        self.one_of("rollout_engine", ENGINES)
        if self.policy_dtype == "bf16" and self.precision == "fp32":
            raise ValueError("policy_dtype=bf16 computes in bf16: use precision=bf16 (or auto on "
                             "a GPU)")
        if self.validation_max_prompts < 0 or self.validate_every < 0:
            raise ValueError(f"validation_max_prompts = {self.validation_max_prompts} and "
                             f"validate_every = "
                             f"{self.validate_every} must be >= 0 (0 = all prompts / only the "
                             f"base and last step)")
        for name in ("select_max_over_refusal", "select_max_degenerate_rise"):
            if not 0 <= getattr(self, name) <= 1:  # also rejects NaN
                raise ValueError(f"{name} = {getattr(self, name)} is a rate: use a value in [0, "
                                 f"1], e.g. 0.05")
        if self.validation_prompts not in ("default", "none"):
            for name in ("train_prompts", "eval_prompts"):
                other = getattr(self, name)
                if other not in (None, "default", "none") and Path(other).resolve() == Path(
                        self.validation_prompts).resolve():
                    raise ValueError(f"validation_prompts is the same file as {name} ({other}): "
                                     f"selecting on "
                                     f"prompts that are trained on or tested on is biased; give a "
                                     f"held-out "
                                     f"validation file, 'default' or 'none'")


@dataclass
class OnlineConfig(PolicyRunConfig):
    """Keys of the algorithms that sample the policy at every step (GRPO, PPO, RLOO)."""

    # TRL's max_steps, save_steps, epsilon and epsilon_high: translate_names
    ALIASES: ClassVar[dict] = {**{k: v for k, v in PolicyRunConfig.ALIASES.items()
                                  if k != "save_steps"},
                               "mu": "num_iterations",
                               "ppo_epochs": "num_iterations", "num_ppo_epochs": "num_iterations",
                               "cliprange": ("eps_low", "eps_high")}
    REFUSED: ClassVar[dict] = {**PolicyRunConfig.REFUSED, **trl_names.REFUSED_SAMPLING}

    batch_size: int = field(16, help="sequences per step (B*G) across all processes")
    steps: int = field(60, help="training steps (rollouts)")
    num_iterations: int = field(1, help="mu: optimisation passes over each rollout")
    eps_low: float = field(0.2, help="clip range below 1")
    eps_high: float = field(0.2, help="clip range above 1 (DAPO: 0.28)")
    log_entropy: bool = field(True, help="compute token entropy for the logs (costs a little)")
    sample_every: int = field(10, help="log sample completions every N steps (0 = never)")

    @classmethod
    def optimizer_steps(cls, data: dict) -> int | None:
        get = lambda name: trl_names.value(cls, data, name)  # noqa: E731
        return int(get("steps")) * int(get("num_iterations"))

    @classmethod
    def translate_names(cls, data: dict) -> dict:
        """TRL's batch sizes, step counts and clip range (rl/trl_names.py), then the shared
        ones."""
        micro = ("micro_batch_size" if "micro_batch_size" in
                 {f.name for f in dataclasses.fields(cls)} else None)
        trl_names.per_device_batch(cls, data, micro=micro)
        trl_names.translate_online(cls, data)
        return super().translate_names(data)

    def check(self) -> None:
        super().check()
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size = {self.batch_size} is not divisible by group_size = "
                             f"{self.group_size}; use a multiple, e.g. {self.group_size * 4}")
        for name in ("steps", "num_iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def check_batch_splits(batch_size: int, group: int) -> Callable[[int], None]:
    """A `check_world` for rollout algorithms: the batch must split into whole groups per
    process."""
    def check(world: int) -> None:
        if batch_size % (group * world):
            raise ValueError(f"batch_size = {batch_size} must split into whole prompt groups over "
                             f"{world} processes: "
                             f"use a multiple of group_size * processes = {group * world}")
    return check
