"""Multi-objective GRPO: one readable loop, no value critic.

    rollout (B prompts x G samples) -> score [B, G, K] -> advantages [B, G]
    -> num_iterations (mu) optimisation passes (clipped surrogate + beta * k3 KL to the reference)
    -> log -> checkpoint

The method is the paper's (arXiv 2503.21819): a multi-aspect reward model scores each
sample, the aspects are combined, and advantages are group-relative, so no critic is
trained. The paper does not publish its hyper-parameters; where it is silent we follow
DeepSeekMath's GRPO (arXiv 2402.03300): k3 KL estimator against a frozen reference,
beta = 0.04, clip 0.2, one optimisation pass per rollout (so behaviour log-probs equal
the current ones and come from the training forward itself), per-sequence mean loss.
Beyond the paper: the `normalize_then_sum`, `min` and `lagrangian` advantage modes
(docs/theory.md), DAPO's asymmetric clip and token-mean loss, Dr. GRPO's unscaled
advantages and constant normaliser.

Everything around the idea (models, rollouts, optimiser, checkpoints, resume, evaluation,
logging, multi-process) is the run engine's (mogrpo/rl/engine.py). Under `accelerate
launch` each process samples whole groups, so group statistics are local and exact.
Shapes: B prompts, G samples, N = B*G, L tokens, K aspects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from mogrpo.config import ConfigError, field
from mogrpo.rl import trl_names
from mogrpo.rl.advantages import (
    MODES,
    SCALES,
    group_advantages,
    guided_diagnostics,
    update_multipliers,
)
from mogrpo.rl.config import OnlineConfig, check_batch_splits
from mogrpo.rl.engine import Run
from mogrpo.rl.losses import AGGREGATIONS


@dataclass
class GRPOConfig(OnlineConfig):
    """Config of `mogrpo train grpo` (YAML keys = field names; shared keys in PolicyRunConfig
    and OnlineConfig; TRL's names with TRL's meaning, docs/trl.md)."""

    ALIASES: ClassVar[dict] = {**OnlineConfig.ALIASES, "loss_type": "loss_aggregation",
                               "multi_objective_aggregation": "advantage_mode"}
    REFUSED: ClassVar[dict] = {**OnlineConfig.REFUSED, **trl_names.REFUSED_GRPO}

    advantage_mode: str = field("normalize_then_sum", help="normalize_then_sum (GDPO/MO-GRPO: "
                                "each aspect normalised in its group, then weighted; docs/theory.md"
                                " section 7) | sum_then_normalize (the paper) | min | lagrangian")
    scale_rewards: str = field("group", help="the std dividing the advantages: group (each "
                               "group's) | batch (the whole batch's, every process's) | none "
                               "(Dr. GRPO); true = group, false = none (also for the deprecated "
                               "scale_by_std)")
    adv_eps: float = field(1e-4,
                           help="epsilon in the std normalisation; groups with std <= eps get 0")
    std_floor: float = field(0.1, help="divide by max(group std, this) (reward units): differences "
                                       "smaller than the reward model's resolution are not scaled "
                                       "up to full pushes (docs/theory.md section 7); 0 = plain "
                                       "std")
    thresholds: dict[str, float] = field(default_factory=dict,
                                         help="lagrangian: constraint r_k >= tau_k")
    multiplier_init: float = field(1.0, help="lagrangian: initial multiplier per constraint")
    multiplier_lr: float = field(0.05, help="lagrangian: dual ascent step size")
    extra_rewards: list[str] = field(default_factory=list,
                                     help="extra reward columns: judge_politeness, concise")
    micro_batch_size: int = field(4, help="sequences per forward/backward (gradient accumulation; "
                                          "exact): smaller = less peak memory, the same update "
                                          "(benchmarks/RESULTS.md)")
    loss_aggregation: str = field("grpo", help="grpo | dapo | dr_grpo")

    @classmethod
    def translate_names(cls, data: dict) -> dict:
        """TRL's scale_rewards booleans and the deprecated scale_by_std as scale_rewards."""
        if "scale_by_std" in data:
            if "scale_rewards" in data:
                raise ConfigError("GRPOConfig: scale_by_std is the deprecated form of "
                                  "scale_rewards; give only scale_rewards")
            data["scale_rewards"] = data.pop("scale_by_std")
        if isinstance(data.get("scale_rewards"), bool):
            data["scale_rewards"] = "group" if data["scale_rewards"] else "none"
        return super().translate_names(data)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size (G) = {self.group_size}: GRPO needs G >= 2 samples per "
                             f"prompt "
                             "to compare them; set group_size=4 or more")
        self.check()
        self.one_of("advantage_mode", MODES)
        self.one_of("scale_rewards", SCALES, " (or true = group, false = none)")
        self.one_of("loss_aggregation", AGGREGATIONS)
        if self.advantage_mode == "lagrangian" and not self.thresholds:
            raise ValueError("advantage_mode=lagrangian needs thresholds, e.g. "
                             "thresholds={safety: 0.9}")
        if self.advantage_mode != "lagrangian" and self.thresholds:
            raise ValueError("thresholds only apply with advantage_mode=lagrangian")
        if not self.std_floor >= 0:
            raise ValueError(f"std_floor = {self.std_floor} must be >= 0 (reward units, e.g. 0.1)")
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")

    def check_columns(self, columns: list[str]) -> None:
        """Fail early when thresholds name a reward column that does not exist."""
        unknown = sorted(set(self.thresholds) - set(columns))
        if unknown:
            raise ValueError(f"thresholds name {unknown}, which the reward model and extra "
                             f"rewards do "
                             f"not produce; available columns: {columns}")


def train_grpo(cfg: GRPOConfig, output: str | os.PathLike, *, resume: bool = False,
               show_progress: bool = True, **objects) -> dict:
    """`objects` (reward_sources, files, callbacks) go to the run (rl/engine.Run), as the
    trainer API (mogrpo/trainers.py) passes them."""
    from mogrpo.reward.sources import extra_reward

    run = Run(cfg, output, name="grpo", resume=resume, show_progress=show_progress, **objects,
              check_world=check_batch_splits(cfg.batch_size, cfg.group_size),
              extra_rewards={name: extra_reward(name, cfg.cache_dir) for name in cfg.extra_rewards},
              need_reference=cfg.beta != 0)
    cols = run.scorer.columns
    cfg.check_columns(cols)
    constrained = torch.tensor([c in cfg.thresholds for c in cols])  # [K]: lagrangian constraints
    thresholds = torch.tensor([cfg.thresholds.get(c, 0.0) for c in cols])
    lag = {"multipliers": torch.where(constrained, torch.full_like(thresholds, cfg.multiplier_init),
                                      torch.zeros_like(thresholds))}
    run.setup_optimizer(total_updates=cfg.steps * cfg.num_iterations)
    # normalize_then_sum normalises over the global batch: every process's groups, in order
    gather = None if run.world == 1 else (lambda x: run.acc.gather(x.to(run.device)).cpu())

    def step(t: int) -> dict:
        ro = run.rollout(t)  # this process's B_local prompts x G samples
        rewards = run.score(ro)  # [B_local, G, K]
        adv, adv_stats = group_advantages(rewards, run.objective.weight_vector, cfg.advantage_mode,
                                          scale_rewards=cfg.scale_rewards, eps=cfg.adv_eps,
                                          std_floor=cfg.std_floor,
                                          gather=gather, multipliers=lag["multipliers"],
                                          constrained=constrained)
        credit = run.credit_openers(ro, adv)  # which forced openers train (ro.loss_mask)
        ref_logp = None
        if cfg.beta != 0:  # [N, L], once per rollout
            ref_logp = run.ref_logprobs(ro.input_ids.to(run.device),
                                        ro.attention_mask.to(run.device),
                                        ro.completion_mask.shape[1], chunk=cfg.micro_batch_size)
        rec = run.policy_update(ro, adv.reshape(-1).to(run.device), ref_logp=ref_logp,
                                beta=cfg.beta,
                                aggregation=cfg.loss_aggregation,
                                micro_batch_size=cfg.micro_batch_size)
        if cfg.advantage_mode == "lagrangian":  # dual ascent on the whole batch's rewards [B, G, K]
            lag["multipliers"] = update_multipliers(lag["multipliers"],
                                                    run.acc.gather(rewards.to(run.device)).cpu(),
                                                    thresholds, constrained, cfg.multiplier_lr)
        rec.update(run.rollout_record(ro, rewards))
        rec.update(credit)
        rec.update({k: v for k, v in adv_stats.items() if not k.startswith("combined")})
        # where the push goes: the refusal decision vs the own samples' spread
        if ro.guided is not None:
            combined = run.objective.combine_by_mode(rewards, cfg.advantage_mode,
                                                     lag["multipliers"], constrained)
            rec.update(guided_diagnostics(combined, adv, ro.guided.reshape(adv.shape), ro.kinds))
        rec.update({f"multiplier/{c}": float(lag["multipliers"][j]) for j,
                    c in enumerate(cols) if constrained[j]})
        run.log_samples(t + 1, ro, rewards)
        return rec

    return run.train(cfg.steps, step, state=lambda: dict(lag), load_state=lag.update,
                     postfix=("reward/combined/mean", "kl"))
