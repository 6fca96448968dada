import math

import pytest
import torch

from mogrpo.rl.losses import dpo_loss, gae, grpo_loss, value_loss, whiten


def test_gae_by_hand():
    # One sequence of 3 tokens, gamma = 1, lambda = 0.5, reward only at the end (r = [0, 0, 1]),
    # values V = [0.5, 0.6, 0.7], V_3 = 0 (past the end):
    # delta_2 = 1 + 0 - 0.7 = 0.3;        A_2 = 0.3
    # delta_1 = 0 + 0.7 - 0.6 = 0.1;      A_1 = 0.1 + 0.5 * 0.3 = 0.25
    # delta_0 = 0 + 0.6 - 0.5 = 0.1;      A_0 = 0.1 + 0.5 * 0.25 = 0.225
    # returns = A + V = [0.725, 0.85, 1.0]
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.6, 0.7, 9.0]])  # position 3 is padding: its value is ignored
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0, 0.0])


def test_gae_lambda_one_gives_monte_carlo_returns():
    r = torch.tensor([[0.1, -0.2, 1.0]])
    v = torch.tensor([[0.3, 0.2, 0.9]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([0.9, 0.8, 1.0])  # reward-to-go
    assert adv[0].tolist() == pytest.approx([0.6, 0.6, 0.1])  # reward-to-go - V


def test_whiten_masked():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = whiten(x, torch.tensor([[1, 1, 0]]))
    assert w[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)  # mean 2, std 1; padding -> 0


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1]])
    ret = torch.tensor([[1.0, 0.0]])
    loss, st = value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (0.5-1)^2 = 0.25, clipped V = 0.2 -> (0.2-1)^2 = 0.64; max = 0.64
    # token 1: unclipped 0.01, clipped V = 0.1 (inside the range) -> 0.01; max = 0.01
    # loss = 0.5 * (0.64 + 0.01) / 2 = 0.1625
    assert loss.item() == pytest.approx(0.1625)
    assert st["value_clip_fraction"] == pytest.approx(0.5)


def test_token_level_advantages_for_ppo():
    logp = torch.zeros(1, 2)
    loss, _ = grpo_loss(logp, logp, None, torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), beta=0.0)
    assert loss.item() == pytest.approx(-2.0)  # on-policy: -mean(A_t)


def test_dpo_and_ipo_by_hand():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2
    loss, st = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # -log sigmoid(0.5 * 2)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert st["reward_margin"] == pytest.approx(1.0) and st["reward_accuracy"] == 1.0
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)  # (2 - 1)^2 = 1
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge2")


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1)[0].backward()
    # dL/dpc = -beta * sigmoid(-beta * h) = -0.1 * 0.5 at h = 0, dL/dpr the opposite: descending
    # the loss raises pc and lowers pr
    assert (pc.grad.item(), pr.grad.item()) == pytest.approx((-0.05, 0.05))


def test_pair_construction_on_known_scores():
    from mogrpo.rl.pairs import best_worst_pairs

    nan = float("nan")
    combined = torch.tensor([
        [0.2, 0.9, 0.5, 0.1],   # best 1, worst 3, margin 0.8 -> kept
        [0.50, 0.52, 0.51, 0.5],  # margin 0.02 <= 0.05 -> skipped
        [nan, 0.3, nan, 0.7],   # NaN ignored: best 3, worst 1 -> kept
        [nan, nan, 0.4, nan],   # one scored sample -> skipped
    ])
    pairs, skipped = best_worst_pairs(combined, min_margin=0.05)
    assert pairs == [(0, 1, 3), (2, 3, 1)] and skipped == 2


def test_ipo_length_normalised_by_hand():
    # chosen log-ratio (-1 - -2) = 1 over 2 tokens -> 0.5; rejected (-3 - -2) = -1 over 4 tokens ->
    # -0.25
    # h = 0.5 - (-0.25) = 0.75; beta = 0.5: (0.75 - 1)^2 = 0.0625
    loss, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                       torch.tensor([-2.0]), beta=0.5, loss_type="ipo",
                       chosen_len=torch.tensor([2.0]), rejected_len=torch.tensor([4.0]))
    assert loss.item() == pytest.approx(0.0625)
