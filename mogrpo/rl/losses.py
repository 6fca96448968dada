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
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + beta * k3 KL, aggregated; returns (loss, detached stats).

    logp, old_logp, ref_logp, mask, entropy: [N, L]; advantages: [N]. `ref_logp` may be
    None when beta == 0. `max_tokens` is the dr_grpo constant (default: L).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [N, L] shape")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N={logp.shape[0]}], got {tuple(advantages.shape)}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]  # [N, 1]
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

    with torch.no_grad():
        n_tok = m.sum().clamp(min=1.0)
        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        big = torch.finfo(ratio.dtype).max
        stats = {
            "loss": float(loss),
            "policy_loss": float(aggregate(-surrogate, mask, aggregation, max_tokens)),
            "kl": float((kl * m).sum() / n_tok) if kl is not None else 0.0,
            "clip_fraction": float((is_clipped.to(m.dtype) * m).sum() / n_tok),
            "ratio/min": float(torch.where(mask.bool(), ratio, torch.full_like(ratio, big)).min())
            if mask.any() else 1.0,
            "ratio/max": float(torch.where(mask.bool(), ratio, torch.full_like(ratio, -big)).max())
            if mask.any() else 1.0,
            "entropy": float((entropy * m).sum() / n_tok) if entropy is not None else float("nan"),
        }
    return loss, stats
