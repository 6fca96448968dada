"""The policy's forwards and its clipped-surrogate update, as every rollout algorithm runs them
(GRPO, RLOO; PPO's actor shares the log-prob passes): token log-probs without gradients in
micro-batches of whole groups, and `policy_update`, cfg.num_iterations optimiser steps with
gradient accumulation. Shapes: N sequences (B prompts x G samples), L completion tokens."""

from __future__ import annotations

import torch

from mogrpo import packing


def setup_optimizer(run, total_updates: int, groups: list[dict] | None, modules: tuple) -> tuple:
    """AdamW (cfg.lr, cfg.weight_decay; `groups` may set their own lr) and cfg.lr_schedule with
    cfg.warmup_steps over `total_updates` optimiser steps; prepares the policy, the `modules`
    (e.g. PPO's critic), optimiser and scheduler for the processes and sets them on `run`.
    Returns the prepared modules."""
    from transformers import get_scheduler

    cfg, acc = run.cfg, run.acc
    opt = torch.optim.AdamW(groups or [{"params": run.trainable}], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=total_updates)
    if run.runtime.sharding == "deepspeed":  # mogrpo batches by itself; DeepSpeed needs a number
        ds = acc.state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = 1
    prepared = acc.prepare(run.model, *modules, opt, sched)
    run.model, run.opt, run.sched = prepared[0], prepared[-2], prepared[-1]
    run.policy = acc.unwrap_model(run.model)
    run.modules = list(prepared[1:-2])
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]  # FSDP replaces them
    # A full fine-tuning run's frozen reference copy stays whole on every process (its Linear
    # weights in the compute dtype): accelerate's FSDP2 prepares only models with an optimiser.
    return tuple(run.modules)


def micro_batches(prompt_mask: torch.Tensor, size: int, group_size: int) -> list[torch.Tensor]:
    """Index tensors of `size` sequences, whole groups ordered by prompt length (so a
    forward's rows need little left padding) when the rows are whole groups."""
    n, G = len(prompt_mask), group_size
    order = packing.bucketed_order(prompt_mask.cpu(), G) if n % G == 0 else list(range(n))
    order = torch.tensor(order, device=prompt_mask.device)
    return [order[s:s + size] for s in range(0, n, size)]


def logprobs(run, model, ids, attn, L: int, chunk: int = 0,
             temperature: float | None = None) -> torch.Tensor:
    """Token log-probs [N, L] without gradients, `chunk` rows per forward (0 = all), at the
    sampling temperature unless `temperature` is given."""
    from mogrpo.rollout import completion_logprobs

    temperature = run.cfg.temperature if temperature is None else temperature
    out = torch.zeros(len(ids), L, device=ids.device)
    with torch.no_grad(), run.amp_ctx():
        for mb in micro_batches(attn[:, :-L], chunk or len(ids), run.cfg.group_size):
            out[mb] = completion_logprobs(model, ids[mb], attn[mb], L, temperature=temperature,
                                          shared_prefix=run.cfg.shared_prefix)[0].float()
    return out


def policy_update(run, ro, adv: torch.Tensor, *, beta: float, aggregation: str,
                  micro_batch_size: int,
                  ref_logp: torch.Tensor | None = None,
                  old_logp: torch.Tensor | None = None) -> dict:
    """cfg.num_iterations passes of the clipped surrogate (+ beta * k3 KL to `ref_logp`) over
    this process's rollout with advantages `adv` [N], each pass one optimiser step with
    gradient accumulation over micro-batches, weighted by their share so that the accumulated
    gradient is the full batch's (1 x 8 == 8 x 1). Behaviour log-probs: `old_logp`, else one
    no-grad pass when there are several passes, else the training forward's own, detached
    (with one pass they are equal). Returns the step's stats."""
    from mogrpo.rl.losses import grpo_loss
    from mogrpo.rollout import completion_logprobs

    cfg = run.cfg
    ids, attn = ro.input_ids.to(run.device), ro.attention_mask.to(run.device)  # [N, P + L]
    cmask = ro.trained_mask.to(run.device)  # [N, L]
    adv = adv.to(run.device)
    N, L = cmask.shape
    # index tensors
    micro = micro_batches(ro.prompt_mask.to(run.device), micro_batch_size, cfg.group_size)
    if old_logp is None and cfg.num_iterations > 1:
        with run.timer("policy_forward_backward"):
            old_logp = logprobs(run, run.policy, ids, attn, L, chunk=micro_batch_size)
    # [N] on the CPU: the micro-batches' shares without device syncs
    counts = ro.trained_mask.sum(1)
    n_tok = float(counts.sum().clamp(min=1))
    shares = [float(counts[mb.cpu()].sum()) / n_tok if aggregation == "dapo" else len(mb) / N
              for mb in micro]
    stats, norm = [], torch.zeros(())
    with run.timer("policy_forward_backward"):
        for _ in range(cfg.num_iterations):
            run.opt.zero_grad(set_to_none=True)
            for j, mb in enumerate(micro):
                with run.runtime.no_sync(run.model, j == len(micro) - 1):
                    with run.amp_ctx():
                        logp, ent = completion_logprobs(run.model, ids[mb], attn[mb], L,
                                                        temperature=cfg.temperature,
                                                        with_entropy=cfg.log_entropy,
                                                        shared_prefix=cfg.shared_prefix)
                    old = old_logp[mb] if old_logp is not None else logp.detach()
                    loss, st = grpo_loss(logp, old, None if ref_logp is None else ref_logp[mb],
                                         adv[mb],
                                         cmask[mb], eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                         beta=beta,
                                         aggregation=aggregation, max_tokens=cfg.max_new_tokens,
                                         entropy=ent)
                    run.acc.backward(loss * shares[j])
                    stats.append((shares[j], st))  # tensors on the device: read once, below
            norm = run.optimizer_step()[0]
    # One device-to-host transfer per step for every statistic (not one per micro-batch).
    mean_keys = ("loss", "policy_loss", "kl", "clip_fraction", "entropy")
    means = torch.stack([sum(st[k].float() * w for w,
                             st in stats) / cfg.num_iterations for k in mean_keys])
    lo = torch.stack([st["ratio/min"].float() for _, st in stats]).min()
    hi = torch.stack([st["ratio/max"].float() for _, st in stats]).max()
    values = torch.cat([means, torch.stack([lo, hi, norm.to(means.device)])]).tolist()
    return dict(zip((*mean_keys, "ratio/min", "ratio/max", "grad_norm"), values))
