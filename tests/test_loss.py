import math

import numpy as np
import pytest
import torch

from mogrpo.reward.loss import masked_regression_loss
from mogrpo.reward.metrics import aspect_metrics

nan = float("nan")


def test_masked_loss_by_hand():
    pred = torch.tensor([[0.5, 0.2], [0.9, 0.4], [0.0, 1.0]])
    target = torch.tensor([[1.0, nan], [0.5, 0.0], [nan, nan]])
    loss, st = masked_regression_loss(pred, target)
    # Labelled cells: (0,0): (0.5-1.0)^2 = 0.25; (1,0): (0.9-0.5)^2 = 0.16; (1,1): (0.4-0)^2 = 0.16.
    # Mean over the 3 labelled cells: (0.25 + 0.16 + 0.16) / 3 = 0.19.
    assert loss.item() == pytest.approx(0.19)
    # Per aspect: column 0 -> (0.25 + 0.16) / 2 = 0.205; column 1 -> 0.16 / 1 = 0.16.
    assert st["per_aspect_mse"].tolist() == pytest.approx([0.205, 0.16])
    assert st["count"].tolist() == [2.0, 1.0]


def test_masked_loss_with_weights_by_hand():
    pred = torch.tensor([[0.5, 0.2], [0.9, 0.4]])
    target = torch.tensor([[1.0, nan], [0.5, 0.0]])
    loss, _ = masked_regression_loss(pred, target, torch.tensor([2.0, 1.0]))
    # Weighted: (2*0.25 + 2*0.16 + 1*0.16) / (2 + 2 + 1) = 0.98 / 5 = 0.196.
    assert loss.item() == pytest.approx(0.196)


def test_nan_labels_contribute_nothing_and_get_no_gradient():
    pred = torch.tensor([[0.3, 0.7], [0.1, 0.9]], requires_grad=True)
    target = torch.tensor([[0.3, nan], [nan, nan]])
    loss, _ = masked_regression_loss(pred, target)
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    # Changing an unlabelled prediction must not change the loss: its gradient is exactly 0.
    assert pred.grad[0, 1].item() == 0.0 and pred.grad[1].abs().sum().item() == 0.0
    # Same loss whatever value the unlabelled cells predict.
    loss2, _ = masked_regression_loss(torch.tensor([[0.3, 0.0], [5.0, -3.0]]), target)
    assert loss2.item() == pytest.approx(0.0)


def test_all_unlabelled_batch_gives_zero_loss_with_a_gradient():
    pred = torch.rand(3, 4, requires_grad=True)
    loss, st = masked_regression_loss(pred, torch.full((3, 4), nan))
    loss.backward()
    # a gradient, and it is 0
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros(3, 4))
    assert all(math.isnan(v) for v in st["per_aspect_mse"].tolist())


def test_zero_weight_aspect_is_ignored():
    pred = torch.tensor([[0.0, 0.0]])
    target = torch.tensor([[1.0, 0.5]])
    loss, _ = masked_regression_loss(pred, target, torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(0.25)  # only (0 - 0.5)^2 counts


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="shape"):
        masked_regression_loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="weights"):
        masked_regression_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2))


def test_aspect_metrics_ignore_nan_and_handle_degenerate_columns():
    pred = np.array([[0.1, 0.5, 0.2], [0.2, 0.5, 0.4], [0.3, 0.5, 0.9], [0.9, 0.5, 0.1]])
    target = np.array([[0.0, 1.0, nan], [0.5, 1.0, nan], [1.0, 1.0, nan], [nan, 1.0, 0.3]])
    m = aspect_metrics(pred, target, ["a", "b", "c"])
    # Column a on rows 0-2: predictions 0.1, 0.2, 0.3 are a linear function of 0, 0.5, 1 -> r = 1.
    assert m["a"]["pearson"] == pytest.approx(1.0) and m["a"]["spearman"] == pytest.approx(1.0)
    # MAE of a: (0.1 + 0.3 + 0.7) / 3 = 0.3666...
    assert m["a"]["mae"] == pytest.approx(1.1 / 3) and m["a"]["n"] == 3
    assert m["b"]["pearson"] is None  # constant column: correlation undefined, not 0
    assert m["b"]["mae"] == pytest.approx(0.5)
    assert m["c"]["n"] == 1 and m["c"]["pearson"] is None and m["c"]["mae"] == pytest.approx(0.2)


def test_length_grouped_batches_cover_every_row_once_and_group_lengths():
    from mogrpo.reward.train import length_grouped_batches

    lengths = [((i * 37) % 101) for i in range(250)]
    batches = length_grouped_batches(lengths, 8, seed=3, group=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(250)) and all(1 <= len(b) <= 8 for b in batches)
    assert batches == length_grouped_batches(lengths, 8, seed=3, group=4)  # deterministic
    assert batches != length_grouped_batches(lengths, 8, seed=4, group=4)
    def spread(bs):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs) / len(bs)

    # group=1 sorts only inside each batch: the same as random batches. Grouping 4 batches
    # (32 rows of lengths 0..100) cuts the mean within-batch spread to about a quarter.
    assert spread(batches) < 0.5 * spread(length_grouped_batches(lengths, 8, seed=3, group=1))
