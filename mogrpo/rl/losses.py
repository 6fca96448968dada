"""The GRPO policy loss (pure tensor function).

Shapes: N = B*G sequences, L completion tokens. Per token t of sequence i:

    ratio      = exp(logp - old_logp)                    (old = behaviour policy)
    surrogate  = min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
    kl (k3)    = exp(ref_logp - logp) - (ref_logp - logp) - 1      (Schulman's k3, >= 0,
                 unbiased for KL(pi || pi_ref) under samples from pi)
    per_token  = -(surrogate - beta * kl)

Aggregation over tokens, named after the paper that introduced it:
- `grpo`    (DeepSeekMath, arXiv 2402.03300): mean over each sequence's tokens, then mean
            over sequences; long and short completions weigh the same.
- `dapo`    (DAPO, arXiv 2503.14476): sum over all tokens / number of tokens in the batch;
            every token weighs the same.
- `dr_grpo` (Dr. GRPO, arXiv 2503.20783): sum over all tokens / (N * max_tokens), a
            constant, so no length bias from the normaliser.
A fully masked sequence contributes nothing under every aggregation.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref_logp - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None
              ) -> torch.Tensor:
    """Reduce per-token values [N, L] under mask [N, L] to a scalar."""
    m = mask.to(per_token.dtype)
    if how == "grpo":
        lengths = m.sum(-1)  # [N]
        per_seq = (per_token * m).sum(-1) / lengths.clamp(min=1.0)
        has = (lengths > 0).to(per_token.dtype)
        return (per_seq * has).sum() / has.sum().clamp(min=1.0)
    if how == "dapo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if how == "dr_grpo":
        denom = per_token.shape[0] * (max_tokens if max_tokens is not None else per_token.shape[1])
        return (per_token * m).sum() / max(denom, 1)
    raise ValueError(f"unknown loss aggregation {how!r}; choose one of {AGGREGATIONS}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.04, aggregation: str = "grpo",
              max_tokens: int | None = None, entropy: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + beta * k3 KL, aggregated; returns (loss, detached stats as 0-dim
    tensors on the loss's device, so a training loop reads them once per step).

    logp, old_logp, ref_logp, mask, entropy: [N, L]; advantages: [N]. `ref_logp` may be
    None when beta == 0. `max_tokens` is the dr_grpo constant (default: L).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [N, L] shape")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [N={logp.shape[0]}] (one per sequence, GRPO) or "
                         f"[N, L] (one per token, PPO), got {tuple(advantages.shape)}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv  # [N, 1] or [N, L]
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)  # [N, L]
    per_token = -surrogate
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta != 0:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_tokens)

    # 0-dim tensors on the loss's device: no device sync here (the caller reduces once a step)
    with torch.no_grad():
        n_tok = m.sum().clamp(min=1.0)
        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        big = torch.finfo(ratio.dtype).max
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        live = mask.bool()
        any_live = live.any()  # no tokens: the ratios are reported as 1
        stats = {
            "loss": loss.detach(),
            "policy_loss": aggregate(-surrogate, mask, aggregation, max_tokens),
            "kl": (kl * m).sum() / n_tok if kl is not None else torch.zeros_like(n_tok),
            "clip_fraction": (is_clipped.to(m.dtype) * m).sum() / n_tok,
            "ratio/min": torch.where(any_live, torch.where(live, ratio, big).min(), one),
            "ratio/max": torch.where(any_live, torch.where(live, ratio, -big).max(), one),
            "entropy": ((entropy * m).sum() / n_tok if entropy is not None
                        else torch.full_like(n_tok, float("nan"))),
        }
    return loss, stats


# ----------------------------------------------------------------------------- PPO-RLHF


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of [N, L] (population std)."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., arXiv 1506.02438), per token.

    rewards, values, mask: [N, L]; masked positions are past the end of the sequence
    (value 0 there, so the last real token bootstraps from 0). Returns (advantages,
    returns) [N, L] with returns = advantages + values, zero where masked:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    """
    m = mask.to(values.dtype)
    v = values * m
    L = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(L)):
        next_v = v[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2): 0.5 * mean over tokens of max((V - R)^2, (V_clip - R)^2),
    V_clip = old_V + clip(V - old_V, -clip, clip). All [N, L]."""
    m = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    n = m.sum().clamp(min=1.0)
    loss = 0.5 * (err * m).sum() / n
    with torch.no_grad():
        frac = (((values - returns) ** 2 < (clipped - returns) ** 2).to(m.dtype) * m).sum() / n
    return loss, {"value_loss": loss.detach(), "value_clip_fraction": frac}


# ----------------------------------------------------------------------------- DPO


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al., arXiv 2305.18290) or IPO (Azar et al., arXiv 2310.12036).

    Inputs are summed sequence log-probs [P] of the chosen and rejected responses under
    the policy and the reference. With h = (pc - rc) - (pr - rr):
        sigmoid (DPO): -log sigmoid(beta * h)
        ipo:           (h - 1 / (2 * beta))^2
    For IPO with `chosen_len`/`rejected_len` [P] given, each log-ratio is divided by its
    response length first (per-token average), so the squared loss does not grow with
    length; this is the form the IPO results correspond to (as TRL documents it).
    Returns the mean loss and stats (reward margin = beta * h, accuracy = h > 0).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # [P]
    if loss_type == "sigmoid":
        losses = -torch.nn.functional.logsigmoid(beta * h)
    elif loss_type == "ipo":
        if chosen_len is not None and rejected_len is not None:
            hi = ((policy_chosen - ref_chosen) / chosen_len.clamp(min=1)
                  - (policy_rejected - ref_rejected) / rejected_len.clamp(min=1))
        else:
            hi = h
        losses = (hi - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' (DPO) or 'ipo', got {loss_type!r}")
    loss = losses.mean()
    with torch.no_grad():
        stats = {"loss": loss.detach(), "reward_margin": (beta * h).mean(),
                 "reward_accuracy": (h > 0).float().mean(),
                 "chosen_reward": (beta * (policy_chosen - ref_chosen)).mean(),
                 "rejected_reward": (beta * (policy_rejected - ref_rejected)).mean()}
    return loss, stats
