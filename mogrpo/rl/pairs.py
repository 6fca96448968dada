"""Preference pairs from scored samples (pure): for each prompt, the best sample is chosen
and the worst rejected, by the same combined reward GRPO uses; pairs whose margin is
below a threshold are skipped (and counted), since a near-tie teaches nothing reliable.
"""

from __future__ import annotations

import torch


def best_worst_pairs(combined: torch.Tensor,
                     min_margin: float = 0.0) -> tuple[list[tuple[int, int, int]], int]:
    """combined [B, N] (NaN = unscored) -> ([(prompt b, chosen i, rejected j)], skipped count)."""
    pairs, skipped = [], 0
    for b in range(combined.shape[0]):
        row = combined[b]
        ok = ~torch.isnan(row)
        if ok.sum() < 2:
            skipped += 1
            continue
        hi = torch.where(ok, row, torch.full_like(row, -float("inf")))
        lo = torch.where(ok, row, torch.full_like(row, float("inf")))
        i, j = int(hi.argmax()), int(lo.argmin())
        if float(row[i] - row[j]) <= min_margin or i == j:
            skipped += 1
            continue
        pairs.append((b, i, j))
    return pairs, skipped
