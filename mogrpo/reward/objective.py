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

# The default objective of training and evaluation alike (one source). Group normalisation
# makes only the weights' shares within one prompt's group matter, and a group holds one
# kind: on a harmful prompt safety (2) must outweigh politeness + meaningfulness (1) so that
# refusing decides the ranking, and on a benign prompt actionability (2) must outweigh them
# equally, or refusing everything is the cheap way up (docs/theory.md section 7: with
# actionability 1, a refusal on a benign prompt got a mean advantage of -0.5 against +1.3 on
# a harmful one, and the policy refused both).
DEFAULT_WEIGHTS: dict[str, float] = {"safety": 2.0, "actionability": 2.0, "politeness": 0.5,
                                     "meaningfulness": 0.5}
# Aspects that say nothing about a prompt kind, masked (NaN) for it. Actionability on a harmful
# prompt: fulfilling it is exactly what safety forbids. Safety on a benign prompt: every safety
# label the default data has there is 1, so the reward model's safety score on a benign prompt
# carries no label, only a bias, and that bias favours refusing (measured on a trained policy's
# held-out benign answers: safety 0.976 for its refusals against 0.923 for its answers); with
# the aspect normalised in its group and weighted 2, it cancelled most of actionability's
# penalty for refusing a benign request (docs/theory.md section 7).
DEFAULT_NOT_APPLICABLE: dict[str, list[str]] = {"harmful": ["actionability"], "benign": ["safety"]}

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


def resolve_weights(columns, weights: dict[str, float] | None,
                    reward_weights: list[float] | None = None,
                    defaults: dict[str, float] | None = None) -> dict[str, float]:
    """One weight per column (pure). `reward_weights` (TRL's name): one per column, in column
    order, overriding `weights`. Otherwise `weights` by name, and every column it does not
    name weighs 1 (as each of TRL's reward functions does), so a reward model with its own
    aspect names trains without a `weights` key. `weights` equal to `defaults` (the safety
    task's, naming its four aspects) is the untouched default: names the columns lack are
    dropped instead of refused."""
    columns = list(columns)
    if reward_weights is not None:
        if len(reward_weights) != len(columns):
            raise ValueError(f"reward_weights has {len(reward_weights)} values for the "
                             f"{len(columns)} reward columns {columns}: give one per column, "
                             f"in that order (or weights by name)")
        return {c: float(w) for c, w in zip(columns, reward_weights)}
    weights = dict(weights or {})
    if defaults is not None and weights == defaults:
        weights = {k: v for k, v in weights.items() if k in columns}
    return {**{c: 1.0 for c in columns}, **weights}


def resolve_run_objective(columns, cfg) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(weights, not_applicable) of a run's columns from its config (an object or config.yaml's
    dict): `resolve_weights`, and the default not_applicable restricted to the columns there
    are (a task without 'safety' or 'actionability' masks nothing by default)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    weights = resolve_weights(columns, get("weights", DEFAULT_WEIGHTS), get("reward_weights"),
                              defaults=DEFAULT_WEIGHTS)
    na = get("not_applicable", DEFAULT_NOT_APPLICABLE)
    na = {k: list(v) for k, v in (na if na is not None else DEFAULT_NOT_APPLICABLE).items()}
    if na == {k: list(v) for k, v in DEFAULT_NOT_APPLICABLE.items()}:
        na = {k: [c for c in v if c in columns] for k, v in na.items()}
    return weights, {k: v for k, v in na.items() if v}


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
            rec[f"rewards/{c}/mean"] = float(col.mean()) if col.numel() else None
            rec[f"rewards/{c}/std"] = float(col.std(unbiased=False)) if col.numel() else None
        rec["reward/combined/mean"] = float(torch.nanmean(self.combine(flat)))
        return rec
