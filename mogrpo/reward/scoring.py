"""Scoring completions on every reward column: the reward sources (reward/sources.py: the
multi-aspect reward model, Hugging Face reward models, Python functions) plus optional extra
columns.

Result: rewards [B, G, K] where K = every source's columns in order, then the extra columns
named in the config. A reward function returns None (or NaN) where it does not apply; that
becomes NaN (masked downstream).
`not_applicable` blanks aspects by prompt kind (by default actionability on harmful
prompts, where fulfilling the request is exactly what safety forbids).
"""

from __future__ import annotations

import torch

from mogrpo.reward.objective import (  # noqa: F401 (the defaults, by their old address)
    DEFAULT_NOT_APPLICABLE,
    DEFAULT_WEIGHTS,
    mask_not_applicable,
)
from mogrpo.reward.sources import MultiAspectSource, RewardFn, check_columns, plain_reward


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
    """Rewards [B, G, K] of completions: every reward source's columns side by side
    (reward/sources.py: the multi-aspect reward model, Hugging Face reward models, Python
    functions), then the extra columns; `repetition_penalty` scales the 'meaningfulness'
    column by (1 - penalty * repeated-trigram share) when there is one (0 = off).
    `sources`: a list of sources, or one multi-aspect reward model (the default objective)."""

    def __init__(self, sources, extra: dict[str, RewardFn] | None = None,
                 not_applicable: dict[str, list[str]] | None = None, batch_size: int = 64,
                 repetition_penalty: float = 0.0):
        if not isinstance(sources, (list, tuple)):
            sources = [MultiAspectSource(sources, batch_size)]
        self.sources = list(sources) + [plain_reward(name, fn)
                                        for name, fn in (extra or {}).items()]
        # the multi-aspect reward model, when there is one (the evaluations' 'training_rm')
        self.rm = next((s.rm for s in self.sources if isinstance(s, MultiAspectSource)), None)
        self.repetition_penalty = repetition_penalty
        self.columns = check_columns(self.sources)
        self.not_applicable = not_applicable or {}
        unknown = sorted({a for v in self.not_applicable.values() for a in v} - set(self.columns))
        if unknown:
            raise ValueError(f"not_applicable names {unknown}, which are not reward columns "
                             f"{self.columns}")
        self.batch_size = batch_size

    @torch.no_grad()
    def score_flat(self, prompts: list[str], completions: list[str], *, chats: list | None = None,
                   columns: dict[str, list] | None = None, penalise: bool = True) -> torch.Tensor:
        """Rewards [N, K] of N (prompt, completion) pairs, unmasked. `chats` [N]: each pair's
        prompt as asked (a string or a conversation), for chat-template reward models and
        Python functions; `columns`: the prompts' other columns, one list [N] per name."""
        if not self.sources:
            raise ValueError("no reward to score with: give a reward model or function "
                             "(rewards:, reward_model=, or reward_funcs=)")
        cols = []
        for src in self.sources:
            out = src(prompts, completions, chats=chats, columns=columns or {})
            if out.shape != (len(completions), len(src.columns)):
                raise ValueError(f"reward {src.columns} gave shape {tuple(out.shape)} for "
                                 f"{len(completions)} completions")
            cols.append(out.float())
        rewards = torch.cat(cols, dim=1)  # [N, K]
        if penalise and self.repetition_penalty and "meaningfulness" in self.columns:
            j = self.columns.index("meaningfulness")
            rewards[:, j] = penalise_repetition(rewards[:, j], completions,
                                                self.repetition_penalty)
        return rewards

    def score_records(self, records, completions: list[str]) -> torch.Tensor:
        """[M, K] for evaluation rows: `records` [M] (PromptRecords), `completions` [M]; no
        repetition penalty (evaluations report the sources' own scores)."""
        return self.score_flat([r.judged_request for r in records], completions,
                               chats=[r.chat for r in records], columns=record_columns(records),
                               penalise=False)

    def score(self, prompts: list[str], kinds: list[str], completions: list[str], group_size: int,
              *, chats: list | None = None, columns: dict[str, list] | None = None
              ) -> torch.Tensor:
        """Rewards [B, G, K] for B prompts (with kinds) and B*G completions; `chats` [B] and
        `columns` ({name: [B]}) as in `score_flat`, per prompt."""
        B, G = len(prompts), group_size
        if len(completions) != B * G:
            raise ValueError(f"{len(completions)} completions for {B} prompts x G={G}")

        def flat(xs):
            return [x for x in xs for _ in range(G)]  # [B] -> [N]

        cols = {"kind": kinds, **(columns or {})}
        rewards = self.score_flat(flat(prompts), completions,
                                  chats=flat(chats) if chats is not None else None,
                                  columns={k: flat(v) for k, v in cols.items()})
        rewards = rewards.reshape(B, G, len(self.columns))
        return mask_not_applicable(rewards, kinds, self.columns, self.not_applicable)


def record_columns(records) -> dict[str, list]:
    """The columns Python reward functions receive for prompt records: `kind` and every other
    column of the rows (None where a row lacks it)."""
    names = sorted({k for r in records for k in r.columns} - {"prompts", "completions"})
    return {"kind": [r.kind for r in records],
            **{k: [r.columns.get(k) for r in records] for k in names}}
