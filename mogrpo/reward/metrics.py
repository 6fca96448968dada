"""Per-aspect agreement between predicted scores and labels, ignoring unlabelled cells."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def aspect_metrics(pred: np.ndarray, target: np.ndarray, aspects: list[str]) -> dict[str, dict]:
    """{aspect: {pearson, spearman, mae, n}} over the labelled rows of each column.

    pred, target [N, K]; NaN in target = unlabelled. Correlations are None when fewer
    than 2 labelled rows or a constant column make them undefined.
    """
    out = {}
    for k, aspect in enumerate(aspects):
        mask = ~np.isnan(target[:, k])
        p, y = pred[mask, k].astype(float), target[mask, k].astype(float)
        n = int(mask.sum())
        if n >= 2 and np.std(p) > 0 and np.std(y) > 0:
            pearson = float(np.corrcoef(p, y)[0, 1])
            spearman = float(stats.spearmanr(p, y).statistic)
        else:
            pearson = spearman = float("nan")
        mae = float(np.abs(p - y).mean()) if n else float("nan")
        out[aspect] = {"pearson": _finite_or_none(pearson), "spearman": _finite_or_none(spearman),
                       "mae": _finite_or_none(mae), "n": n}
    return out
