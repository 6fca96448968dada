"""Multi-objective GRPO: one readable loop, no value critic.

    rollout (B prompts x G samples) -> score [B, G, K] -> advantages [B, G]
    -> mu optimisation passes (clipped surrogate + beta * k3 KL to the reference)
    -> log -> checkpoint

The method is the paper's (arXiv 2503.21819): a multi-aspect reward model scores each
sample, the aspects are combined, and advantages are group-relative, so no critic is
trained. The paper does not publish its hyper-parameters; where it is silent we follow
DeepSeekMath's GRPO (arXiv 2402.03300): k3 KL estimator against a frozen reference,
beta = 0.04, clip 0.2, one optimisation pass per rollout (so behaviour log-probs equal
the current ones and come from the training forward itself), per-sequence mean loss.
Beyond the paper: the `normalize_then_sum`, `min` and `lagrangian` advantage modes
(docs/theory.md), DAPO's asymmetric clip and token-mean loss, Dr. GRPO's unscaled
advantages and constant normaliser.

Runs as one process or under `accelerate launch` (DDP/FSDP/DeepSpeed via accelerate's
config); each process samples its own share of the B prompts, whole groups, so group
statistics are local and exact. Shapes: B prompts, G samples, N = B*G, L tokens, K aspects.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mogrpo.config import field, save_config
from mogrpo.rl.advantages import MODES, group_advantages, update_multipliers, weighted_sum
from mogrpo.rl.common import (PhaseTimer, PolicyRunConfig, balanced_subset, check_guided, close_run,
                              judge_rates, load_latest_checkpoint, load_prompt_set, log_metrics, open_metrics,
                              peak_memory_mb, require_reward_model, rollout_kwargs, save_checkpoint,
                              step_prompt_indices, trainable_state)
from mogrpo.rl.losses import AGGREGATIONS, grpo_loss


@dataclass
class GRPOConfig(PolicyRunConfig):
    """Config of `mogrpo train grpo` (YAML keys = field names; shared keys in PolicyRunConfig)."""

    lora_dropout: float = field(0.0, help="LoRA dropout")
    # rewards and advantages
    advantage_mode: str = field("sum_then_normalize", help="sum_then_normalize (the paper) | "
                                "normalize_then_sum | min | lagrangian")
    scale_by_std: bool = field(True, help="divide by the group std (False = Dr. GRPO)")
    adv_eps: float = field(1e-4, help="epsilon in the std normalisation; groups with std <= eps get 0")
    thresholds: dict[str, float] = field(default_factory=dict, help="lagrangian: constraint r_k >= tau_k")
    multiplier_init: float = field(1.0, help="lagrangian: initial multiplier per constraint")
    multiplier_lr: float = field(0.05, help="lagrangian: dual ascent step size")
    extra_rewards: list[str] = field(default_factory=list, help="extra reward columns: judge_politeness, concise")
    # sampling
    batch_size: int = field(16, help="sequences per step (B*G) across all processes")
    group_size: int = field(4, help="G: samples per prompt")
    top_p: float = field(1.0, help="nucleus sampling")
    generation_chunk: int = field(0, help="prompts per generate call (0 = the whole local batch); "
                                          "seeding is per chunk, so keep it equal across runs to compare")
    # optimisation
    steps: int = field(40, help="training steps (rollouts)")
    mu: int = field(1, help="optimisation passes per rollout")
    micro_batch_size: int = field(4, help="sequences per forward/backward (gradient accumulation; exact): "
                                          "4 took the same time per step as 16 with 0.57x the peak memory "
                                          "(SmolLM2-135M, 2 CPU cores)")
    lr: float = field(2e-4, help="AdamW learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(2, help="linear warm-up (optimizer steps)")
    lr_schedule: str = field("constant_with_warmup", help="constant_with_warmup | linear | cosine")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off)")
    beta: float = field(0.04, help="KL coefficient (k3 estimator); 0 skips the reference pass")
    eps_low: float = field(0.2, help="clip range below 1")
    eps_high: float = field(0.2, help="clip range above 1 (DAPO: 0.28)")
    loss_aggregation: str = field("grpo", help="grpo | dapo | dr_grpo")
    # run
    log_entropy: bool = field(True, help="compute token entropy for the logs (costs a little)")
    sample_every: int = field(10, help="log sample completions every N steps (0 = never)")

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size (G) = {self.group_size}: GRPO needs G >= 2 samples per prompt "
                             "to compare them; set group_size=4 or more")
        check_guided(self.guided_samples, self.group_size, "group_size")
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size = {self.batch_size} is not divisible by group_size = "
                             f"{self.group_size}; use a multiple, e.g. {self.group_size * 4}")
        if self.advantage_mode not in MODES:
            raise ValueError(f"advantage_mode must be one of {MODES}, got {self.advantage_mode!r}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got {self.loss_aggregation!r}")
        if self.advantage_mode == "lagrangian" and not self.thresholds:
            raise ValueError("advantage_mode=lagrangian needs thresholds, e.g. thresholds={safety: 0.9}")
        if self.advantage_mode != "lagrangian" and self.thresholds:
            raise ValueError("thresholds only apply with advantage_mode=lagrangian")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must be >= 0, got {self.weights}")
        for name in ("steps", "mu", "micro_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr_schedule not in ("constant_with_warmup", "linear", "cosine"):
            raise ValueError("lr_schedule must be constant_with_warmup, linear or cosine")

    def check_columns(self, columns: list[str]) -> None:
        """Fail early when weights/thresholds name a reward column that does not exist."""
        for what, names in (("weights", self.weights), ("thresholds", self.thresholds)):
            unknown = sorted(set(names) - set(columns))
            if unknown:
                raise ValueError(f"{what} name {unknown}, which the reward model and extra rewards do "
                                 f"not produce; available columns: {columns}")
        if not any(self.weights.get(c, 0) > 0 for c in columns):
            raise ValueError(f"every weight is 0; give at least one of {columns} a positive weight")


# ----------------------------------------------------------------------------- the loop


def train_grpo(cfg: GRPOConfig, output: str | os.PathLike, *, resume: bool = False,
               show_progress: bool = True) -> dict:
    from accelerate import Accelerator
    from transformers import get_scheduler

    from mogrpo.eval.quick import evaluate_policy
    from mogrpo.models import (MergedGenerationCopy, autocast_dtype, cast_frozen_linears, frozen_copy, is_peft,
                               load_policy)
    from mogrpo.reward.model import MultiAspectRewardModel
    from mogrpo.rl.rollout import completion_logprobs, generate_rollout
    from mogrpo.rl.scoring import Scorer, extra_reward

    t_start = time.time()
    out = Path(output)
    # the scheduler steps once per optimiser step, not once per process (accelerate default)
    acc = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    world, rank = acc.num_processes, acc.process_index
    main = acc.is_main_process
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // world))
    if cfg.batch_size % (cfg.group_size * world):
        raise ValueError(f"batch_size = {cfg.batch_size} must split into whole groups over {world} "
                         f"processes: use a multiple of group_size * processes = {cfg.group_size * world}")
    B = cfg.batch_size // cfg.group_size  # prompts per step, all processes
    B_local = B // world
    N_local = B_local * cfg.group_size
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # models: policy (+ LoRA), reference, reward model
    rm = MultiAspectRewardModel.load(require_reward_model(cfg.reward_model), device=acc.device)
    amp = autocast_dtype(acc.device, cfg.precision)
    rm.autocast_dtype = amp
    extra = {name: extra_reward(name, cfg.cache_dir) for name in cfg.extra_rewards}
    scorer = Scorer(rm, extra, cfg.not_applicable)
    cfg.check_columns(scorer.columns)
    weights = torch.tensor([cfg.weights.get(c, 0.0) for c in scorer.columns])  # [K']
    constrained = torch.tensor([c in cfg.thresholds for c in scorer.columns])
    thresholds = torch.tensor([cfg.thresholds.get(c, 0.0) for c in scorer.columns])
    multipliers = torch.where(constrained, torch.full_like(thresholds, cfg.multiplier_init),
                              torch.zeros_like(thresholds))

    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices depend on it
    model, tok = load_policy(cfg.policy, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
                             cache=cfg.cache_dir)
    ref_model = None if (is_peft(model) or cfg.beta == 0) else frozen_copy(model).to(acc.device)
    for m in (model, ref_model):  # frozen backbone weights in the autocast dtype (no per-call casts)
        if m is not None:
            cast_frozen_linears(m, amp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_updates = cfg.steps * cfg.mu
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=total_updates)
    merged = MergedGenerationCopy(model, amp) if (cfg.merged_generation and is_peft(model)) else None
    model, opt, sched = acc.prepare(model, opt, sched)
    policy = acc.unwrap_model(model)
    amp_ctx = (lambda: torch.autocast(acc.device.type, dtype=amp)) if amp else nullcontext

    train_prompts = load_prompt_set(cfg.train_prompts, cfg.cache_dir, "train")
    if len(train_prompts) < B:
        raise ValueError(f"{len(train_prompts)} training prompts, fewer than one batch of {B} prompts")
    eval_prompts = [] if cfg.eval_prompts == "none" else balanced_subset(
        load_prompt_set(cfg.eval_prompts, cfg.cache_dir, "eval"), cfg.eval_max_prompts, cfg.seed)


    def evaluate(tag: str) -> dict:
        return evaluate_policy(acc, policy, tok, scorer, eval_prompts, weights,
                               max_new_tokens=cfg.eval_max_new_tokens, autocast_dtype=amp,
                               out_file=out / f"eval_{tag}_generations.jsonl")

    # resume
    timer = PhaseTimer()
    tokens_generated = 0
    start_step = 0
    eval_before = None
    ckpt_root = out / "checkpoints"
    state = load_latest_checkpoint(ckpt_root, policy, opt, sched) if resume else None
    if state is not None:
        multipliers = state["multipliers"]
        start_step = state["step"]
        timer.seconds = state["cost_seconds"]
        tokens_generated = state["tokens_generated"]
        eval_before = state.get("eval_before")
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
        np.random.set_state(state["np_rng"])
        if main:
            print(f"resumed from {state['folder']} at step {start_step}", file=sys.stderr)
    elif resume and main:
        print(f"no checkpoint under {ckpt_root}; starting from scratch", file=sys.stderr)

    if eval_before is None:
        with timer("evaluation"):
            eval_before = evaluate("before")

    metrics_path, writer = open_metrics(out, main, resume)
    bar = tqdm(range(start_step, cfg.steps), desc="grpo", disable=not (show_progress and main), unit="step",
               initial=start_step, total=cfg.steps)
    for step in bar:
        t_step = time.perf_counter()
        # ---- rollout: this process's share of the step's B prompts, G samples each
        batch = [train_prompts[i] for i in step_prompt_indices([p.kind for p in train_prompts], B, step,
                                                               cfg.seed, cfg.balance_kinds)]
        local = batch[rank * B_local:(rank + 1) * B_local]
        with timer("generation"), amp_ctx():
            ro = generate_rollout(merged.sync() if merged else policy, tok, [p.text for p in local],
                                  [p.kind for p in local], group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, step=step,
                                  first_index=rank * B_local, chunk_prompts=cfg.generation_chunk or None,
                                  **rollout_kwargs(cfg))
        n_tokens = int(ro.completion_mask.sum())
        tokens_generated += int(acc.reduce(torch.tensor(n_tokens), reduction="sum"))

        # ---- score: [B_local, G, K'] and advantages [B_local, G]
        with timer("scoring"):
            rewards = scorer.score(ro.prompts, ro.kinds, ro.completions, cfg.group_size)
        adv, adv_stats = group_advantages(rewards, weights, cfg.advantage_mode, scale_by_std=cfg.scale_by_std,
                                          eps=cfg.adv_eps, multipliers=multipliers, constrained=constrained)
        adv = adv.reshape(-1).to(acc.device)  # [N_local]

        input_ids = ro.input_ids.to(acc.device)  # [N, P + L]
        attn = ro.attention_mask.to(acc.device)
        cmask = ro.completion_mask.to(acc.device)  # [N, L]
        L = cmask.shape[1]
        micro = [slice(s, min(s + cfg.micro_batch_size, N_local)) for s in range(0, N_local, cfg.micro_batch_size)]

        # ---- reference log-probs (adapters off, or the frozen copy), once per rollout
        ref_logp = None
        if cfg.beta != 0:
            with timer("reference"), torch.no_grad(), amp_ctx():
                parts = []
                for sl in micro:
                    if ref_model is None:
                        with policy.disable_adapter():
                            parts.append(completion_logprobs(policy, input_ids[sl], attn[sl], L,
                                                             temperature=cfg.temperature)[0])
                    else:
                        parts.append(completion_logprobs(ref_model, input_ids[sl], attn[sl], L,
                                                         temperature=cfg.temperature)[0])
                ref_logp = torch.cat(parts)
        # ---- behaviour log-probs: only needed separately when there are several passes
        if cfg.mu > 1:
            with timer("policy_forward_backward"), torch.no_grad(), amp_ctx():
                ro.old_logp = torch.cat([completion_logprobs(policy, input_ids[sl], attn[sl], L,
                                                             temperature=cfg.temperature)[0] for sl in micro])

        # ---- mu optimisation passes, gradient accumulation over micro-batches
        model.train()
        step_stats: list[dict] = []
        grad_norm = torch.tensor(0.0)
        n_seq = float(N_local)
        n_tok = float(cmask.sum().clamp(min=1))
        with timer("policy_forward_backward"):
            for _ in range(cfg.mu):
                opt.zero_grad(set_to_none=True)
                for j, sl in enumerate(micro):
                    sync = j == len(micro) - 1
                    ctx = nullcontext() if sync or world == 1 else acc.no_sync(model)
                    with ctx:
                        with amp_ctx():
                            logp, ent = completion_logprobs(model, input_ids[sl], attn[sl], L,
                                                            temperature=cfg.temperature,
                                                            with_entropy=cfg.log_entropy)
                        # mu == 1: the behaviour policy is the current one; its log-probs are this
                        # very forward's, detached (no second pass).
                        old = ro.old_logp[sl] if cfg.mu > 1 else logp.detach()
                        loss, st = grpo_loss(logp, old, None if ref_logp is None else ref_logp[sl], adv[sl],
                                             cmask[sl], eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                             beta=cfg.beta, aggregation=cfg.loss_aggregation,
                                             max_tokens=cfg.max_new_tokens, entropy=ent)
                        # Weight each micro-batch by its share so the accumulated gradient equals
                        # the full-batch one (1 x 8 == 8 x 1).
                        if cfg.loss_aggregation == "dapo":
                            share = float(cmask[sl].sum()) / n_tok
                        else:
                            share = (sl.stop - sl.start) / n_seq
                        acc.backward(loss * share)
                        st["share"] = share
                        step_stats.append(st)
                if cfg.grad_clip > 0:
                    grad_norm = acc.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                sched.step()

        # ---- constraint multipliers (lagrangian), on the whole batch's rewards
        all_rewards = acc.gather(rewards.to(acc.device)).cpu()  # [B, G, K']
        if cfg.advantage_mode == "lagrangian":
            multipliers = update_multipliers(multipliers, all_rewards, thresholds, constrained, cfg.multiplier_lr)

        # ---- log
        step_seconds = time.perf_counter() - t_step
        rec = {"step": step + 1, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
               "step_seconds": round(step_seconds, 3),
               "tokens_per_s": round(n_tokens * world / max(step_seconds, 1e-9), 2),
               "peak_memory_mb": round(peak_memory_mb(acc.device), 1),
               "completion_length": float(ro.completion_mask.sum(1).float().mean()),
               "finished_fraction": float(ro.finished.float().mean())}
        for key in ("loss", "policy_loss", "kl", "clip_fraction", "entropy"):
            rec[key] = sum(s[key] * s["share"] for s in step_stats) / cfg.mu
        rec["ratio/min"] = min(s["ratio/min"] for s in step_stats)
        rec["ratio/max"] = max(s["ratio/max"] for s in step_stats)
        flat = all_rewards.reshape(-1, all_rewards.shape[-1])
        for j, c in enumerate(scorer.columns):
            col = flat[:, j]
            col = col[~torch.isnan(col)]
            rec[f"reward/{c}/mean"] = float(col.mean()) if col.numel() else None
            rec[f"reward/{c}/std"] = float(col.std(unbiased=False)) if col.numel() else None
        combined = weighted_sum(flat, weights)
        rec["reward/combined/mean"] = float(torch.nanmean(combined))
        rec.update({k: v for k, v in adv_stats.items() if not k.startswith("combined")})
        rec.update(judge_rates(acc, ro))  # zero-weight columns: logged, never in the advantage
        for j, c in enumerate(scorer.columns):
            if constrained[j]:
                rec[f"multiplier/{c}"] = float(multipliers[j])
        if main:
            log_metrics(metrics_path, writer, rec)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                sample = "\n\n".join(f"[{ro.kinds[i // cfg.group_size]}] {ro.prompts[i // cfg.group_size]}\n"
                                     f"-> {ro.completions[i]}" for i in range(0, len(ro.completions), cfg.group_size))
                writer.add_text("samples", sample, step + 1)
                with (out / "samples.jsonl").open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": step + 1, "samples": [
                        {"prompt": ro.prompts[i // cfg.group_size], "completion": ro.completions[i],
                         "rewards": dict(zip(scorer.columns, rewards.reshape(-1, len(scorer.columns))[i].tolist()))}
                        for i in range(len(ro.completions))]}) + "\n")
            bar.set_postfix(reward=f"{rec['reward/combined/mean']:.3f}", kl=f"{rec['kl']:.4f}")

        # ---- checkpoint (atomic; adapters or weights + trainer state)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            acc.wait_for_everyone()
            if main:
                save_checkpoint(ckpt_root / f"step-{step + 1:06d}", policy, tok, {
                    "step": step + 1,
                    "trainable": trainable_state(policy),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "multipliers": multipliers, "torch_rng": torch.get_rng_state(),
                    "py_rng": random.getstate(), "np_rng": np.random.get_state(),
                    "cost_seconds": dict(timer.seconds), "tokens_generated": tokens_generated,
                    "eval_before": eval_before}, cfg.keep_checkpoints)
            acc.wait_for_everyone()
    bar.close()
    return close_run(acc, writer, lambda: evaluate("after"), eval_before, out, policy, tok, t_start=t_start,
                     timer=timer, amp=amp, tokens_generated=tokens_generated, steps=cfg.steps)
