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
reward model, weights, logging, checkpoints, cost accounting) is GRPO's.
Shapes: N = B*G sequences, L completion tokens, K aspects, H hidden size.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mogrpo.config import field
from mogrpo.rl.advantages import weighted_sum
from mogrpo.rl.common import (PhaseTimer, PolicyRunConfig, finish_run, load_latest_checkpoint, load_prompt_set,
                              peak_memory_mb, save_checkpoint, setup_single_process_run, step_prompt_indices,
                              trainable_state)
from mogrpo.rl.losses import gae, grpo_loss, value_loss, whiten


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


def train_ppo(cfg: PPOConfig, output: str | os.PathLike, *, resume: bool = False,
              show_progress: bool = True) -> dict:
    from transformers import get_scheduler

    from mogrpo.eval.quick import evaluate_policy
    from mogrpo.models import resolve_policy_path
    from mogrpo.rl.rollout import completion_logprobs, generate_rollout

    t_start = time.time()
    run = setup_single_process_run(cfg, output, "ppo")
    acc, out, scorer, weights, amp, amp_ctx = run.acc, run.out, run.scorer, run.weights, run.amp, run.amp_ctx
    model, tok, ref_model, eval_prompts = run.model, run.tok, run.ref_model, run.eval_prompts
    critic = load_critic(resolve_policy_path(cfg.policy, cfg.cache_dir), cfg.lora_r, cfg.lora_alpha,
                         cfg.lora_target_modules)
    actor_params = [p for p in model.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": actor_params, "lr": cfg.lr},
                             {"params": critic_params, "lr": cfg.critic_lr}])
    n_mb = cfg.batch_size // cfg.minibatch_size
    total_updates = cfg.steps * cfg.ppo_epochs * n_mb
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=total_updates)
    G = cfg.samples_per_prompt
    B = cfg.batch_size // G
    train_prompts = load_prompt_set(cfg.train_prompts, cfg.cache_dir, "train")

    def evaluate(tag):
        return evaluate_policy(acc, model, tok, scorer, eval_prompts, weights,
                               max_new_tokens=cfg.eval_max_new_tokens, autocast_dtype=amp,
                               out_file=out / f"eval_{tag}_generations.jsonl")

    timer = PhaseTimer()
    tokens_generated, start_step, eval_before = 0, 0, None
    ckpt_root = out / "checkpoints"
    state = load_latest_checkpoint(ckpt_root, model, opt, sched) if resume else None
    if state is not None:
        critic.load_state_dict(state["critic"])
        start_step, eval_before = state["step"], state.get("eval_before")
        timer.seconds, tokens_generated = state["cost_seconds"], state["tokens_generated"]
        torch.set_rng_state(state["torch_rng"])
    if eval_before is None:
        with timer("evaluation"):
            eval_before = evaluate("before")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    metrics_path = out / "metrics.jsonl"
    if not resume:
        metrics_path.write_text("")
    bar = tqdm(range(start_step, cfg.steps), desc="ppo", disable=not show_progress, initial=start_step,
               total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        batch = [train_prompts[i] for i in step_prompt_indices([p.kind for p in train_prompts], B, step,
                                                               cfg.seed, False)]
        with timer("generation"), amp_ctx():
            ro = generate_rollout(model, tok, [p.text for p in batch], [p.kind for p in batch], group_size=G,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  seed=cfg.seed, step=step, first_index=0,
                                  chunk_prompts=cfg.generation_chunk or None)
        n_tokens = int(ro.completion_mask.sum())
        tokens_generated += n_tokens
        with timer("scoring"):
            rewards = scorer.score(ro.prompts, ro.kinds, ro.completions, G)  # [B, G, K]
        score = torch.nan_to_num(weighted_sum(rewards, weights)).reshape(-1)  # [N]
        ids, attn = ro.input_ids.to(acc.device), ro.attention_mask.to(acc.device)
        mask = ro.completion_mask.to(acc.device).float()  # [N, L]
        L = mask.shape[1]
        with torch.no_grad():
            with timer("policy_forward_backward"), amp_ctx():
                old_logp = completion_logprobs(model, ids, attn, L, temperature=cfg.temperature)[0]
            with timer("reference"), amp_ctx(), (model.disable_adapter() if ref_model is None else nullcontext()):
                ref_logp = completion_logprobs(ref_model or model, ids, attn, L, temperature=cfg.temperature)[0]
            with timer("critic"), amp_ctx():
                old_values = critic(ids, attn, L).float() * mask
            # per-token reward: KL penalty everywhere, the sequence score on the last real token
            kl = (old_logp - ref_logp) * mask
            tok_rewards = -cfg.kl_coef * kl
            last = (mask.sum(1) - 1).clamp(min=0).long()
            tok_rewards[torch.arange(len(last)), last] += score.to(tok_rewards.dtype)
            adv, returns = gae(tok_rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = whiten(adv, mask)
        stats = []
        model.train()
        critic.train()
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(score))
            for s in range(0, len(perm), cfg.minibatch_size):
                mb = perm[s:s + cfg.minibatch_size]
                with timer("policy_forward_backward"), amp_ctx():
                    logp, ent = completion_logprobs(model, ids[mb], attn[mb], L, temperature=cfg.temperature,
                                                    with_entropy=True)
                    pg, st = grpo_loss(logp, old_logp[mb], None, adv[mb], mask[mb], eps_low=cfg.cliprange,
                                       eps_high=cfg.cliprange, beta=0.0, aggregation="dapo", entropy=ent)
                with timer("critic"), amp_ctx():
                    v = critic(ids[mb], attn[mb], L).float()
                    vf, vst = value_loss(v, old_values[mb], returns[mb], mask[mb], cfg.cliprange_value)
                with timer("policy_forward_backward"):
                    loss = pg + cfg.vf_coef * vf
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(actor_params, cfg.grad_clip)
                        torch.nn.utils.clip_grad_norm_(critic_params, cfg.grad_clip)
                    opt.step()
                    sched.step()
                stats.append({**st, **vst})
        rec = {"step": step + 1, "lr": sched.get_last_lr()[0], "step_seconds": round(time.perf_counter() - t0, 3),
               "tokens_per_s": round(n_tokens / max(time.perf_counter() - t0, 1e-9), 2),
               "peak_memory_mb": round(peak_memory_mb(acc.device), 1),
               "completion_length": float(ro.completion_mask.sum(1).float().mean()),
               "kl": float(kl.sum() / mask.sum().clamp(min=1)),
               "reward/combined/mean": float(score.mean()),
               "advantage/std": float(adv[mask.bool()].std()) if mask.any() else 0.0,
               "value/mean": float((old_values * mask).sum() / mask.sum().clamp(min=1))}
        for key in ("loss", "policy_loss", "clip_fraction", "entropy", "value_loss", "value_clip_fraction"):
            rec[key] = float(np.mean([s[key] for s in stats]))
        flat = rewards.reshape(-1, rewards.shape[-1])
        for j, c in enumerate(scorer.columns):
            col = flat[:, j][~torch.isnan(flat[:, j])]
            rec[f"reward/{c}/mean"] = float(col.mean()) if col.numel() else None
            rec[f"reward/{c}/std"] = float(col.std(unbiased=False)) if col.numel() else None
        with metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        for key, val in rec.items():
            if key != "step" and isinstance(val, (int, float)):
                writer.add_scalar(key, val, step + 1)
        bar.set_postfix(reward=f"{rec['reward/combined/mean']:.3f}", kl=f"{rec['kl']:.4f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt_root / f"step-{step + 1:06d}", model, tok, {
                "step": step + 1, "trainable": trainable_state(model),
                "critic": critic.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "cost_seconds": dict(timer.seconds), "tokens_generated": tokens_generated,
                "eval_before": eval_before, "torch_rng": torch.get_rng_state()}, cfg.keep_checkpoints)
    bar.close()
    writer.close()
    with timer("evaluation"):
        eval_after = evaluate("after")
    return finish_run(out, model, tok, {"eval_before": eval_before, "eval_after": eval_after}, t_start=t_start,
                      timer=timer, device=acc.device, amp=amp, tokens_generated=tokens_generated,
                      steps=cfg.steps, processes=1)
