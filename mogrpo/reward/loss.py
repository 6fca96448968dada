"""The masked multi-aspect regression loss (pure function, hand-tested).

Labels are a matrix [N, K] with NaN where a row does not label an aspect. A NaN cell
contributes nothing: not to the numerator, not to the count. With aspect weights w [K],

    loss = sum_{n,k} w_k * m_nk * (pred_nk - y_nk)^2  /  sum_{n,k} w_k * m_nk

where m_nk = 1 if y_nk is a number else 0: the weighted mean squared error over the
labelled cells. A batch with no labelled cell gives a loss of 0 that still carries a
(zero) gradient, so a loop never has to special-case it.
"""

from __future__ import annotations

import torch


def masked_regression_loss(pred: torch.Tensor, target: torch.Tensor,
                           weights: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                         dict[str, torch.Tensor]]:
    """Weighted MSE over labelled cells.

    pred [N, K], target [N, K] (NaN = unlabelled), weights [K] (default all ones).
    Returns (loss, stats) with stats["per_aspect_mse"] [K] (NaN for an aspect with no
    label in the batch) and stats["count"] [K] (labelled cells per aspect), both detached.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in "
                         f"shape")
    mask = ~torch.isnan(target)  # [N, K]
    if weights is None:
        weights = torch.ones(pred.shape[-1], dtype=pred.dtype, device=pred.device)
    weights = weights.to(pred.dtype)
    if weights.shape != (pred.shape[-1],):
        raise ValueError(f"weights must have shape [{pred.shape[-1]}], got {tuple(weights.shape)}")
    m = mask.to(pred.dtype)
    sq = (pred - torch.nan_to_num(target, nan=0.0)) ** 2 * m  # [N, K], zero where unlabelled
    denom = (m * weights).sum()
    loss = (sq * weights).sum() / denom.clamp(min=1e-12)
    count = m.sum(0)  # [K]
    per_aspect = torch.where(count > 0, sq.sum(0) / count.clamp(min=1.0),
                             torch.full_like(count, float("nan")))
    return loss, {"per_aspect_mse": per_aspect.detach(), "count": count.detach()}
