"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740),
the fourth algorithm on the run engine; like GRPO it trains no critic.

    rollout (B prompts x G samples) -> score [B, G, K] -> combined reward per sample
    -> minus beta * KL(policy || reference) of the sample (in the reward, not the loss)
    -> advantage: the reward minus the mean reward of the group's other G-1 samples
    -> num_iterations clipped policy-gradient passes (with one pass: plain REINFORCE)

The baseline of each sample excludes the sample itself, so it is unbiased, and the
advantages are not divided by a group std (GRPO's difference). The aspects are combined
with the same renormalised weighted sum as GRPO's `sum_then_normalize`. Everything else
is the run engine's (mogrpo/rl/engine.py). Shapes: B prompts, G samples, N = B*G,
L tokens, K aspects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from mogrpo.config import field
from mogrpo.rl import trl_names
from mogrpo.rl.config import OnlineConfig, check_batch_splits
from mogrpo.rl.engine import Run
from mogrpo.rl.ppo import global_whiten
from mogrpo.runtime import all_sum


@dataclass
class RLOOConfig(OnlineConfig):
    """Config of `mogrpo train rloo` (YAML keys = field names; shared keys in PolicyRunConfig
    and OnlineConfig; TRL's RLOO names with their meaning, docs/trl.md)."""

    ALIASES: ClassVar[dict] = {**OnlineConfig.ALIASES, "rloo_k": "group_size"}
    REFUSED: ClassVar[dict] = {**OnlineConfig.REFUSED, **trl_names.REFUSED_RLOO}

    beta: float = field(0.04,
                        help="KL coefficient: beta * sum_t (log pi - log pi_ref) is taken off each "
                                   "sample's reward")
    micro_batch_size: int = field(4, help="sequences per forward/backward (gradient accumulation; "
                                          "exact)")
    normalize_advantages: bool = field(False, help="whiten the leave-one-out advantages over the "
                                                   "whole batch (every process's) to mean 0, std "
                                                   "1, as TRL's RLOO does with this name")

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size = {self.group_size}: a leave-one-out baseline needs G "
                             f">= 2 samples")
        self.check()
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages [B, G] of scores [B, G] (pure): score_i minus the mean of
    the other present scores of its group. A NaN score (nothing to score) gets 0 and is left
    out of its group's baselines; a group with fewer than two present scores gets 0."""
    present = ~torch.isnan(scores)
    s = torch.nan_to_num(scores)
    n = present.sum(-1, keepdim=True)  # [B, 1]
    others = (s.sum(-1, keepdim=True) - s) / (n - 1).clamp(min=1)
    adv = s - others
    return torch.where(present & (n >= 2), adv, torch.zeros_like(adv))


def train_rloo(cfg: RLOOConfig, output: str | os.PathLike, *, resume: bool = False,
               show_progress: bool = True, **objects) -> dict:
    """`objects` (reward_sources, files, callbacks) go to the run (rl/engine.Run), as the
    trainer API (mogrpo/trainers.py) passes them."""
    run = Run(cfg, output, name="rloo", resume=resume, show_progress=show_progress, **objects,
              check_world=check_batch_splits(cfg.batch_size, cfg.group_size))
    run.setup_optimizer(total_updates=cfg.steps * cfg.num_iterations)

    def step(t: int) -> dict:
        ro = run.rollout(t)
        rewards = run.score(ro)  # [B_local, G, K]
        ids, attn = ro.input_ids.to(run.device), ro.attention_mask.to(run.device)
        mask = ro.completion_mask.to(run.device).float()  # [N, L]
        L = mask.shape[1]
        with run.timer("policy_forward_backward"):
            old_logp = run.logprobs(run.policy, ids, attn, L, chunk=cfg.micro_batch_size)
        # [N]
        kl = ((old_logp - run.ref_logprobs(ids, attn, L,
                                           chunk=cfg.micro_batch_size)) * mask).sum(-1)
        # [B, G]
        score = run.objective.combine(rewards).to(run.device) - cfg.beta * kl.view_as(rewards[...,
                                                                                              0])
        adv = rloo_advantages(score).reshape(-1)  # [N]
        if cfg.normalize_advantages:  # over the global batch, as TRL's normalize_advantages
            adv = global_whiten(adv[:, None], torch.ones_like(adv[:, None]),
                                all_sum(run.acc)).squeeze(1)
        # which forced openers train (ro.loss_mask), as in GRPO
        credit = run.credit_openers(ro, adv)
        rec = run.policy_update(ro, adv, old_logp=old_logp, beta=0.0, aggregation="grpo",
                                micro_batch_size=cfg.micro_batch_size)
        rec.update(run.rollout_record(ro, rewards))
        rec.update(credit)
        sums = all_sum(run.acc)(torch.stack([kl.sum(), adv.abs().sum(), torch.tensor(float(len(kl)))
                                             .to(run.device)]).double())  # global: KL, |A|, samples
        rec.update({"kl": float(sums[0] / sums[2]), "advantage/abs_mean": float(sums[1] / sums[2])})
        run.log_samples(t + 1, ro, rewards)
        return rec

    return run.train(cfg.steps, step, postfix=("reward/combined/mean", "kl"))
