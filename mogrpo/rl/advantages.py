"""Group-relative advantages from multi-aspect rewards (pure tensor functions).

Shapes: B prompts, G samples per prompt, K reward aspects. Rewards are [B, G, K] with
NaN where an aspect does not apply to a sample; NaN is masked, never read as zero.

Modes (docs/theory.md derives each one and the properties the tests check):

- `sum_then_normalize` (the paper, arXiv 2503.21819; DeepSeekMath's GRPO normalisation):
  r = sum_k w_k r_k over the aspects present (weights renormalised over them), then
  A = (r - mean_group(r)) / (std_group(r) + eps).
- `normalize_then_sum` (GDPO arXiv 2601.05242, MO-GRPO arXiv 2509.22047): each aspect is
  normalised within its group first, z_k = (r_k - mean_group) / (std_group + eps) (a NaN
  cell gets z = 0, the group's neutral value), then A = sum_k w_k z_k, then A is
  normalised over the whole batch. Invariant to an affine rescaling of any one aspect.
- `min` (Chebyshev scalarisation): r = min_k w_k r_k, the worst weighted aspect, then
  group-normalised like the paper's mode; favours a balanced policy.
- `lagrangian` (Safe RLHF, arXiv 2310.12773, made critic-free): aspects with a threshold
  tau_c are constraints r_c >= tau_c with multipliers lambda_c >= 0;
  r = (sum_{k not constrained} w_k r_k + sum_c lambda_c r_c) / (1 + sum_c lambda_c),
  then group-normalised. `update_multipliers` does the dual ascent step
  lambda_c <- max(0, lambda_c + lr * (tau_c - mean_batch(r_c))).

`scale_rewards` (TRL's name and values) says which std divides: "group" (the above), "batch"
(the std over the whole batch, every group of every process, instead of each group's: PPO Lite,
arXiv 2508.08221; the centring stays per group) or "none" (no division: Dr. GRPO, arXiv
2503.20783). Every mode takes all three; in `normalize_then_sum` the per-aspect std is the
aspect's group std or its batch std, and "none" also leaves the sum unscaled.
`std_floor` (beyond the papers) divides by max(std, floor) instead: a group whose rewards
differ by less than the floor (in reward units) is not blown up to unit scale, so the
reward model's noise among equally compliant answers does not push as hard as a refusal
against an answer does (docs/theory.md section 7).
A group whose combined reward has (near) zero spread gets advantage 0 and is counted.
"""

from __future__ import annotations

import torch

# the scalarisation of the columns is the reward objective's; the modes normalise what it gives
from mogrpo.reward.objective import MODES, combine, weighted_sum  # noqa: F401  (weighted_sum: re-exported)

SCALES = ("group", "batch", "none")  # TRL's scale_rewards values: which std divides


def _nan_mean_std(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over `dim`, ignoring NaN (NaN where no value)."""
    valid = ~torch.isnan(x)
    n = valid.sum(dim, keepdim=True)
    filled = torch.where(valid, x, torch.zeros_like(x))
    mean = filled.sum(dim, keepdim=True) / n.clamp(min=1)
    var = ((torch.where(valid, x - mean, torch.zeros_like(x)) ** 2).sum(dim, keepdim=True)
           / n.clamp(min=1))
    nan = torch.full_like(mean, float("nan"))
    return torch.where(n > 0, mean, nan), torch.where(n > 0, var.sqrt(), nan)


def group_advantages(rewards: torch.Tensor, weights: torch.Tensor, mode: str = "sum_then_normalize",
                     *, scale_rewards: str = "group", eps: float = 1e-4, std_floor: float = 0.0,
                     multipliers: torch.Tensor | None = None,
                     constrained: torch.Tensor | None = None,
                     gather=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [B, G] from rewards [B, G, K] (NaN = n/a) and weights [K].

    Returns (advantages, stats): stats has the fraction and count of zero-variance groups
    and the mean/std of the combined reward and of the advantages. `gather` (x [B, G] -> the
    whole batch's [B_total, G], along the first dimension whatever the others; default: x itself)
    gives `normalize_then_sum` and `scale_rewards="batch"` the batch they normalise over when
    several processes each hold part of it, so that they compute what one process would.
    `scale_rewards`: "group" | "batch" | "none" (module docstring).
    """
    if scale_rewards not in SCALES:
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale_rewards!r}")
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [B, G, K], got shape {tuple(rewards.shape)}")
    B, G, K = rewards.shape
    if G < 2:
        raise ValueError(f"group-relative advantages need G >= 2 samples per prompt, got {G}")
    if weights.shape != (K,):
        raise ValueError(f"weights must be [K={K}], got {tuple(weights.shape)}")
    rewards = rewards.float()
    weights = weights.float()
    combined = combine(rewards, weights, mode, multipliers, constrained)  # [B, G]

    if mode == "normalize_then_sum":
        mean, std = _nan_mean_std(rewards, dim=1)  # [B, 1, K]
        centred = rewards - mean
        z = _scaled(centred, std, rewards, scale_rewards, std_floor, eps, gather)
        z = torch.where(std <= eps, torch.zeros_like(z), z)  # aspect constant in the group
        z = torch.nan_to_num(z)  # n/a cells sit at the group mean
        adv = (z * weights).sum(-1)  # [B, G]
        whole = adv if gather is None else gather(adv)  # [B_total, G]
        a_mean, a_std = whole.mean(), whole.std(unbiased=False)
        zero = (adv.abs().amax(dim=1) <= eps)  # [B]
        adv = adv - a_mean if scale_rewards == "none" else (adv - a_mean) / (a_std + eps)
        adv = torch.where(zero[:, None], torch.zeros_like(adv), adv)
    else:
        mean, std = _nan_mean_std(combined, dim=1)  # [B, 1]
        centred = combined - mean
        adv = _scaled(centred, std, combined, scale_rewards, std_floor, eps, gather)
        zero = (std.squeeze(1) <= eps) | torch.isnan(std.squeeze(1))  # [B]
        adv = torch.where(zero[:, None], torch.zeros_like(adv), adv)
        adv = torch.nan_to_num(adv)  # a sample with no reward at all gets no push
    stats = {
        "zero_variance_groups": int(zero.sum()),
        "zero_variance_fraction": float(zero.float().mean()),
        "combined/mean": float(torch.nanmean(combined)),
        "combined/std": float(_nan_mean_std(combined.reshape(-1), 0)[1]),
        "advantage/mean": float(adv.mean()),
        "advantage/std": float(adv.std(unbiased=False)),
        "advantage/max_abs": float(adv.abs().max()),
    }
    return adv, stats


def _scaled(centred: torch.Tensor, group_std: torch.Tensor, values: torch.Tensor, scale: str,
            std_floor: float, eps: float, gather) -> torch.Tensor:
    """`centred` ([B, G] or [B, G, K]) divided by the std `scale` names, floored at `std_floor`:
    `group_std` (each group's, [B, 1(, K)]), or the population std of `values` over the whole
    batch (every process's rows via `gather`; per aspect when there is a K dimension)."""
    if scale == "none":
        return centred
    if scale == "batch":
        every = values if gather is None else gather(values)  # [B_total, G(, K)]
        flat = every.reshape(-1, *every.shape[2:])  # [B_total * G(, K)]
        group_std = _nan_mean_std(flat, dim=0)[1]  # [1(, K)]: broadcasts like a group's
    return centred / (group_std.clamp(min=std_floor) + eps)


def update_multipliers(multipliers: torch.Tensor, rewards: torch.Tensor, thresholds: torch.Tensor,
                       constrained: torch.Tensor, lr: float) -> torch.Tensor:
    """One dual-ascent step: lambda_c <- max(0, lambda_c + lr * (tau_c - mean_batch(r_c))).

    multipliers, thresholds [K], constrained [K] bool, rewards [B, G, K] (NaN ignored).
    Unconstrained entries stay 0. A violated constraint (mean below threshold) raises its
    multiplier; a satisfied one lowers it towards 0.
    """
    mean = torch.nanmean(rewards.float().reshape(-1, rewards.shape[-1]), dim=0)  # [K]
    step = torch.nan_to_num(thresholds - mean)  # no data for an aspect -> no move
    new = (multipliers + lr * step).clamp(min=0.0)
    return torch.where(constrained, new, torch.zeros_like(new))


def guided_diagnostics(combined: torch.Tensor, adv: torch.Tensor, guided: torch.Tensor,
                       kinds: list[str]
                       ) -> dict[str, float | None]:
    """Where a step's push goes, per prompt kind (pure; docs/theory.md section 7).

    combined, adv [B, G]; guided [B, G] bool (sample started from a refusal opener); kinds [B].
    For kind in (harmful, benign), over the groups of that kind that have both guided and own
    samples:
    - `guided_adv/<kind>`: mean advantage of the guided samples (the push on the refusal);
    - `guided_gap/<kind>`: mean combined reward of the guided samples minus that of the own
      samples in the same group (how much the reward prefers the refusal);
    - `own_spread/<kind>`: mean std of the combined reward among the own samples (how much
      the reward separates the policy's own answers from each other, e.g. by tone);
    - `own_adv_abs/<kind>`: mean |advantage| of the own samples (the push that is not about
      refusing or not). None when no such group is in the batch.
    """
    out: dict[str, float | None] = {}
    for kind in ("harmful", "benign"):
        rows = [b for b,
                k in enumerate(kinds) if k == kind and guided[b].any() and (~guided[b]).any()]
        keys = ("guided_adv", "guided_gap", "own_spread", "own_adv_abs")
        if not rows:
            out.update({f"{k}/{kind}": None for k in keys})
            continue
        g, c, a = guided[rows], combined[rows].float(), adv[rows].float()  # [b, G]
        own = ~g
        mean = lambda x, m: (torch.nan_to_num(x) * m).sum(1) / m.sum(1).clamp(min=1)  # noqa: E731  [b]
        own_mean = mean(c, own)
        own_std = (mean((c - own_mean[:, None]) ** 2, own)).sqrt()
        out[f"guided_adv/{kind}"] = float(mean(a, g).mean())
        out[f"guided_gap/{kind}"] = float((mean(c, g) - own_mean).mean())
        out[f"own_spread/{kind}"] = float(own_std.mean())
        out[f"own_adv_abs/{kind}"] = float(mean(a.abs(), own).mean())
    return out
