"""The reward objective: the reward columns, their weights, the columns that do not apply to a
prompt kind, and how the columns combine into one score.

One `RewardObjective` is built per run from the columns the scorer produces and the config's
`weights` / `not_applicable`, and every place that turns rewards into a number goes through
it: the trainers' advantages, PPO's scalar reward, DPO's chosen/rejected choice, the logged
reward means, the evaluator's "combined" score and the sweep. The math itself is the pure
functions below (hand-tested in tests/test_advantages.py and tests/test_objective.py).

Shapes: rewards [..., K] (K columns, NaN = not applicable); kinds align with dim 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MODES = ("sum_then_normalize", "normalize_then_sum", "min", "lagrangian")  # advantage modes


def weighted_sum(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k r_k over present aspects, weights renormalised to the present ones' total.

    rewards [..., K] (NaN = n/a), weights [K] -> [...]; NaN where no weighted aspect is present.
    With all aspects present this is the plain weighted sum.
    """
    present = ~torch.isnan(rewards)
    w = weights.to(rewards.dtype).expand_as(rewards) * present
    total = weights.to(rewards.dtype).sum()
    got = w.sum(-1)
    s = (torch.nan_to_num(rewards) * w).sum(-1) * (total / got.clamp(min=1e-12))
    return torch.where(got > 0, s, torch.full_like(s, float("nan")))


def combine(rewards: torch.Tensor, weights: torch.Tensor, mode: str,
            multipliers: torch.Tensor | None = None, constrained: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The scalar reward of each sample before normalisation: [B, G, K] -> [B, G], by the
    advantage mode (mogrpo/rl/advantages.py: the paper's weighted sum, min = Chebyshev, the
    lagrangian's multiplier-weighted constraints). For `normalize_then_sum` this is the plain
    weighted sum (reported, not used for A)."""
    if mode in ("sum_then_normalize", "normalize_then_sum"):
        return weighted_sum(rewards, weights)
    if mode == "min":
        scaled = rewards * weights.to(rewards.dtype)
        scaled = torch.where(torch.isnan(scaled), torch.full_like(scaled, float("inf")), scaled)
        m = scaled.min(-1).values
        return torch.where(torch.isinf(m), torch.full_like(m, float("nan")), m)
    if mode == "lagrangian":
        if multipliers is None or constrained is None:
            raise ValueError("lagrangian mode needs multipliers [K] and a constrained mask [K]")
        lam = torch.where(constrained, multipliers, torch.zeros_like(multipliers)).to(rewards.dtype)
        w = torch.where(constrained, torch.zeros_like(weights), weights).to(rewards.dtype)
        objective = weighted_sum(rewards, w) if w.sum() > 0 else torch.zeros(rewards.shape[:-1])
        penalty = (torch.nan_to_num(rewards) * lam).sum(-1)
        return (torch.nan_to_num(objective) + penalty) / (1.0 + lam.sum())
    raise ValueError(f"unknown advantage mode {mode!r}; choose one of {MODES}")


def mask_not_applicable(rewards: torch.Tensor, kinds: list[str], columns: list[str],
                        not_applicable: dict[str, list[str]]) -> torch.Tensor:
    """Set the columns that do not apply to a row's prompt kind to NaN, in place, and return
    `rewards` [R, ..., K] (kinds [R]). Names not among `columns` are skipped (an evaluator
    reward model may have other aspects)."""
    for kind, aspects in not_applicable.items():
        rows = torch.tensor([k == kind for k in kinds])
        for a in aspects:
            if a in columns:
                rewards[rows, ..., columns.index(a)] = math.nan
    return rewards


@dataclass(frozen=True)
class RewardObjective:
    """columns [K], weights (missing columns weigh 0), not_applicable (prompt kind -> columns
    masked to NaN for it). Build with `RewardObjective.build`, which checks the names."""

    columns: tuple[str, ...]
    weights: dict[str, float]
    not_applicable: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, columns, weights: dict[str, float],
              not_applicable: dict[str, list[str]] | None = None,
              *, training: bool = True) -> RewardObjective:
        """Check the names against `columns` and build. `training`: the weights must name only
        existing columns and give at least one a positive weight (an evaluation may weigh a
        reward model that lacks some of them)."""
        columns = tuple(columns)
        not_applicable = {k: tuple(v) for k, v in (not_applicable or {}).items()}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0, got {weights}")
        unknown = sorted({a for v in not_applicable.values() for a in v} - set(columns))
        if unknown and training:
            raise ValueError(f"not_applicable names {unknown}, which are not reward columns "
                             f"{list(columns)}")
        if training:
            unknown = sorted(set(weights) - set(columns))
            if unknown:
                raise ValueError(f"weights name {unknown}, which the reward model and extra "
                                 f"rewards do not "
                                 f"produce; available columns: {list(columns)}")
            if not any(weights.get(c, 0) > 0 for c in columns):
                raise ValueError(f"every weight is 0; give at least one of {list(columns)} a "
                                 f"positive weight")
        return cls(columns, dict(weights), not_applicable)

    def for_columns(self, columns) -> RewardObjective:
        """The same weights and masks over another column set (e.g. an evaluator reward model's
        aspects); no check that a weight is positive."""
        return RewardObjective(tuple(columns), self.weights, self.not_applicable)

    @property
    def weight_vector(self) -> torch.Tensor:
        """[K] float32, in column order."""
        return torch.tensor([self.weights.get(c, 0.0) for c in self.columns])

    @property
    def weighs_any(self) -> bool:
        return any(self.weights.get(c, 0.0) > 0 for c in self.columns)

    def mask(self, rewards: torch.Tensor, kinds: list[str]) -> torch.Tensor:
        """Not-applicable columns of each row's kind set to NaN (in place; returned)."""
        return mask_not_applicable(rewards, kinds, list(self.columns),
                                   {k: list(v) for k, v in self.not_applicable.items()})

    def combine(self, rewards: torch.Tensor) -> torch.Tensor:
        """The weighted sum [...] of rewards [..., K] over the present columns (weighted_sum)."""
        return weighted_sum(rewards, self.weight_vector)

    def combine_by_mode(self, rewards: torch.Tensor, mode: str,
                        multipliers: torch.Tensor | None = None,
                        constrained: torch.Tensor | None = None) -> torch.Tensor:
        """[B, G, K] -> [B, G]: the scalar an advantage mode normalises (`combine`)."""
        return combine(rewards.float(), self.weight_vector.float(), mode, multipliers, constrained)

    def record(self, rewards: torch.Tensor) -> dict:
        """Per-column mean/std over the present (non-NaN) entries of rewards [..., K], and the
        mean combined reward: what every step logs (pure)."""
        flat = rewards.reshape(-1, rewards.shape[-1])
        rec = {}
        for j, c in enumerate(self.columns):
            col = flat[:, j][~torch.isnan(flat[:, j])]
            rec[f"reward/{c}/mean"] = float(col.mean()) if col.numel() else None
            rec[f"reward/{c}/std"] = float(col.std(unbiased=False)) if col.numel() else None
        rec["reward/combined/mean"] = float(torch.nanmean(self.combine(flat)))
        return rec
