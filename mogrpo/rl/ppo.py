"""PPO-RLHF baseline on the same engine: actor + separate critic.

    rollout (same sampler as GRPO) -> score [B, G, K] -> combined scalar per sequence
    -> per-token reward: -kl_coef * (logp - ref_logp) on every token, + score on the last
    -> values from the critic -> GAE (gamma, lambda) -> whitened advantages
    -> ppo_epochs over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss
    -> log -> checkpoint

Standard RLHF PPO (Ouyang et al. 2022; Stiennon et al. 2020; the N+ implementation
details of Huang et al. 2024). The critic is a copy of the policy's backbone with a scalar
head (LoRA on it too when LoRA is on), so it costs a second model's memory and a second
forward/backward per minibatch: that is the cost GRPO removes. Everything else (rollout,
reward model, weights, logging, checkpoints, cost accounting) is GRPO's, and so is the
multi-process scheme: under `accelerate launch` each process samples its share of the
prompts, advantages are whitened over the global batch, and every global minibatch is
split over the processes so that the update equals the single-process one.
Shapes: N = B*G sequences, L completion tokens, K aspects, H hidden size.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from mogrpo.config import field
from mogrpo.rl.advantages import weighted_sum
from mogrpo.rl.common import (PhaseTimer, PolicyRunConfig, all_sum, check_guided, close_run, judge_rates,
                              load_latest_checkpoint, load_prompt_set, log_metrics, open_metrics, owned_share,
                              peak_memory_mb, rollout_kwargs, save_checkpoint, setup_run, step_prompt_indices,
                              trainable_state)
from mogrpo.rl.losses import gae, grpo_loss, value_loss


@dataclass
class PPOConfig(PolicyRunConfig):
    """Config of `mogrpo train ppo` (YAML keys = field names; shared keys in PolicyRunConfig)."""

    batch_size: int = field(16, help="sequences sampled per step (same rollout budget as GRPO)")
    samples_per_prompt: int = field(4, help="samples per prompt (GRPO's G, for an identical rollout)")
    generation_chunk: int = field(0, help="prompts per generate call (0 = all)")
    steps: int = field(50, help="training steps (rollouts)")
    ppo_epochs: int = field(2, help="mu: passes over each rollout")
    minibatch_size: int = field(8, help="sequences per optimiser step")
    lr: float = field(2e-4, help="AdamW learning rate of the actor")
    critic_lr: float = field(2e-4, help="AdamW learning rate of the critic")
    warmup_steps: int = field(2, help="linear warm-up (optimiser steps)")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off)")
    kl_coef: float = field(0.04, help="beta: per-token KL penalty in the reward")
    gamma: float = field(1.0, help="GAE discount")
    lam: float = field(0.95, help="GAE lambda")
    cliprange: float = field(0.2, help="policy ratio clip")
    cliprange_value: float = field(0.2, help="value clip")
    vf_coef: float = field(0.5, help="value loss coefficient")
    whiten_advantages: bool = field(True, help="whiten advantages over the batch")

    def __post_init__(self) -> None:
        check_guided(self.guided_samples, self.samples_per_prompt, "samples_per_prompt")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"batch_size = {self.batch_size} is not divisible by samples_per_prompt = "
                             f"{self.samples_per_prompt}")
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size = {self.batch_size} must be a multiple of minibatch_size = "
                             f"{self.minibatch_size}")
        for name in ("steps", "ppo_epochs", "minibatch_size", "max_new_tokens", "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not (0 <= self.lam <= 1 and 0 <= self.gamma <= 1):
            raise ValueError("gamma and lam must be in [0, 1]")


class ValueModel(nn.Module):
    """Critic: the policy's backbone (a separate copy) and a scalar head. V(s_t) for the state
    before each completion token t, read from the hidden state of the previous position."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int) -> torch.Tensor:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # [N, T, H]
        h = hidden[:, -n_completion - 1:-1]  # [N, L, H]
        return self.head(h.float()).squeeze(-1)  # [N, L]


def load_critic(policy_path: str, lora_r: int, lora_alpha: int, target_modules) -> ValueModel:
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(policy_path, dtype=torch.float32)
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(r=lora_r, lora_alpha=lora_alpha,
                                                       target_modules=target_modules or "all-linear",
                                                       task_type="FEATURE_EXTRACTION"))
    return ValueModel(backbone)


def global_whiten(x: torch.Tensor, mask: torch.Tensor, all_sum=lambda t: t, eps: float = 1e-8) -> torch.Tensor:
    """`whiten` over the masked entries of every process's [N_local, L] together.

    `all_sum` sums a tensor over the processes (identity for one process). Two passes, as
    `whiten` computes them: the global sum and count give the mean, then the global sum of
    squared deviations gives the (population) variance; sums are in float64, so the result
    does not depend on how the rows are split over processes beyond rounding.
    """
    m = mask.to(torch.float64)
    xd = x.to(torch.float64)
    s = all_sum(torch.stack([(xd * m).sum(), m.sum()]))
    n = s[1].clamp(min=1.0)
    mean = s[0] / n
    var = all_sum((((xd - mean) * m) ** 2).sum()) / n
    return ((xd - mean) * torch.rsqrt(var + eps) * m).to(x.dtype)


def prompts_per_process(batch_size: int, group: int, world: int) -> int:
    """Prompts each process samples per step: batch_size sequences = whole groups of
    `group` samples, shared evenly over `world` processes (else a ValueError)."""
    if batch_size % (group * world):
        raise ValueError(f"batch_size = {batch_size} must split into whole prompt groups over {world} "
                         f"processes: use a multiple of samples_per_prompt * processes = {group * world}")
    return batch_size // (group * world)


STAT_KEYS = ("loss", "policy_loss", "clip_fraction", "entropy", "value_loss", "value_clip_fraction")


def train_ppo(cfg: PPOConfig, output: str | os.PathLike, *, resume: bool = False,
              show_progress: bool = True) -> dict:
    """Runs as one process or under `accelerate launch` (DDP): each process samples its share
    of the step's prompts (whole groups), advantages are whitened over the global batch, and
    each global minibatch is split by ownership with weights that make the averaged
    gradient equal the single-process one (see `owned_share`)."""
    from transformers import get_scheduler

    from mogrpo.eval.quick import evaluate_policy
    from mogrpo.models import MergedGenerationCopy, cast_frozen_linears, is_peft, resolve_policy_path
    from mogrpo.rl.rollout import completion_logprobs, generate_rollout

    G = cfg.samples_per_prompt
    t_start = time.time()
    run = setup_run(cfg, output, lambda world: prompts_per_process(cfg.batch_size, G, world))
    acc, world, rank, main = run.acc, run.world, run.rank, run.main
    out, scorer, weights, amp, amp_ctx = run.out, run.scorer, run.weights, run.amp, run.amp_ctx
    tok, ref_model, eval_prompts = run.tok, run.ref_model, run.eval_prompts
    sum_ = all_sum(acc)
    critic = load_critic(resolve_policy_path(cfg.policy, cfg.cache_dir), cfg.lora_r, cfg.lora_alpha,
                         cfg.lora_target_modules)
    cast_frozen_linears(critic, amp)  # its frozen backbone too (models.cast_frozen_linears)
    actor_params = [p for p in run.model.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": actor_params, "lr": cfg.lr},
                             {"params": critic_params, "lr": cfg.critic_lr}])
    n_mb = cfg.batch_size // cfg.minibatch_size
    total_updates = cfg.steps * cfg.ppo_epochs * n_mb
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=total_updates)
    merged = MergedGenerationCopy(run.model, amp) if (cfg.merged_generation and is_peft(run.model)) else None
    model, critic, opt, sched = acc.prepare(run.model, critic, opt, sched)
    policy, value_net = acc.unwrap_model(model), acc.unwrap_model(critic)  # no-grad passes, saving
    B = cfg.batch_size // G  # prompts per step, all processes
    B_local = prompts_per_process(cfg.batch_size, G, world)
    N_local = B_local * G
    train_prompts = load_prompt_set(cfg.train_prompts, cfg.cache_dir, "train")

    def evaluate(tag):
        return evaluate_policy(acc, policy, tok, scorer, eval_prompts, weights,
                               max_new_tokens=cfg.eval_max_new_tokens, autocast_dtype=amp,
                               out_file=out / f"eval_{tag}_generations.jsonl")

    timer = PhaseTimer()
    tokens_generated, start_step, eval_before = 0, 0, None
    ckpt_root = out / "checkpoints"
    state = load_latest_checkpoint(ckpt_root, policy, opt, sched) if resume else None
    if state is not None:
        value_net.load_state_dict(state["critic"])
        start_step, eval_before = state["step"], state.get("eval_before")
        timer.seconds, tokens_generated = state["cost_seconds"], state["tokens_generated"]
    if eval_before is None:
        with timer("evaluation"):
            eval_before = evaluate("before")
    metrics_path, writer = open_metrics(out, main, resume)
    bar = tqdm(range(start_step, cfg.steps), desc="ppo", disable=not (show_progress and main),
               initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        # ---- rollout: this process's share of the step's B prompts (global seeding)
        batch = [train_prompts[i] for i in step_prompt_indices([p.kind for p in train_prompts], B, step,
                                                               cfg.seed, cfg.balance_kinds)]
        local = batch[rank * B_local:(rank + 1) * B_local]
        with timer("generation"), amp_ctx():
            ro = generate_rollout(merged.sync() if merged else policy, tok, [p.text for p in local],
                                  [p.kind for p in local], group_size=G,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  seed=cfg.seed, step=step, first_index=rank * B_local,
                                  chunk_prompts=cfg.generation_chunk or None, **rollout_kwargs(cfg))
        with timer("scoring"):
            rewards = scorer.score(ro.prompts, ro.kinds, ro.completions, G)  # [B_local, G, K]
        score = torch.nan_to_num(weighted_sum(rewards, weights)).reshape(-1)  # [N_local]
        ids, attn = ro.input_ids.to(acc.device), ro.attention_mask.to(acc.device)
        mask = ro.completion_mask.to(acc.device).float()  # [N_local, L]
        L = mask.shape[1]
        lengths = acc.gather(mask.sum(1)).cpu()  # [N] tokens per sequence, every process's rows in order
        n_tokens = int(lengths.sum())
        tokens_generated += n_tokens
        with torch.no_grad():
            with timer("policy_forward_backward"), amp_ctx():
                old_logp = completion_logprobs(policy, ids, attn, L, temperature=cfg.temperature)[0]
            with timer("reference"), amp_ctx(), (policy.disable_adapter() if ref_model is None else nullcontext()):
                ref_logp = completion_logprobs(ref_model or policy, ids, attn, L, temperature=cfg.temperature)[0]
            with timer("critic"), amp_ctx():
                old_values = value_net(ids, attn, L).float() * mask
            # per-token reward: KL penalty everywhere, the sequence score on the last real token
            kl = (old_logp - ref_logp) * mask
            tok_rewards = -cfg.kl_coef * kl
            last = (mask.sum(1) - 1).clamp(min=0).long()
            tok_rewards[torch.arange(len(last)), last] += score.to(tok_rewards.dtype)
            adv, returns = gae(tok_rewards, old_values, mask, cfg.gamma, cfg.lam)  # per sequence: local
            if cfg.whiten_advantages:
                adv = global_whiten(adv, mask, sum_)  # over the global batch
        # ---- ppo_epochs over minibatches of the global batch: the same seeded permutation on
        # every process; each process takes the members it holds, its loss weighted by its
        # token share (x world, as DDP averages), so the update is the 1-process one.
        perm_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        stats = torch.zeros(cfg.ppo_epochs * n_mb, len(STAT_KEYS), dtype=torch.float64)
        norms = torch.zeros(cfg.ppo_epochs * n_mb, 2)  # pre-clip gradient norms: actor, critic
        model.train()
        critic.train()
        k = 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(cfg.batch_size, generator=perm_gen).tolist()
            for s in range(0, cfg.batch_size, cfg.minibatch_size):
                mine, weight = owned_share(perm[s:s + cfg.minibatch_size], N_local, rank, lengths)
                # A process holding none of the minibatch still runs forward/backward (on one of
                # its rows, weight 0) so that DDP's gradient all-reduce has every process.
                mb = torch.tensor(mine or [0], device=acc.device)
                with timer("policy_forward_backward"), amp_ctx():
                    logp, ent = completion_logprobs(model, ids[mb], attn[mb], L, temperature=cfg.temperature,
                                                    with_entropy=True)
                    pg, st = grpo_loss(logp, old_logp[mb], None, adv[mb], mask[mb], eps_low=cfg.cliprange,
                                       eps_high=cfg.cliprange, beta=0.0, aggregation="dapo", entropy=ent)
                with timer("critic"), amp_ctx():
                    v = critic(ids[mb], attn[mb], L).float()
                    vf, vst = value_loss(v, old_values[mb], returns[mb], mask[mb], cfg.cliprange_value)
                with timer("policy_forward_backward"):
                    loss = (pg + cfg.vf_coef * vf) * weight
                    opt.zero_grad(set_to_none=True)
                    acc.backward(loss)
                    # After backward, so on the all-reduced gradients: global norms, clipped separately
                    # (max_norm inf only measures).
                    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                    norms[k] = torch.stack([acc.clip_grad_norm_(actor_params, clip),
                                            acc.clip_grad_norm_(critic_params, clip)]).detach().cpu()
                    opt.step()
                    sched.step()
                st = {**st, **vst}
                stats[k] = torch.tensor([st[key] * weight / world for key in STAT_KEYS], dtype=torch.float64)
                k += 1
        # ---- log: global figures (sums over processes, gathered rewards)
        stats = sum_(stats.to(acc.device)).cpu()  # per minibatch: token means over the whole minibatch
        all_rewards = acc.gather(rewards.to(acc.device)).cpu()  # [B, G, K]
        all_score = acc.gather(score.to(acc.device)).cpu()  # [N]
        sums = sum_(torch.stack([kl.sum(), mask.sum(), (adv * mask).sum(), (adv ** 2 * mask).sum(),
                                 old_values.sum()]).to(torch.float64)).cpu()
        n_tok = float(sums[1].clamp(min=1))
        adv_var = (float(sums[3]) - float(sums[2]) ** 2 / n_tok) / max(n_tok - 1, 1)
        seconds = time.perf_counter() - t0
        rec = {"step": step + 1, "lr": sched.get_last_lr()[0], "step_seconds": round(seconds, 3),
               "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 2),
               "peak_memory_mb": round(peak_memory_mb(acc.device), 1),
               "completion_length": float(lengths.mean()),
               "kl": float(sums[0]) / n_tok,
               "reward/combined/mean": float(all_score.mean()),
               "advantage/std": max(adv_var, 0.0) ** 0.5,
               "value/mean": float(sums[4]) / n_tok,
               "grad_norm": float(norms[:, 0].mean()), "critic_grad_norm": float(norms[:, 1].mean())}
        for j, key in enumerate(STAT_KEYS):
            rec[key] = float(stats[:, j].mean())
        flat = all_rewards.reshape(-1, all_rewards.shape[-1])
        for j, c in enumerate(scorer.columns):
            col = flat[:, j][~torch.isnan(flat[:, j])]
            rec[f"reward/{c}/mean"] = float(col.mean()) if col.numel() else None
            rec[f"reward/{c}/std"] = float(col.std(unbiased=False)) if col.numel() else None
        rec.update(judge_rates(acc, ro))  # zero-weight columns: logged, never in the reward
        if main:
            log_metrics(metrics_path, writer, rec)
            bar.set_postfix(reward=f"{rec['reward/combined/mean']:.3f}", kl=f"{rec['kl']:.4f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            acc.wait_for_everyone()
            if main:
                save_checkpoint(ckpt_root / f"step-{step + 1:06d}", policy, tok, {
                    "step": step + 1, "trainable": trainable_state(policy),
                    "critic": value_net.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "cost_seconds": dict(timer.seconds),
                    "tokens_generated": tokens_generated, "eval_before": eval_before}, cfg.keep_checkpoints)
            acc.wait_for_everyone()
    bar.close()
    return close_run(acc, writer, lambda: evaluate("after"), eval_before, out, policy, tok, t_start=t_start,
                     timer=timer, amp=amp, tokens_generated=tokens_generated, steps=cfg.steps)
