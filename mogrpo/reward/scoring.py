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

from mogrpo.reward.objective import mask_not_applicable
from mogrpo.tracking import DivergedError

RewardFn = Callable[[list[str], list[str]], list]

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

def repetition_share(text: str, n: int = 3) -> float:
    """Share of a text's word n-grams that repeat an earlier n-gram of the same text (pure),
    in [0, 1): 0 for text with no repeated n-gram, -> 1 for a loop. Lower-cased words,
    punctuation kept. "I can help you with that. I can help you with that." has 10 trigrams,
    5 of them repeats: 0.5. Texts with fewer than n words: 0."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def penalise_repetition(meaningfulness: torch.Tensor, completions: list[str],
                        strength: float) -> torch.Tensor:
    """meaningfulness [N] times (1 - strength * repetition_share) [N], floored at 0 (pure; NaN
    stays NaN). A refusal or an answer that loops ("I can help you with that. I can help you
    with that.") is not meaningful, whatever the reward model says of its first sentence."""
    rep = torch.tensor([repetition_share(c) for c in completions], dtype=meaningfulness.dtype)
    return meaningfulness * (1.0 - strength * rep).clamp(min=0.0)


class Scorer:
    """Rewards [B, G, K'] of completions: the reward model's aspects, then the extra columns;
    `repetition_penalty` scales the 'meaningfulness' column by (1 - penalty * repeated-trigram
    share) when the reward model has that aspect (0 = off)."""

    def __init__(self, reward_model, extra: dict[str, RewardFn] | None = None,
                 not_applicable: dict[str, list[str]] | None = None, batch_size: int = 64,
                 repetition_penalty: float = 0.0):
        self.rm = reward_model
        self.repetition_penalty = repetition_penalty
        self.extra = dict(extra or {})
        self.columns = list(reward_model.aspects) + list(self.extra)
        self.not_applicable = not_applicable or {}
        unknown = sorted({a for v in self.not_applicable.values() for a in v} - set(self.columns))
        if unknown:
            raise ValueError(f"not_applicable names {unknown}, which are not reward columns "
                             f"{self.columns}")
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: list[str], kinds: list[str], completions: list[str], group_size: int
              ) -> torch.Tensor:
        """Rewards [B, G, K'] for B prompts (with kinds) and B*G completions."""
        B, G = len(prompts), group_size
        if len(completions) != B * G:
            raise ValueError(f"{len(completions)} completions for {B} prompts x G={G}")
        flat_prompts = [p for p in prompts for _ in range(G)]  # [N]
        # [N, K]
        rm = self.rm.score(flat_prompts, completions, batch_size=self.batch_size).float().clone()
        if not bool(torch.isfinite(rm).all()):  # the model's NaN is not "not applicable"
            raise DivergedError(f"the reward model scored NaN or inf (aspects "
                                f"{list(self.rm.aspects)})")
        if self.repetition_penalty and "meaningfulness" in self.rm.aspects:
            j = list(self.rm.aspects).index("meaningfulness")
            rm[:, j] = penalise_repetition(rm[:, j], completions, self.repetition_penalty)
        cols = [rm]
        for name, fn in self.extra.items():
            values = fn(flat_prompts, completions)
            if len(values) != len(completions):
                raise ValueError(f"extra reward {name!r} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            col = torch.tensor([math.nan if v is None else float(v) for v in values])
            if bool(torch.isinf(col).any()):  # None / NaN = not applicable; inf is a broken reward
                raise DivergedError(f"extra reward {name!r} returned inf for completion "
                                    f"{int(torch.isinf(col).nonzero()[0])}")
            cols.append(col[:, None])
        rewards = torch.cat(cols, dim=1).reshape(B, G, len(self.columns))
        return mask_not_applicable(rewards, kinds, self.columns, self.not_applicable)
