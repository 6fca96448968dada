"""PPO-RLHF baseline on the same engine: actor + separate critic.

    rollout (same sampler as GRPO) -> score [B, G, K] -> combined scalar per sequence
    -> per-token reward: -beta * (logp - ref_logp) on every token, + score on the last
    -> values from the critic -> GAE (gamma, lambda) -> whitened advantages
    -> num_iterations passes over shuffled minibatches: clipped policy loss + vf_coef * clipped
    value loss
    -> log -> checkpoint

Standard RLHF PPO (Ouyang et al. 2022; Stiennon et al. 2020; the N+ implementation
details of Huang et al. 2024). The critic is a copy of the policy's backbone with a scalar
head (LoRA on it too when LoRA is on), so it costs a second model's memory and a second
forward/backward per minibatch: that is the cost GRPO removes. Everything else (rollout,
reward model, weights, logging, checkpoints, cost accounting) is the run engine's
(mogrpo/rl/engine.py), as for GRPO. Under `accelerate launch` each process samples its
share of the prompts, advantages are whitened over the global batch, and every global
minibatch is split over the processes so that the update equals the single-process one.
Shapes: N = B*G sequences, L completion tokens, K aspects, H hidden size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mogrpo import packing
from mogrpo.config import field
from mogrpo.rl import trl_names
from mogrpo.rl.config import OnlineConfig, check_batch_splits
from mogrpo.rl.engine import Run
from mogrpo.rl.losses import gae, grpo_loss, value_loss
from mogrpo.runtime import all_sum, owned_share


@dataclass
class PPOConfig(OnlineConfig):
    """Config of `mogrpo train ppo` (YAML keys = field names; shared keys in PolicyRunConfig
    and OnlineConfig; TRL's PPO names with their meaning, docs/trl.md)."""

    ALIASES: ClassVar[dict] = {**OnlineConfig.ALIASES, "save_steps": "save_every",
                               "response_length": "max_new_tokens"}
    REFUSED: ClassVar[dict] = {**OnlineConfig.REFUSED, **trl_names.REFUSED_PPO}

    lr: float = field(6e-4, help="AdamW learning rate of the actor")
    critic_lr: float = field(6e-4, help="AdamW learning rate of the critic")
    weight_decay: float = field(0.01, help="AdamW weight decay (actor and critic)")
    minibatch_size: int = field(16,
                                help="sequences per optimiser step (one pass, one step: like GRPO)")
    gamma: float = field(1.0, help="GAE discount")
    lam: float = field(0.95, help="GAE lambda")
    cliprange_value: float = field(0.2, help="value clip")
    vf_coef: float = field(0.5, help="value loss coefficient")
    whiten_advantages: bool = field(True, help="whiten advantages over the batch")

    @classmethod
    def optimizer_steps(cls, data: dict) -> int | None:
        get = lambda name: int(trl_names.value(cls, data, name))  # noqa: E731
        return get("steps") * get("num_iterations") * (get("batch_size") // get("minibatch_size"))

    @classmethod
    def translate_names(cls, data: dict) -> dict:
        """TRL's PPO sizes and total_episodes (rl/trl_names.py), then the shared names."""
        trl_names.translate_ppo(cls, data)
        return trl_names.translate_policy(cls, data, cls.optimizer_steps)

    def __post_init__(self) -> None:
        self.check()
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size = {self.batch_size} must be a multiple of "
                             f"minibatch_size = "
                             f"{self.minibatch_size}")
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
        self.shared_prefix = True  # set by the trainer from its config (off: every sequence whole)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                n_completion: int) -> torch.Tensor:
        """Values [N, L] (0 after the last real completion token of every row); sequences
        sharing a prompt encode it once, as in `rollout.completion_logprobs`."""
        inputs, packed, width = packing.model_inputs(self.backbone, input_ids, attention_mask,
                                                     n_completion,
                                                     self.shared_prefix)
        hidden = self.backbone(**inputs).last_hidden_state  # [rows, T, H]
        if packed is not None:
            h = hidden[:, packed.keep].reshape(-1, width, hidden.shape[-1])  # [R*S, L', H]
            return packed.unpack(self.head(h.float()).squeeze(-1))
        v = self.head(hidden[:, -width - 1:-1].float()).squeeze(-1)  # [N, L']
        return nn.functional.pad(v, (0, n_completion - width))


def load_critic(policy_path: str, lora_r: int, lora_alpha: int, target_modules,
                dtype: torch.dtype = torch.float32) -> ValueModel:
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(policy_path, dtype=dtype)
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone,
                                  LoraConfig(r=lora_r, lora_alpha=lora_alpha,
                                             target_modules=target_modules or "all-linear",
                                             task_type="FEATURE_EXTRACTION"))
    return ValueModel(backbone)


def global_whiten(x: torch.Tensor, mask: torch.Tensor, all_sum=lambda t: t,
                  eps: float = 1e-8) -> torch.Tensor:
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


STAT_KEYS = ("loss", "policy_loss", "clip_fraction", "entropy", "value_loss", "value_clip_fraction")


def train_ppo(cfg: PPOConfig, output: str | os.PathLike, *, resume: bool = False,
              show_progress: bool = True, **objects) -> dict:
    """Each process samples its share of the step's prompts (whole groups), advantages are
    whitened over the global batch, and each global minibatch is split by ownership with
    weights that make the averaged gradient equal the single-process one (`owned_share`).
    `objects` (reward_sources, files, callbacks) go to the run (rl/engine.Run), as the trainer
    API passes them."""
    from mogrpo.models import cast_frozen_linears, resolve_policy_path
    from mogrpo.rollout import completion_logprobs

    run = Run(cfg, output, name="ppo", resume=resume, show_progress=show_progress, **objects,
              check_world=check_batch_splits(cfg.batch_size, cfg.group_size))
    acc, sum_ = run.acc, all_sum(run.acc)
    if run.runtime.sharding in ("fsdp", "deepspeed"):
        raise ValueError(f"PPO trains two models (actor and critic) and accelerate's "
                         f"{run.runtime.sharding} prepares one per run: run PPO on one process "
                         f"or with DDP (configs/accelerate/ddp.yaml); GRPO, RLOO and DPO run "
                         f"sharded")
    critic = load_critic(resolve_policy_path(cfg.policy, cfg.cache_dir), cfg.lora_r, cfg.lora_alpha,
                         cfg.lora_target_modules, run.policy_dtype)
    cast_frozen_linears(critic, run.amp)  # its frozen backbone too (models.cast_frozen_linears)
    critic.shared_prefix = cfg.shared_prefix
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    n_mb = cfg.batch_size // cfg.minibatch_size
    (critic,) = run.setup_optimizer(cfg.steps * cfg.num_iterations * n_mb, modules=(critic,),
                                    groups=[
        {"params": run.trainable, "lr": cfg.lr}, {"params": critic_params, "lr": cfg.critic_lr}])
    # FSDP replaces the parameters
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    value_net = acc.unwrap_model(critic)  # no-grad passes, saving
    N_local = run.prompts_per_process() * cfg.group_size

    def step(t: int) -> dict:
        ro = run.rollout(t)
        rewards = run.score(ro)  # [B_local, G, K]
        # [N_local]
        score = torch.nan_to_num(run.objective.combine(rewards)).reshape(-1).to(run.device)
        ids, attn = ro.input_ids.to(run.device), ro.attention_mask.to(run.device)
        mask = ro.completion_mask.to(run.device).float()  # [N_local, L]
        L = mask.shape[1]
        # [N] tokens per sequence, every process's rows in order
        lengths = acc.gather(mask.sum(1)).cpu()
        with run.timer("policy_forward_backward"):
            old_logp = run.logprobs(run.policy, ids, attn, L)
        ref_logp = run.ref_logprobs(ids, attn, L)
        with torch.no_grad():
            with run.timer("critic"), run.amp_ctx():
                old_values = value_net(ids, attn, L).float() * mask
            # per-token reward: KL penalty everywhere, the sequence score on the last real token
            kl = (old_logp - ref_logp) * mask
            tok_rewards = -cfg.beta * kl
            last = (mask.sum(1) - 1).clamp(min=0).long()
            tok_rewards[torch.arange(len(last), device=last.device),
                        last] += score.to(tok_rewards.dtype)
            # per sequence: local
            adv, returns = gae(tok_rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = global_whiten(adv, mask, sum_)  # over the global batch
        # which forced openers the actor trains on, as in GRPO; a sample's opener advantage is
        # the mean of its per-token advantages over the opener tokens
        credit = {}
        if ro.opener_len is not None:
            opener = (torch.arange(L, device=run.device)[None, :]
                      < ro.opener_len.to(run.device)[:, None]).float()
            opener_adv = (adv * opener).sum(1) / opener.sum(1).clamp(min=1)  # [N_local]
            credit = run.credit_openers(ro, opener_adv)
        # [N_local, L] tokens the actor's loss trains
        actor_mask = ro.trained_mask.to(run.device).float()
        # ---- num_iterations passes over minibatches of the global batch: the same seeded
        # permutation on every process; each process takes the members it holds, its loss
        # weighted by its token share (x world, as DDP averages): the 1-process update.
        perm_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t)
        # per minibatch, on the device (read once per step): statistics, pre-clip norms (actor,
        # critic)
        stats = torch.zeros(cfg.num_iterations * n_mb, len(STAT_KEYS), dtype=torch.float64,
                            device=run.device)
        norms = torch.zeros(cfg.num_iterations * n_mb, 2, device=run.device)
        critic.train()
        k = 0
        for _ in range(cfg.num_iterations):
            perm = torch.randperm(cfg.batch_size, generator=perm_gen).tolist()
            for s in range(0, cfg.batch_size, cfg.minibatch_size):
                mine, weight = owned_share(perm[s:s + cfg.minibatch_size], N_local, run.rank,
                                           lengths)
                # A process holding none of the minibatch still runs forward/backward (on one of
                # its rows, weight 0) so that DDP's gradient all-reduce has every process.
                mb = torch.tensor(mine or [0], device=run.device)
                with run.timer("policy_forward_backward"), run.amp_ctx():
                    logp, ent = completion_logprobs(run.model, ids[mb], attn[mb], L,
                                                    temperature=cfg.temperature,
                                                    with_entropy=True,
                                                    shared_prefix=cfg.shared_prefix)
                    pg, st = grpo_loss(logp, old_logp[mb], None, adv[mb], actor_mask[mb],
                                       eps_low=cfg.eps_low,
                                       eps_high=cfg.eps_high, beta=0.0, aggregation="dapo",
                                       entropy=ent)
                with run.timer("critic"), run.amp_ctx():
                    v = critic(ids[mb], attn[mb], L).float()
                    vf, vst = value_loss(v, old_values[mb], returns[mb], mask[mb],
                                         cfg.cliprange_value)
                with run.timer("policy_forward_backward"):
                    run.opt.zero_grad(set_to_none=True)
                    acc.backward((pg + cfg.vf_coef * vf) * weight)
                    # after backward, so on the all-reduced gradients: global norms, clipped apart
                    norms[k] = torch.stack(run.optimizer_step(run.trainable, critic_params))
                st = {**st, **vst}
                stats[k] = (torch.stack([st[key].double() for key in STAT_KEYS])
                            * (weight / run.world))
                k += 1
        # ---- log: global figures (sums over processes)
        stats = sum_(stats).cpu()  # per minibatch: token means over the whole minibatch
        norms = norms.cpu()
        sums = sum_(torch.stack([kl.sum(), mask.sum(), (adv * mask).sum(), (adv ** 2 * mask).sum(),
                                 old_values.sum()]).to(torch.float64)).cpu()
        n_tok = float(sums[1].clamp(min=1))
        adv_var = (float(sums[3]) - float(sums[2]) ** 2 / n_tok) / max(n_tok - 1, 1)
        rec = {**run.rollout_record(ro, rewards), "kl": float(sums[0]) / n_tok,
               "advantage/std": max(adv_var, 0.0) ** 0.5, "value/mean": float(sums[4]) / n_tok,
               "grad_norm": float(norms[:, 0].mean()), "critic_grad_norm": float(norms[:,
                                                                                       1].mean())}
        rec.update({key: float(stats[:, j].mean()) for j, key in enumerate(STAT_KEYS)})
        rec.update(credit)
        run.log_samples(t + 1, ro, rewards)
        return rec

    return run.train(cfg.steps, step, state=lambda: {"critic": run.runtime.module_state(critic)},
                     load_state=lambda s: run.runtime.load_module_state(critic, s["critic"]),
                     postfix=("reward/combined/mean", "kl"))
