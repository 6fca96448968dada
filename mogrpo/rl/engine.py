"""The run engine every training algorithm shares (GRPO, PPO, DPO, RLOO).

`Run` owns what is not an algorithm's idea: the accelerator and device placement, threads,
seeds, the reward model and its scorer, the policy (+ LoRA) and its reference, prompt
sampling, rollouts, reference log-probs, the optimiser and LR schedule, the checkpoint
format (weights, optimiser, scheduler, every RNG state, step, the algorithm's own state),
resume, evaluation before and after (the one evaluator, mogrpo/eval/harness.py), checkpoint
selection on the validation split (the same evaluator; the criterion, fixed in advance, is
mogrpo/rl/selection.py's: final/ is the selected step), metrics (JSONL always, TensorBoard,
Weights & Biases), progress, cost accounting and the files a finished run leaves. An
algorithm builds a `Run`, says how many steps it makes and what one step does
(`Run.train(steps, step_fn)`); its file then reads as its idea alone.

Multi-process (`accelerate launch`): each process samples its share of a step's prompts,
whole groups, so group statistics are local and exact; whatever an algorithm needs over the
global batch it reduces with `all_sum` / `acc.gather`. Shapes: B prompts, G samples per
prompt, N = B*G sequences, L completion tokens, K reward columns.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from mogrpo import packing
from mogrpo.config import atomic_folder, atomic_write_text, field, save_config, to_dict
from mogrpo.reward.scoring import DEFAULT_NOT_APPLICABLE, DEFAULT_WEIGHTS
from mogrpo.rl.selection import CRITERION
from mogrpo.runfolder import (CheckpointError, claim_output, first_line, load_newest, restore_rng, rng_state,
                              trim_jsonl)

OPENER_CREDIT = ("signed", "refusals", "all")
LR_SCHEDULES = ("constant_with_warmup", "linear", "cosine")
REPORT_TO = ("tensorboard", "wandb")
POLICY_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_DEEPSPEED_CHECKPOINTS = ("resumable checkpoints are not written under DeepSpeed: set save_every=0 (final/ is still "
                            "saved), or shard with FSDP (configs/accelerate/fsdp.yaml)")


@dataclass
class PolicyRunConfig:
    """Keys every policy-training config has (GRPO, PPO, DPO, RLOO subclass it), so the
    algorithms read models, data, rewards, optimisation and run settings the same way.
    TRL's names are accepted as aliases (ALIASES), e.g. learning_rate, num_generations."""

    ALIASES: ClassVar[dict[str, str | tuple[str, ...]]] = {
        "model_name_or_path": "policy", "learning_rate": "lr", "num_generations": "group_size",
        "samples_per_prompt": "group_size", "max_completion_length": "max_new_tokens", "max_grad_norm": "grad_clip",
        "lr_scheduler_type": "lr_schedule", "save_steps": "save_every", "save_total_limit": "keep_checkpoints",
        "kl_coef": "beta", "seed_everything": "seed"}

    # models
    policy: str = field("builtin:smollm2-135m-instruct", help="causal LM: hub id, folder, .gguf file or builtin:")
    reward_model: str = field("runs/reward-default/model", help="a reward model folder (mogrpo reward train)")
    lora_r: int = field(16, help="LoRA rank (PPO: actor and critic); 0 = full fine-tuning with a frozen "
                                 "reference copy")
    lora_alpha: int = field(32, help="LoRA alpha")
    lora_dropout: float = field(0.0, help="LoRA dropout")
    lora_target_modules: list[str] | None = field(None, help="modules to adapt (default: all linear layers)")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass (less memory, "
                                                     "about a third more compute; for long completions / big models)")
    shared_prefix: bool = field(True, help="encode a prompt once for all its completions in the training, "
                                           "reference and critic forwards (exact; Llama, Mistral and Qwen2 with "
                                           "sdpa or eager attention, else the generic path; cost.json says which)")
    # data
    train_prompts: str = field("default", help="'default' (AdvBench + benign train split) or a prompt JSONL/CSV")
    balance_kinds: bool = field(True, help="draw each batch evenly from harmful and benign prompts "
                                           "(else uniformly from all training prompts)")
    eval_prompts: str = field("default", help="'default' (HarmBench + benign eval split), a file, or 'none'")
    eval_max_prompts: int = field(120, help="evaluate on at most this many prompts, balanced by kind (0 = all)")
    eval_max_new_tokens: int = field(48, help="tokens per greedy evaluation completion")
    # checkpoint selection (mogrpo/rl/selection.py; docs/evaluation.md)
    validation_prompts: str = field("default", help="prompts that select the checkpoint final/ holds: 'default' "
                                                    "(the validation split of the training distribution: never "
                                                    "trained on, never a test set), a prompt JSONL/CSV with both "
                                                    "kinds, or 'none' (no selection: final/ is the last step)")
    validation_max_prompts: int = field(0, help="validate on at most this many prompts, balanced by kind (0 = "
                                                "all: 82 harmful + 111 benign by default, about 30 s on 2 cores; "
                                                "with 32 benign prompts a validation over-refusal of 0.03 was 0.09 "
                                                "on the test sets)")
    validate_every: int = field(10, help="validate every N steps (0 = only the base and the last step, which "
                                         "are always validated when validation is on)")
    select_max_over_refusal: float = field(0.05, help="selection constraint: validation over-refusal at most "
                                                      "this (or at most the base's, when the base's is higher)")
    select_max_degenerate_rise: float = field(0.02, help="selection constraint: validation degenerate rate at "
                                                         "most the base's + this")
    # rewards
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS),
                                      help="weight per reward column (missing columns weigh 0): GRPO's and "
                                           "RLOO's advantages, PPO's scalar reward, DPO's chosen/rejected choice. "
                                           "Safety and actionability weigh 2: refusing must decide the ranking on "
                                           "harmful and benign prompts alike (reward/scoring.py)")
    not_applicable: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_NOT_APPLICABLE.items()},
                                                 help="prompt kind -> reward columns set to NaN (masked)")
    repetition_penalty: float = field(1.0, help="meaningfulness reward times (1 - this * the completion's share of "
                                                "repeated word trigrams): a looping refusal or answer is not "
                                                "meaningful (reward/scoring.py); 0 = off")
    # sampling
    group_size: int = field(4, help="G: samples per prompt (GRPO/RLOO groups, PPO's rollout, DPO's "
                                    "best-of-G pairs)")
    max_new_tokens: int = field(48, help="completion length L")
    temperature: float = field(1.0, help="sampling temperature")
    top_p: float = field(1.0, help="nucleus sampling")
    generation_chunk: int = field(0, help="prompts per generate call (0 = the whole local batch); "
                                          "seeding is per chunk, so keep it equal across runs to compare")
    guided_samples: int = field(1, help="samples per group that start from a refusal opener and are "
                                        "finished by the policy (exploration the reward then judges; "
                                        "mogrpo/rollout.py); 0 = every sample is the policy's own")
    opener_credit: str = field("refusals", help="which guided samples train their forced opener tokens: refusals "
                                               "(those the refusal labeller judges a refusal as a whole; "
                                               "docs/theory.md section 7) | signed (those whose advantage pushes "
                                               "the opener the way the prompt's kind warrants: up on harmful, down "
                                               "on benign; section 8) | all (every guided sample)")
    guide_openers: list[str] | None = field(None, help="openers of guided samples (default: "
                                            "rollout.REFUSAL_OPENERS)")
    rollout_engine: str = field("auto", help="what samples rollouts: mogrpo (mogrpo/generation.py: one prefill "
                                             "per group, static KV cache, fused weights with LoRA merged in; "
                                             "Llama, Mistral, Qwen2) | generate (transformers' model.generate, "
                                             "any causal LM) | auto (mogrpo where it applies; generate under "
                                             "FSDP/DeepSpeed)")
    merged_generation: bool = field(True, help="LoRA with rollout_engine=generate: sample from a copy with the "
                                              "adapters merged in, re-synced every step (faster decoding; "
                                              "models.MergedGenerationCopy)")
    # optimisation
    beta: float = field(0.04, help="KL coefficient against the reference policy (GRPO: k3 penalty in the loss; "
                                   "PPO, RLOO: per-token penalty in the reward; DPO: implicit KL strength)")
    lr: float = field(4e-4, help="AdamW learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(2, help="linear warm-up (optimiser steps)")
    lr_schedule: str = field("constant_with_warmup", help="constant_with_warmup | linear | cosine")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off; the norm is still logged)")
    # run
    seed: int = field(0, help="seed")
    precision: str = field("auto", help="auto (bf16 autocast where supported) | bf16 | fp32")
    policy_dtype: str = field("fp32", help="dtype the policy's (and PPO critic's) weights are loaded and kept in: "
                                           "fp32 (master weights; bf16 compute under autocast) | bf16 (half the "
                                           "weight memory, for 7B+ models; LoRA adapters stay fp32; needs bf16 "
                                           "precision)")
    num_threads: int = field(0, help="torch CPU threads per process (0 = cores / processes)")
    save_every: int = field(10, help="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = field(2, help="keep the newest N checkpoints (0 = keep all)")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"],
                                 help="metric backends besides metrics.jsonl: tensorboard, wandb (needs "
                                      "`pip install wandb`; project from $WANDB_PROJECT, default mogrpo)")
    cache_dir: str | None = field(None, help="asset cache")

    def check(self) -> None:
        """Checks every algorithm shares; subclasses call it from __post_init__."""
        if not 0 <= self.guided_samples < self.group_size:
            raise ValueError(f"guided_samples = {self.guided_samples} with group_size = {self.group_size}: use "
                             f"0 <= guided_samples < group_size (at least one sample per group must be the "
                             f"policy's own), e.g. 1")
        if self.opener_credit not in OPENER_CREDIT:
            raise ValueError(f"opener_credit must be one of {OPENER_CREDIT}, got {self.opener_credit!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        bad = sorted(set(self.report_to) - set(REPORT_TO))
        if bad:
            raise ValueError(f"report_to names {bad}; choose from {list(REPORT_TO)} (metrics.jsonl is always written)")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must be >= 0, got {self.weights}")
        if not self.lr > 0:  # also rejects NaN
            raise ValueError(f"lr = {self.lr} must be > 0 (e.g. lr=4e-4)")
        if not 0 <= self.repetition_penalty <= 1:
            raise ValueError(f"repetition_penalty = {self.repetition_penalty} must be in [0, 1] (1 = a full loop "
                             f"scores 0 meaningfulness)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.beta < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay, grad_clip, beta and warmup_steps must be >= 0")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        for name in ("max_new_tokens", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.policy_dtype not in POLICY_DTYPES:
            raise ValueError(f"policy_dtype must be one of {sorted(POLICY_DTYPES)}, got {self.policy_dtype!r}")
        from mogrpo.rollout import ENGINES

        if self.rollout_engine not in ENGINES:
            raise ValueError(f"rollout_engine must be one of {', '.join(ENGINES)}, got {self.rollout_engine!r}")
        if self.policy_dtype == "bf16" and self.precision == "fp32":
            raise ValueError("policy_dtype=bf16 computes in bf16: use precision=bf16 (or auto on a GPU)")
        if self.validation_max_prompts < 0 or self.validate_every < 0:
            raise ValueError(f"validation_max_prompts = {self.validation_max_prompts} and validate_every = "
                             f"{self.validate_every} must be >= 0 (0 = all prompts / only the base and last step)")
        for name in ("select_max_over_refusal", "select_max_degenerate_rise"):
            if not 0 <= getattr(self, name) <= 1:  # also rejects NaN
                raise ValueError(f"{name} = {getattr(self, name)} is a rate: use a value in [0, 1], e.g. 0.05")
        if self.validation_prompts not in ("default", "none"):
            for name in ("train_prompts", "eval_prompts"):
                other = getattr(self, name)
                if other not in (None, "default", "none") and Path(other).resolve() == Path(
                        self.validation_prompts).resolve():
                    raise ValueError(f"validation_prompts is the same file as {name} ({other}): selecting on "
                                     f"prompts that are trained on or tested on is biased; give a held-out "
                                     f"validation file, 'default' or 'none'")


@dataclass
class OnlineConfig(PolicyRunConfig):
    """Keys of the algorithms that sample the policy at every step (GRPO, PPO, RLOO)."""

    ALIASES: ClassVar[dict] = {**PolicyRunConfig.ALIASES, "max_steps": "steps", "mu": "num_iterations",
                               "ppo_epochs": "num_iterations", "num_ppo_epochs": "num_iterations",
                               "epsilon": "eps_low", "epsilon_high": "eps_high", "cliprange": ("eps_low", "eps_high")}

    batch_size: int = field(16, help="sequences per step (B*G) across all processes")
    steps: int = field(60, help="training steps (rollouts)")
    num_iterations: int = field(1, help="mu: optimisation passes over each rollout")
    eps_low: float = field(0.2, help="clip range below 1")
    eps_high: float = field(0.2, help="clip range above 1 (DAPO: 0.28)")
    log_entropy: bool = field(True, help="compute token entropy for the logs (costs a little)")
    sample_every: int = field(10, help="log sample completions every N steps (0 = never)")

    def check(self) -> None:
        super().check()
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size = {self.batch_size} is not divisible by group_size = "
                             f"{self.group_size}; use a multiple, e.g. {self.group_size * 4}")
        for name in ("steps", "num_iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# ----------------------------------------------------------------------------- small shared pieces


class PhaseTimer:
    """Seconds per named phase (generation, scoring, reference, ...), summed over a run."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t

        return _T()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _norm_tensor(norm, device: torch.device) -> torch.Tensor:
    """A gradient norm as a plain 0-dim float tensor: FSDP2 returns a DTensor (its full value
    is taken), DeepSpeed None (it clips inside its own step; the norm is then NaN)."""
    if norm is None:
        return torch.full((), float("nan"), device=device)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm, device=device).detach().float()


def all_sum(acc):
    """x -> the elementwise sum of x over the processes (identity for one process)."""
    if acc.num_processes == 1:
        return lambda x: x
    return lambda x: acc.reduce(x, reduction="sum")  # a new tensor; x is left as it is


def sharding(acc) -> str | None:
    """'fsdp' or 'deepspeed' when the processes shard the weights (accelerate's FSDP or
    DeepSpeed plugin), else None (one process, DDP)."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(acc.distributed_type)


@contextmanager
def full_weights(model: torch.nn.Module, acc):
    """Every weight of `model` whole on this process inside the context, for what bypasses
    the sharded forward (sampling with `generate`, reading LoRA weights to merge): FSDP2
    all-gathers its modules once (and keeps them gathered through the forwards inside),
    DeepSpeed ZeRO-3 gathers its partitions. A no-op without sharding. Collective: every
    process must enter it. Costs one full copy of the weights per process while inside."""
    kind = sharding(acc)
    if kind == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        reshard = getattr(acc.state.fsdp_plugin, "reshard_after_forward", True) is not False
        for m in units:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(reshard, recurse=False)
    elif kind == "deepspeed" and getattr(acc.state.deepspeed_plugin, "zero_stage", 0) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    else:
        yield


@contextmanager
def _deepspeed_boundary(acc, sync: bool):
    acc.gradient_state._set_sync_gradients(sync)
    try:
        yield
    finally:
        acc.gradient_state._set_sync_gradients(True)


def owned_share(members: list[int], n_local: int, rank: int, sizes: torch.Tensor
                ) -> tuple[list[int], float]:
    """This process's part of a global minibatch, and the weight of its local mean loss.

    `members` are global row indices; process r holds rows [r * n_local, (r + 1) * n_local).
    `sizes` [N] are the global per-row denominators of a mean loss (token counts for a
    token mean, ones for a per-row mean). Returns (local row indices, weight) with weight =
    world * (this process's share of the minibatch's total size), so that the gradient
    average DDP takes over the processes of (weight * local mean) equals the gradient of
    the single-process mean over the whole minibatch. The weight is 0 when no row is owned.
    """
    world = sizes.numel() // n_local
    mine = [i - rank * n_local for i in members if rank * n_local <= i < (rank + 1) * n_local]
    total = float(sizes[members].sum())
    part = float(sizes[[rank * n_local + j for j in mine]].sum()) if mine else 0.0
    return mine, (world * part / total if total > 0 else 0.0)


JUDGE_KEYS = ("judge/refusal_harmful", "judge/over_refusal_benign", "judge/guided_refusal_harmful",
              "judge/guided_refusal_benign")


def judge_rates(acc, ro) -> dict:
    """Independent judges on a rollout, logged every step as zero-weight columns (they never
    enter the advantage): the pattern refusal judge's refusal rate on the harmful prompts' own
    (unguided) samples, its over-refusal rate on the benign prompts' own samples, and the
    refusal rates of guided samples. Counts are summed over processes; None = no such sample."""
    from mogrpo.eval.metrics import is_refusal

    G = ro.group_size
    guided = ro.guided.tolist() if ro.guided is not None else [False] * len(ro.completions)
    counts = torch.zeros(len(JUDGE_KEYS), 2, dtype=torch.float64)  # [keys, (refusals, samples)]
    for i, text in enumerate(ro.completions):
        kind = ro.kinds[i // G]
        if kind not in ("harmful", "benign"):
            continue
        k = (0 if kind == "harmful" else 1) + (2 if guided[i] else 0)
        counts[k, 0] += float(is_refusal(text))
        counts[k, 1] += 1
    counts = all_sum(acc)(counts.to(acc.device)).cpu()
    return {key: (float(c[0] / c[1]) if c[1] else None) for key, c in zip(JUDGE_KEYS, counts)}


def reward_record(all_rewards: torch.Tensor, columns: list[str], weights: torch.Tensor) -> dict:
    """Per-column mean/std over the present (non-NaN) entries of the global rewards
    [..., K], and the mean weighted combination (pure)."""
    from mogrpo.reward.scoring import weighted_sum

    flat = all_rewards.reshape(-1, all_rewards.shape[-1])
    rec = {}
    for j, c in enumerate(columns):
        col = flat[:, j][~torch.isnan(flat[:, j])]
        rec[f"reward/{c}/mean"] = float(col.mean()) if col.numel() else None
        rec[f"reward/{c}/std"] = float(col.std(unbiased=False)) if col.numel() else None
    rec["reward/combined/mean"] = float(torch.nanmean(weighted_sum(flat, weights)))
    return rec


class MetricsLogger:
    """metrics.jsonl always; TensorBoard and/or Weights & Biases as `report_to` asks. Only the
    main process writes. A resumed run keeps the rows up to its checkpoint's step and drops
    any written after it (they are logged again), so the file never holds a step twice."""

    def __init__(self, out: Path, cfg, *, main: bool, resume_step: int | None):
        self.path, self.main, self.tb, self.wandb = out / "metrics.jsonl", main, None, None
        if not main:
            return
        for path in (self.path, out / "samples.jsonl"):  # per-step logs: rows up to the checkpoint's step
            if resume_step is None:
                path.write_text("")
            else:
                trim_jsonl(path, "step", resume_step)
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events a killed run wrote after the checkpoint
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in cfg.report_to:
            try:
                import wandb
            except ImportError:
                raise ValueError("report_to names wandb, which is not installed: pip install wandb "
                                 "(or drop it from report_to)") from None
            id_file = out / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            atomic_write_text(id_file, run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mogrpo"), name=out.name, id=run_id,
                                    resume="allow", dir=str(out), config=to_dict(cfg))

    def log(self, rec: dict) -> None:
        if not self.main:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        finite = {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for key, v in finite.items():
                self.tb.add_scalar(key, v, rec["step"])
        if self.wandb is not None:
            self.wandb.log(finite, step=rec["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def trainable_state(model: torch.nn.Module, full: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors that train (LoRA adapters, or every weight), on the CPU, for a checkpoint;
    taken from `full` (a gathered state dict) when the weights are sharded."""
    return {n: (full[n] if full is not None else p.detach()).cpu() for n, p in model.named_parameters()
            if p.requires_grad}


def write_jsonl_rows(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_best(folder: Path, trainable: dict[str, torch.Tensor], record: dict) -> None:
    """The selected step's trainable tensors (trainable.safetensors) and its validation
    record (selection.json) in `folder`, atomically."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        (tmp / "selection.json").write_text(json.dumps(record), encoding="utf-8")


def copy_linked(src: Path, dst: Path) -> None:
    """Folder dst (made if missing) with src's files as hard links (no extra disk; the files
    are only ever replaced, never changed in place), or copies where the file system has no
    links."""
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def save_checkpoint(folder: Path, model, tokenizer, state: dict, keep: int, state_dict: dict | None = None,
                    best: Path | None = None) -> None:
    """Atomic: the folder appears complete or not at all, and `latest` moves only after it.
    `state_dict`: the model's gathered weights when they are sharded over processes. `best`:
    the selected weights' folder (save_best), kept in the checkpoint as best/ so that a resume
    restores the selection that goes with it."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / "trainer_state.pt")
        if best is not None:
            copy_linked(best, tmp / "best")
    atomic_write_text(folder.parent / "latest", folder.name)
    if keep > 0:
        for old in sorted(folder.parent.glob("step-*"))[:-keep]:
            shutil.rmtree(old)


# ----------------------------------------------------------------------------- the run


class Run:
    """One training run of any algorithm: see the module docstring. Attributes an algorithm
    uses: cfg, acc, world, rank, main, out, device, amp, scorer, weights [K], model (the
    trained module, DDP-wrapped after `setup_optimizer`), policy (unwrapped), tok,
    trainable (parameters), timer, tokens_generated, opt, sched."""

    def __init__(self, cfg: PolicyRunConfig, output: str | os.PathLike, *, name: str, resume: bool = False,
                 show_progress: bool = True, check_world: Callable[[int], None] | None = None,
                 extra_rewards: dict | None = None, need_reference: bool = True):
        from accelerate import Accelerator

        from mogrpo.data.prompts import balanced_subset, load_prompt_set
        from mogrpo.generation import unsupported
        from mogrpo.models import (MergedGenerationCopy, autocast_dtype, cast_frozen_linears, frozen_copy, is_peft,
                                   load_policy)
        from mogrpo.reward.model import MultiAspectRewardModel, require_reward_model
        from mogrpo.reward.scoring import Scorer

        self.t_start = time.time()
        self.cfg, self.name, self.resume, self.show_progress = cfg, name, resume, show_progress
        self.out = Path(output)
        # A prepared scheduler otherwise steps once per process per optimiser step (accelerate
        # assumes the batch grew with the processes); here the global batch is fixed, so 1 step.
        self.acc = acc = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
        self.world, self.rank, self.main, self.device = acc.num_processes, acc.process_index, acc.is_main_process, acc.device
        if check_world is not None:
            check_world(self.world)  # before anything is loaded or written
        torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // self.world))
        if self.main:  # refuses a file, an unwritable path, a folder mogrpo did not make, a folder in use
            self.lock = claim_output(self.out, f"train {name}")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        rm = MultiAspectRewardModel.load(require_reward_model(cfg.reward_model), device=self.device)
        self.amp = autocast_dtype(self.device, cfg.precision)
        rm.autocast_dtype = self.amp
        self.policy_dtype = POLICY_DTYPES[cfg.policy_dtype]
        if self.policy_dtype != torch.float32 and self.amp is None:
            raise ValueError(f"policy_dtype={cfg.policy_dtype} needs bf16 compute, which precision={cfg.precision} "
                             f"does not give on {self.device}: set precision=bf16 or policy_dtype=fp32")
        self.scorer = Scorer(rm, extra_rewards or {}, cfg.not_applicable, repetition_penalty=cfg.repetition_penalty)
        unknown = sorted(set(cfg.weights) - set(self.scorer.columns))
        if unknown:
            raise ValueError(f"weights name {unknown}, which the reward model and extra rewards do not produce; "
                             f"available columns: {self.scorer.columns}")
        if not any(cfg.weights.get(c, 0) > 0 for c in self.scorer.columns):
            raise ValueError(f"every weight is 0; give at least one of {self.scorer.columns} a positive weight")
        self.weights = torch.tensor([cfg.weights.get(c, 0.0) for c in self.scorer.columns])  # [K]

        torch.manual_seed(cfg.seed)  # LoRA's initial A matrices depend on it
        model, self.tok = load_policy(cfg.policy, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                      lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
                                      cache=cfg.cache_dir, dtype=self.policy_dtype)
        model.to(self.device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False  # generation turns the cache back on per call
        self.ref_model = None if (is_peft(model) or not need_reference) else frozen_copy(model).to(self.device)
        for m in (model, self.ref_model):  # frozen backbone weights in the autocast dtype (no per-call casts)
            if m is not None:
                cast_frozen_linears(m, self.amp)
        self.model = self.policy = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.rollout_engine = cfg.rollout_engine
        if sharding(acc) is not None:  # the engine reads whole weights; sharded runs gather them for generate
            if cfg.rollout_engine == "mogrpo":
                raise ValueError(f"rollout_engine=mogrpo does not run under {sharding(acc)}: use auto or generate")
            self.rollout_engine = "generate"
        elif self.rollout_engine == "auto":
            self.rollout_engine = "mogrpo" if unsupported(model) is None else "generate"
        # mogrpo's engine merges LoRA into its own transient snapshot; generate needs the copy
        self.merged = MergedGenerationCopy(model, self.amp) if (
            cfg.merged_generation and is_peft(model) and self.rollout_engine == "generate") else None
        self.eval_prompts = [] if cfg.eval_prompts == "none" else balanced_subset(
            load_prompt_set(cfg.eval_prompts, cfg.cache_dir, "eval"), cfg.eval_max_prompts, cfg.seed)
        self.validation_prompts = [] if cfg.validation_prompts == "none" else balanced_subset(
            load_prompt_set(cfg.validation_prompts, cfg.cache_dir, "validation"), cfg.validation_max_prompts,
            cfg.seed)
        missing = sorted({"harmful", "benign"} - {p.kind for p in self.validation_prompts})
        if cfg.validation_prompts != "none" and missing:
            raise ValueError(f"validation_prompts {cfg.validation_prompts!r} has no {' or '.join(missing)} prompts: "
                             f"selection weighs harmful compliance against benign over-refusal, so give both "
                             f"kinds (or validation_prompts=none)")
        if cfg.train_prompts != "default":
            self.train_prompts  # a user's file is read now: a bad one fails before any work  # noqa: B018
        self.timer = PhaseTimer()
        self.tokens_generated = 0
        self.opt = self.sched = None
        self.modules: list = []  # modules prepared besides the policy (PPO's critic)
        if sharding(acc) == "deepspeed" and cfg.save_every:
            raise ValueError(NO_DEEPSPEED_CHECKPOINTS)
        if sharding(acc) == "deepspeed" and self.validation_prompts:
            raise ValueError("checkpoint selection saves and reloads the best weights, which mogrpo does not do "
                             "under DeepSpeed: set validation_prompts=none (final/ is then the last step), or "
                             "shard with FSDP (configs/accelerate/fsdp.yaml)")
        if sharding(acc) == "deepspeed" and self.ref_model is not None:
            raise ValueError("full fine-tuning (lora_r=0) keeps a separate reference model, which mogrpo does not "
                             "shard under DeepSpeed: use LoRA (lora_r>0; the reference is the adapter-off policy) "
                             "or FSDP (configs/accelerate/fsdp.yaml)")
        if self.main:  # only now: every input has been read, so a config.yaml never describes a failed start
            save_config(cfg, self.out / "config.yaml")

    # ---- pieces an algorithm calls

    def amp_ctx(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    @functools.cached_property
    def train_prompts(self):
        """The training prompts, read on first use (DPO with its own pairs never needs them)."""
        from mogrpo.data.prompts import load_prompt_set

        return load_prompt_set(self.cfg.train_prompts, self.cfg.cache_dir, "train")

    def setup_optimizer(self, total_updates: int, groups: list[dict] | None = None, modules: tuple = ()):
        """AdamW (cfg.lr, cfg.weight_decay; `groups` may set their own lr) and cfg.lr_schedule
        with cfg.warmup_steps over `total_updates` optimiser steps; prepares the policy, the
        `modules` (e.g. PPO's critic), optimiser and scheduler for the processes. Returns the
        prepared modules."""
        from transformers import get_scheduler

        opt = torch.optim.AdamW(groups or [{"params": self.trainable}], lr=self.cfg.lr,
                                weight_decay=self.cfg.weight_decay)
        sched = get_scheduler(self.cfg.lr_schedule, opt, num_warmup_steps=self.cfg.warmup_steps,
                              num_training_steps=total_updates)
        if sharding(self.acc) == "deepspeed":  # mogrpo batches by itself; DeepSpeed's config still needs a number
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = 1
        prepared = self.acc.prepare(self.model, *modules, opt, sched)
        self.model, self.opt, self.sched = prepared[0], prepared[-2], prepared[-1]
        self.policy = self.acc.unwrap_model(self.model)
        self.modules = list(prepared[1:-2])
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # FSDP replaces the parameters
        # A full fine-tuning run's frozen reference copy stays whole on every process (its Linear
        # weights in the compute dtype): accelerate's FSDP2 prepares only models with an optimiser.
        return tuple(self.modules)

    def prompts_per_process(self) -> int:
        """B_local: prompts each process samples per step (whole groups; checked at start)."""
        return self.cfg.batch_size // (self.cfg.group_size * self.world)

    def rollout(self, step: int, *, model=None, prompts=None, first_index: int = 0, count: bool = True):
        """This process's share of step `step`'s prompts, G samples each (guided ones as the
        config says), from `model` or else the policy (its merged generation copy when there
        is one). `prompts` + `first_index` replace the step's own (DPO samples pairs chunk by
        chunk); `count` adds the generated tokens of every process to the run's total (a
        collective: every process must call it)."""
        from mogrpo.data.prompts import step_prompt_indices
        from mogrpo.rollout import REFUSAL_OPENERS, generate_rollout

        cfg = self.cfg
        if prompts is None:
            B_local = self.prompts_per_process()
            pool = self.train_prompts
            batch = [pool[i] for i in step_prompt_indices([p.kind for p in pool], B_local * self.world, step,
                                                          cfg.seed, cfg.balance_kinds)]
            prompts, first_index = batch[self.rank * B_local:(self.rank + 1) * B_local], self.rank * B_local
        with self.timer("generation"), self.amp_ctx(), full_weights(model if model is not None else self.policy,
                                                                    self.acc):
            gen = model if model is not None else (self.merged.sync() if self.merged else self.policy)
            ro = generate_rollout(gen, self.tok, [p.text for p in prompts], [p.kind for p in prompts],
                                  group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                                  step=step, first_index=first_index,
                                  chunk_prompts=cfg.generation_chunk or None, guided=cfg.guided_samples,
                                  openers=tuple(cfg.guide_openers or REFUSAL_OPENERS), engine=self.rollout_engine)
        ro.requests = [p.judged_request for p in prompts]
        if count:
            self.tokens_generated += int(all_sum(self.acc)(ro.completion_mask.sum().to(self.device)))
        return ro

    @functools.cached_property
    def refusal_labeller(self):
        """The refusal labeller (mogrpo/reward/labeller.py; the one the reward data was labelled
        with, never the evaluation's pattern judge), fitted on first use."""
        from mogrpo.reward.labeller import RefusalLabeller

        return RefusalLabeller.default(self.cfg.cache_dir)

    def credit_openers(self, ro, adv: torch.Tensor | None = None) -> dict:
        """Set `ro.loss_mask` by cfg.opener_credit, which guided samples train their forced opener
        tokens (a guided sample's continuation always trains):
        - 'signed' (needs `adv` [N], one advantage per sample): those whose advantage pushes the
          opener the way the prompt's kind warrants, up on harmful prompts and down on benign
          ones (rollout.signed_opener_credit; docs/theory.md section 8);
        - 'refusals': those the labeller judges a refusal as a whole (P >= 0.5), so an opener is
          not pushed by an outcome it did not decide (section 7);
        - 'all': every one.
        Returns the share of guided samples credited per prompt kind (logs)."""
        from mogrpo.rollout import opener_loss_mask, signed_opener_credit

        mode = self.cfg.opener_credit
        if ro.guided is None or not bool(ro.guided.any()) or mode == "all":
            return {}
        idx = ro.guided.nonzero().flatten().tolist()
        if mode == "signed":
            if adv is None:
                raise ValueError("opener_credit 'signed' needs the advantages: call credit_openers(ro, adv)")
            kinds = [ro.kinds[i // ro.group_size] for i in range(len(ro.completions))]
            credit = signed_opener_credit(adv.reshape(-1), kinds)
        else:
            with self.timer("opener_credit"):
                p = self.refusal_labeller.refusal_prob([ro.completions[i] for i in idx])
            credit = torch.zeros(len(ro.completions), dtype=torch.bool)
            credit[idx] = torch.as_tensor(p >= 0.5)
        ro.loss_mask = opener_loss_mask(ro.completion_mask, ro.opener_len, credit)
        out = {}
        for kind in ("harmful", "benign"):
            rows = [i for i in idx if ro.kinds[i // ro.group_size] == kind]
            out[f"opener_credited/{kind}"] = float(credit[rows].float().mean()) if rows else None
        return out

    def score(self, ro) -> torch.Tensor:
        """Rewards [B_local, G, K] of a rollout (NaN = not applicable)."""
        with self.timer("scoring"):
            # an attack prompt's answer is judged against the request inside the template: the
            # reward model reads 256 tokens, and a template would push the request out of them
            return self.scorer.score(ro.judged_requests, ro.kinds, ro.completions, ro.group_size)

    def logprobs(self, model, ids, attn, L: int, chunk: int = 0, temperature: float | None = None) -> torch.Tensor:
        """Token log-probs [N, L] without gradients, `chunk` rows per forward (0 = all), at
        the sampling temperature unless `temperature` is given."""
        from mogrpo.rollout import completion_logprobs

        temperature = self.cfg.temperature if temperature is None else temperature
        out = torch.zeros(len(ids), L, device=ids.device)
        with torch.no_grad(), self.amp_ctx():
            for mb in self.micro_batches(attn[:, :-L], chunk or len(ids)):
                out[mb] = completion_logprobs(model, ids[mb], attn[mb], L, temperature=temperature,
                                              shared_prefix=self.cfg.shared_prefix)[0].float()
        return out

    def micro_batches(self, prompt_mask: torch.Tensor, size: int) -> list[torch.Tensor]:
        """Index tensors of `size` sequences, whole groups ordered by prompt length (so a
        forward's rows need little left padding) when the rows are this run's groups."""
        n, G = len(prompt_mask), self.cfg.group_size
        order = packing.bucketed_order(prompt_mask.cpu(), G) if n % G == 0 else list(range(n))
        order = torch.tensor(order, device=prompt_mask.device)
        return [order[s:s + size] for s in range(0, n, size)]

    def ref_logprobs(self, ids, attn, L: int, chunk: int = 0, temperature: float | None = None) -> torch.Tensor:
        """The reference policy's token log-probs [N, L] (no gradients): the same model with
        the LoRA adapters off, or the frozen copy. The one way every algorithm gets them."""
        net, ctx = self.reference_net()
        with self.timer("reference"), ctx:
            return self.logprobs(net, ids, attn, L, chunk, temperature)

    def reference_net(self):
        """(model, context) to run the reference policy with, e.g. for sampling from it."""
        if self.ref_model is None:
            return self.policy, self.policy.disable_adapter()
        return self.ref_model, nullcontext()

    def no_sync(self, sync: bool):
        """Gradient accumulation: skip DDP's all-reduce except on the micro-batch that syncs.
        Under DeepSpeed the engine steps inside `backward` at an accumulation boundary, so
        only the micro-batch that syncs may be one (the engine's own accumulation is 1)."""
        if sharding(self.acc) == "deepspeed":
            return _deepspeed_boundary(self.acc, sync)
        return nullcontext() if sync or self.world == 1 else self.acc.no_sync(self.model)

    # ---- state that may be sharded over processes (FSDP, DeepSpeed): gathered whole to save,
    # scattered back to load. Without sharding these are the modules' and optimiser's own.

    def gathered_state(self, module=None) -> dict | None:
        """The whole state dict of `module` (default: the policy) on the main process when the
        weights are sharded (a collective: every process calls it), else None."""
        if sharding(self.acc) is None:
            return None
        module = module if module is not None else self.model
        full = self.acc.get_state_dict(module)
        # A tied weight (an output head sharing the embedding) is gathered under both names; keep
        # one, as an unsharded save does.
        inner = self.acc.unwrap_model(module)
        names = {n for n, _ in inner.named_parameters()} | {n for n, _ in inner.named_buffers()}
        return {k: v for k, v in full.items() if k in names}

    def module_state(self, module) -> dict:
        """A module's state dict for a checkpoint (e.g. PPO's critic), gathered when sharded."""
        full = self.gathered_state(module)
        return full if full is not None else self.acc.unwrap_model(module).state_dict()

    def load_module_state(self, module, state: dict, strict: bool = True) -> None:
        """Load whole tensors into a module, sharding them as the module is sharded."""
        if sharding(self.acc) == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))
        else:
            self.acc.unwrap_model(module).load_state_dict(state, strict=strict)

    def _state_root(self) -> torch.nn.Module:
        return torch.nn.ModuleList([self.model, *self.modules]) if self.modules else self.model

    def optimizer_state(self) -> dict:
        """The optimiser's state, whole (keyed by parameter names when sharded: a collective)."""
        kind = sharding(self.acc)
        if kind is None:
            return self.opt.state_dict()
        if kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self._state_root(), self.opt.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        raise ValueError(NO_DEEPSPEED_CHECKPOINTS)

    def load_optimizer_state(self, state: dict) -> None:
        if sharding(self.acc) == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self._state_root(), self.opt.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(state)

    def optimizer_step(self, *param_sets) -> list[torch.Tensor]:
        """Clip each parameter set's (all-reduced) gradients to cfg.grad_clip on its own (0 =
        only measure), step the optimiser and the schedule; returns the pre-clip norms (0-dim
        tensors on the device: read them once per step, not per optimiser step)."""
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norms = [_norm_tensor(self.acc.clip_grad_norm_(ps, clip), self.device) for ps in (param_sets or (self.trainable,))]
        self.opt.step()
        self.sched.step()
        return norms

    def policy_update(self, ro, adv: torch.Tensor, *, beta: float, aggregation: str, micro_batch_size: int,
                      ref_logp: torch.Tensor | None = None, old_logp: torch.Tensor | None = None) -> dict:
        """cfg.num_iterations passes of the clipped surrogate (+ beta * k3 KL to `ref_logp`)
        over this process's rollout with advantages `adv` [N], each pass one optimiser step
        with gradient accumulation over micro-batches, weighted by their share so that the
        accumulated gradient is the full batch's (1 x 8 == 8 x 1). Behaviour log-probs:
        `old_logp`, else one no-grad pass when there are several passes, else the training
        forward's own, detached (with one pass they are equal). Returns the step's stats."""
        from mogrpo.rl.losses import grpo_loss
        from mogrpo.rollout import completion_logprobs

        cfg = self.cfg
        ids, attn = ro.input_ids.to(self.device), ro.attention_mask.to(self.device)  # [N, P + L]
        cmask = ro.trained_mask.to(self.device)  # [N, L]
        adv = adv.to(self.device)
        N, L = cmask.shape
        micro = self.micro_batches(ro.prompt_mask.to(self.device), micro_batch_size)  # index tensors
        if old_logp is None and cfg.num_iterations > 1:
            with self.timer("policy_forward_backward"):
                old_logp = self.logprobs(self.policy, ids, attn, L, chunk=micro_batch_size)
        counts = ro.trained_mask.sum(1)  # [N] on the CPU: the micro-batches' shares without device syncs
        n_tok = float(counts.sum().clamp(min=1))
        shares = [float(counts[mb.cpu()].sum()) / n_tok if aggregation == "dapo" else len(mb) / N for mb in micro]
        stats, norm = [], torch.zeros(())
        with self.timer("policy_forward_backward"):
            for _ in range(cfg.num_iterations):
                self.opt.zero_grad(set_to_none=True)
                for j, mb in enumerate(micro):
                    with self.no_sync(j == len(micro) - 1):
                        with self.amp_ctx():
                            logp, ent = completion_logprobs(self.model, ids[mb], attn[mb], L,
                                                            temperature=cfg.temperature, with_entropy=cfg.log_entropy,
                                                            shared_prefix=cfg.shared_prefix)
                        old = old_logp[mb] if old_logp is not None else logp.detach()
                        loss, st = grpo_loss(logp, old, None if ref_logp is None else ref_logp[mb], adv[mb],
                                             cmask[mb], eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=beta,
                                             aggregation=aggregation, max_tokens=cfg.max_new_tokens, entropy=ent)
                        self.acc.backward(loss * shares[j])
                        stats.append((shares[j], st))  # tensors on the device: read once, below
                norm = self.optimizer_step()[0]
        # One device-to-host transfer per step for every statistic (not one per micro-batch).
        mean_keys = ("loss", "policy_loss", "kl", "clip_fraction", "entropy")
        means = torch.stack([sum(st[k].float() * w for w, st in stats) / cfg.num_iterations for k in mean_keys])
        lo = torch.stack([st["ratio/min"].float() for _, st in stats]).min()
        hi = torch.stack([st["ratio/max"].float() for _, st in stats]).max()
        values = torch.cat([means, torch.stack([lo, hi, norm.to(means.device)])]).tolist()
        return dict(zip((*mean_keys, "ratio/min", "ratio/max", "grad_norm"), values))

    def rollout_record(self, ro, rewards: torch.Tensor) -> dict:
        """What every rollout-based step logs: reward means/stds per column and combined (global),
        completion length and finished share, and the independent judges' refusal rates."""
        all_rewards = self.acc.gather(rewards.to(self.device)).cpu()  # [B, G, K]
        lengths = self.acc.gather(ro.completion_mask.sum(1).float().to(self.device))
        finished = self.acc.gather(ro.finished.float().to(self.device))
        return {**reward_record(all_rewards, self.scorer.columns, self.weights),
                "completion_length": float(lengths.mean()), "finished_fraction": float(finished.mean()),
                **judge_rates(self.acc, ro)}

    def log_samples(self, step: int, ro, rewards: torch.Tensor) -> None:
        """Every cfg.sample_every steps: every sample of this rollout with its rewards to
        samples.jsonl, one per group to the logger (main process)."""
        every = self.cfg.sample_every
        if not (self.main and every and step % every == 0):
            return
        G, cols = ro.group_size, self.scorer.columns
        self.logger.text("samples", "\n\n".join(f"[{ro.kinds[i // G]}] {ro.prompts[i // G]}\n-> {ro.completions[i]}"
                                                for i in range(0, len(ro.completions), G)), step)
        flat = rewards.reshape(-1, len(cols))
        with (self.out / "samples.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "samples": [
                {"prompt": ro.prompts[i // G], "completion": ro.completions[i], "rewards": dict(zip(cols, flat[i].tolist()))}
                for i in range(len(ro.completions))]}) + "\n")

    def evaluate(self, tag: str) -> dict:
        """The one evaluator (greedy, training RM + refusal judge) on the evaluation prompts."""
        return self._evaluate(self.eval_prompts, self.out / f"eval_{tag}_generations.jsonl", "evaluation")

    def validate(self, step: int) -> dict:
        """The one evaluator on the validation prompts with the policy as it is after `step`
        steps (0 = the base); writes validation/step-NNNNNN_generations.jsonl. Returns the
        selection record {step, compliance (harmful), over_refusal (benign), degenerate (all)},
        the same on every process."""
        s = self._evaluate(self.validation_prompts, self.out / "validation" / f"step-{step:06d}_generations.jsonl",
                           "validation")
        return {"step": step, "compliance": s["harmful"]["compliance_rate"],
                "over_refusal": s["benign"]["over_refusal_rate"], "degenerate": s["degenerate_rate"]}

    def _evaluate(self, records, out_file: Path, phase: str) -> dict:
        from mogrpo.eval.harness import evaluate_loaded

        if not records:
            return {}
        with self.timer(phase), self.amp_ctx(), full_weights(self.policy, self.acc):
            model = self.merged.sync() if self.merged else self.policy
            return evaluate_loaded(model, self.tok, records, rm=self.scorer.rm, weights=self.cfg.weights,
                                   not_applicable=self.cfg.not_applicable,
                                   max_new_tokens=self.cfg.eval_max_new_tokens, amp_ctx=self.amp_ctx, acc=self.acc,
                                   engine=self.rollout_engine, out_file=out_file)

    def select(self, step: int, sel: dict) -> dict:
        """Validate after `step` steps, add the record to sel["history"] and apply the fixed
        criterion (selection.select_step, the base = step 0 setting its limits). The chosen
        step is this one or the one chosen before (the limits depend on the base alone, so
        each new record either wins or not): when it is this one, its trainable weights go
        to best/ (atomic) and sel["best"] becomes its record. Rewrites validation.jsonl.
        Collective (every process calls it). Returns the metrics to log at this step."""
        from mogrpo.rl.selection import select_step

        rec = self.validate(step)
        history = sel["history"] = [*sel["history"], rec]
        chosen, reason = select_step(history, history[0], self.cfg.select_max_over_refusal,
                                     self.cfg.select_max_degenerate_rise)
        if chosen == step:
            full = self.gathered_state()  # a collective when sharded
            if self.main:
                save_best(self.out / "best", trainable_state(self.policy, full), rec)
            sel["best"] = dict(rec)
            self.acc.wait_for_everyone()
        sel["best"]["reason"] = reason
        rec["selected_step"] = chosen
        if self.main:
            write_jsonl_rows(self.out / "validation.jsonl", history)
        return {"validation/compliance": rec["compliance"], "validation/over_refusal": rec["over_refusal"],
                "validation/degenerate": rec["degenerate"], "validation/selected_step": chosen}

    def load_best(self) -> None:
        """Load the selected trainable weights (best/, written by the main process) into the
        policy on every process (scattered when sharded)."""
        from safetensors.torch import load_file

        self.acc.wait_for_everyone()
        path = self.out / "best" / "trainable.safetensors"
        try:
            state = load_file(str(path))
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: the selected weights do not load ({first_line(exc)}); rerun with "
                                  f"--resume from a checkpoint, or start again") from None
        names = {n for n, p in self.policy.named_parameters() if p.requires_grad}
        if set(state) != names:
            raise CheckpointError(f"{path} does not hold this run's trainable weights (e.g. "
                                  f"{sorted(set(state) ^ names)[:3]}); start the run again in a new folder")
        self.load_module_state(self.model, state, strict=False)

    # ---- the loop

    def train(self, steps: int, step_fn: Callable[[int], dict], *, state: Callable[[], dict] = dict,
              load_state: Callable[[dict], None] = lambda s: None, postfix: tuple[str, ...] = (),
              **cost_extra) -> dict:
        """Resume (if asked and a checkpoint exists), evaluate before, validate the base (step
        0), then for each step: rec = step_fn(step) -> validate every cfg.validate_every steps
        and at the last step (select) -> log (+ lr, timing, memory) -> checkpoint every
        cfg.save_every steps; then load the selected step's weights (best/), evaluate after and
        write final/ (= the selected step), eval.json, cost.json. With validation_prompts=none
        nothing is validated and final/ is the last step. `state()` is the algorithm's own
        checkpointed state, `load_state(s)` restores it. Returns {eval_before, eval_after}
        (+ selected_step when selecting, + cost on the main process)."""
        from tqdm import tqdm

        cfg, acc = self.cfg, self.acc
        ckpt_root = self.out / "checkpoints"
        start, eval_before = 0, None
        selecting = bool(self.validation_prompts)
        sel: dict = {"history": [], "best": None}  # validation records (step 0 = the base), the selected one
        saved = self._load_checkpoint(ckpt_root) if self.resume else None
        if saved is not None:
            start, eval_before = saved["step"], saved["eval_before"]
            self.timer.seconds, self.tokens_generated = saved["cost_seconds"], saved["tokens_generated"]
            restore_rng(saved["rng"])
            load_state(saved["algorithm"])
            if selecting and "selection" not in saved:
                selecting = False
                if self.main:
                    print(f"warning: {saved['folder']} holds no validation history (written before checkpoint "
                          f"selection); this run selects nothing: final/ is the last step", file=sys.stderr)
            elif selecting:
                sel = saved["selection"]
                if not (saved["folder"] / "best" / "trainable.safetensors").is_file():
                    raise CheckpointError(f"checkpoint {saved['folder']} has no best/ (the weights of the step "
                                          f"selected so far); move it away to resume from an older one, or start "
                                          f"again")
                if self.main:  # best/ and validation.jsonl may hold steps after the checkpoint: run again
                    with atomic_folder(self.out / "best") as tmp:
                        copy_linked(saved["folder"] / "best", tmp)
                    write_jsonl_rows(self.out / "validation.jsonl", sel["history"])
            if self.main:
                print(f"resumed from {saved['folder']} at step {start}", file=sys.stderr)
        elif self.resume and self.main:
            print(f"no checkpoint under {ckpt_root}; starting from scratch", file=sys.stderr)
        if saved is None and selecting and self.main:
            shutil.rmtree(self.out / "validation", ignore_errors=True)  # an earlier run's generations
        if eval_before is None:
            eval_before = self.evaluate("before")
        self.logger = MetricsLogger(self.out, cfg, main=self.main, resume_step=start if saved else None)
        if selecting and not sel["history"]:
            self.logger.log({"step": 0, **self.select(0, sel)})
        bar = tqdm(range(start, steps), desc=self.name, disable=not (self.show_progress and self.main), unit="step",
                   initial=start, total=steps)
        for step in bar:
            t0, tokens0 = time.perf_counter(), self.tokens_generated
            rec = step_fn(step)
            seconds = time.perf_counter() - t0
            rec = {"step": step + 1, **rec, "lr": self.sched.get_last_lr()[0], "step_seconds": round(seconds, 3),
                   "peak_memory_mb": round(peak_memory_mb(self.device), 1)}
            if self.tokens_generated > tokens0:  # a step that sampled
                rec["tokens_per_s"] = round((self.tokens_generated - tokens0) / max(seconds, 1e-9), 2)
            if selecting and (step + 1 == steps or (cfg.validate_every and (step + 1) % cfg.validate_every == 0)):
                rec.update(self.select(step + 1, sel))
            self.logger.log(rec)
            bar.set_postfix({k: f"{rec[k]:.4f}" for k in postfix if isinstance(rec.get(k), float)})
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                acc.wait_for_everyone()
                full, optim, algo = self.gathered_state(), self.optimizer_state(), state()  # collectives when sharded
                if self.main:
                    save_checkpoint(ckpt_root / f"step-{step + 1:06d}", self.policy, self.tok, {
                        "step": step + 1, "trainable": trainable_state(self.policy, full),
                        "optimizer": optim, "scheduler": self.sched.state_dict(),
                        "rng": rng_state(), "cost_seconds": dict(self.timer.seconds),
                        "tokens_generated": self.tokens_generated, "eval_before": eval_before,
                        "algorithm": algo, **({"selection": sel} if selecting else {})},
                        cfg.keep_checkpoints, state_dict=full, best=self.out / "best" if selecting else None)
                acc.wait_for_everyone()
        bar.close()
        selected = {}
        if selecting:  # final/ and the evaluation after are the selected step's
            if sel["best"]["step"] != max(start, steps):  # else the policy holds its weights already
                self.load_best()
            selected = {"selected_step": sel["best"]["step"]}
            cost_extra = {**cost_extra, **selected, "selection": {
                "criterion": CRITERION, "max_over_refusal": cfg.select_max_over_refusal,
                "max_degenerate_rise": cfg.select_max_degenerate_rise, "validation_prompts": cfg.validation_prompts,
                "n_prompts": len(self.validation_prompts), **sel["best"]}, "validation": sel["history"]}
        eval_after = self.evaluate("after")
        acc.wait_for_everyone()
        full = self.gathered_state()  # a collective when sharded
        result = {"eval_before": eval_before, "eval_after": eval_after, **selected}
        if self.main:
            self.logger.close()
            result = self._finish(result, full, steps=steps, **cost_extra)
            self.lock.release()
        return result

    def _load_checkpoint(self, ckpt_root: Path) -> dict | None:
        """The newest checkpoint that loads, its weights, optimiser and schedule restored. A
        newer one that does not load (a kill, a full disk, a damaged file) is skipped with a
        warning; when none loads, the error names them all."""
        # Newest first by name: a checkpoint folder appears whole (atomic rename) before `latest`
        # moves to it, so the newest folder is the newest complete checkpoint.
        files = [f / "trainer_state.pt" for f in sorted(ckpt_root.glob("step-*"), reverse=True)]

        def restore(state: dict) -> None:
            for key in ("step", "trainable", "optimizer", "scheduler", "rng", "algorithm"):
                if key not in state:
                    raise CheckpointError(f"trainer_state.pt has no {key!r} (written by another mogrpo version "
                                          f"or program)")
            unexpected = sorted(set(state["trainable"]) - {n for n, _ in self.policy.named_parameters()})
            if unexpected:
                raise CheckpointError(f"checkpoint does not fit this model ({unexpected[:3]} ...)")
            self.load_module_state(self.model, state["trainable"], strict=False)
            self.load_optimizer_state(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])

        found = load_newest(files, "the trainer state", restore, where=f"checkpoint under {ckpt_root}",
                            label=lambda p: f"checkpoint {p.parent.name}",
                            warn=lambda m: print(m, file=sys.stderr) if self.main else None)
        if found is None:
            return None
        path, state = found
        state["folder"] = path.parent
        return state

    def _finish(self, result: dict, full: dict | None, **extra) -> dict:
        """final/ (the policy's adapter or model as it is now, i.e. the selected step's when
        selecting, + tokenizer; `full`: the gathered weights when sharded),
        eval.json, cost.json (wall and phase seconds, peak memory, tokens, processes, +
        `extra`). Returns `result` with the cost added."""
        with atomic_folder(self.out / "final") as tmp:
            self.policy.save_pretrained(tmp, state_dict=full)
            self.tok.save_pretrained(tmp)
        atomic_write_text(self.out / "eval.json", json.dumps(result, indent=2))
        cost = {"wall_seconds": round(time.time() - self.t_start, 1),
                "phase_seconds": {k: round(v, 2) for k, v in self.timer.seconds.items()},
                "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                "peak_memory_of": "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "process max RSS",
                "tokens_generated": self.tokens_generated,
                **extra, "processes": self.world, "sharding": sharding(self.acc) or "none", "device": str(self.device),
                "precision": str(self.amp or "fp32"), "weights_dtype": str(self.policy_dtype).replace("torch.", ""),
                "rollout_engine": self.rollout_engine,
                **packing.forward_path(self.policy, self.cfg.shared_prefix)}
        atomic_write_text(self.out / "cost.json", json.dumps(cost, indent=2))
        return {**result, "cost": cost}


def check_batch_splits(batch_size: int, group: int) -> Callable[[int], None]:
    """A `check_world` for rollout algorithms: the batch must split into whole groups per process."""
    def check(world: int) -> None:
        if batch_size % (group * world):
            raise ValueError(f"batch_size = {batch_size} must split into whole prompt groups over {world} processes: "
                             f"use a multiple of group_size * processes = {group * world}")
    return check
