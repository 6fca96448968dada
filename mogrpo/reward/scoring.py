"""Scoring completions on every aspect: the reward model plus optional extra columns.

Result: rewards [B, G, K'] where K' = the reward model's K aspects followed by the extra
columns named in the config. An extra column is a plain callable
`(prompts, completions) -> list[float | None]`; None becomes NaN (masked downstream).
`not_applicable` blanks aspects by prompt kind (by default actionability on harmful
prompts, where fulfilling the request is exactly what safety forbids).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

RewardFn = Callable[[list[str], list[str]], list]

def _politeness_judge(cache=None) -> RewardFn:
    from mogrpo.reward.judges import ToxicityJudge

    judge = ToxicityJudge.from_cache(cache)
    return lambda prompts, completions: judge.politeness(completions).tolist()

def _length_ratio(prompts, completions):
    """1 - words / 200, floored at 0: a mild push towards concise answers."""
    return [max(0.0, 1.0 - len(c.split()) / 200.0) for c in completions]

def extra_reward(name: str, cache=None) -> RewardFn:
    """Built-in extra reward columns, by config name."""
    if name == "judge_politeness":
        return _politeness_judge(cache)
    if name == "concise":
        return _length_ratio
    raise ValueError(f"unknown extra reward {name!r}; built-ins: judge_politeness, concise "
                     "(or pass callables to Scorer directly)")

class Scorer:
    def __init__(self, reward_model, extra: dict[str, RewardFn] | None = None,
                 not_applicable: dict[str, list[str]] | None = None, batch_size: int = 64):
        self.rm = reward_model
        self.extra = dict(extra or {})
        self.columns = list(reward_model.aspects) + list(self.extra)
        self.not_applicable = not_applicable or {}
        unknown = sorted({a for v in self.not_applicable.values() for a in v} - set(self.columns))
        if unknown:
            raise ValueError(f"not_applicable names {unknown}, which are not reward columns {self.columns}")
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: list[str], kinds: list[str], completions: list[str], group_size: int
              ) -> torch.Tensor:
        """Rewards [B, G, K'] for B prompts (with kinds) and B*G completions."""
        B, G = len(prompts), group_size
        if len(completions) != B * G:
            raise ValueError(f"{len(completions)} completions for {B} prompts x G={G}")
        flat_prompts = [p for p in prompts for _ in range(G)]  # [N]
        cols = [self.rm.score(flat_prompts, completions, batch_size=self.batch_size).float()]  # [N, K]
        for name, fn in self.extra.items():
            values = fn(flat_prompts, completions)
            if len(values) != len(completions):
                raise ValueError(f"extra reward {name!r} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            cols.append(torch.tensor([math.nan if v is None else float(v) for v in values])[:, None])
        rewards = torch.cat(cols, dim=1).reshape(B, G, len(self.columns))
        for kind, aspects in self.not_applicable.items():
            rows = torch.tensor([k == kind for k in kinds])
            for a in aspects:
                rewards[rows, :, self.columns.index(a)] = math.nan
        return rewards


def weighted_sum(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k r_k over present aspects, weights renormalised to the present ones' total.

    rewards [..., K] (NaN = n/a), weights [K] -> [...]; NaN where no weighted aspect is present.
    With all aspects present this is the plain weighted sum scaled by 1 / sum(w) * sum(w) = itself.
    """
    present = ~torch.isnan(rewards)
    w = weights.to(rewards.dtype).expand_as(rewards) * present
    total = weights.to(rewards.dtype).sum()
    got = w.sum(-1)
    s = (torch.nan_to_num(rewards) * w).sum(-1) * (total / got.clamp(min=1e-12))
    return torch.where(got > 0, s, torch.full_like(s, float("nan")))
