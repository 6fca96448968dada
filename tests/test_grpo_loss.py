import math

import pytest
import torch

from mogrpo.rl.losses import aggregate, grpo_loss, k3_kl


def test_k3_by_hand():
    # d = log 0.25 - log 0.5 = log 0.5 = -0.693147; exp(d) - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    v = k3_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    assert v.item() == pytest.approx(0.193147, abs=1e-6)
    assert k3_kl(torch.tensor([0.3]), torch.tensor([0.3])).item() == 0.0  # same policy: 0


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(3.0)  # mean(2, 4)
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(2.5)  # 10 / 4 tokens
    assert aggregate(per_token, mask, "dr_grpo").item() == pytest.approx(10 / 6)  # 10 / (2 * 3)
    assert aggregate(per_token, mask, "dr_grpo", max_tokens=5).item() == pytest.approx(1.0)


def test_on_policy_loss_is_minus_mean_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.2]]))
    loss, st = grpo_loss(logp, logp, None, torch.tensor([2.0, 1.0]), torch.ones(2, 2), beta=0.0)
    assert loss.item() == pytest.approx(-1.5)  # ratio 1: -(2 + 1) / 2
    assert st["clip_fraction"] == 0.0 and st["ratio/min"] == st["ratio/max"] == 1.0


def test_ratios_are_clipped_by_hand():
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, -1.0])
    loss, st = grpo_loss(logp, old, None, adv, torch.ones(2, 1), eps_low=0.2, eps_high=0.2,
                         beta=0.0)
    # seq 0: min(1.5 * 1, 1.2 * 1) = 1.2; seq 1: min(0.5 * -1, 0.8 * -1) = -0.8
    # loss = mean(-1.2, 0.8) = -0.2; both tokens are clipped
    assert loss.item() == pytest.approx(-0.2)
    assert st["clip_fraction"] == 1.0
    assert st["ratio/min"] == pytest.approx(0.5) and st["ratio/max"] == pytest.approx(1.5)
    # A clipped token carries no gradient.
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, old, None, adv, torch.ones(2, 1), beta=0.0)[0].backward()
    assert lp.grad.abs().max().item() == 0.0


def test_asymmetric_clip_dapo_style():
    old = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.25]]))
    loss, _ = grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), eps_low=0.2,
                        eps_high=0.28, beta=0.0)
    assert loss.item() == pytest.approx(-1.25)  # 1.25 < 1 + 0.28: not clipped


def test_kl_term_by_hand():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, st = grpo_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1)
    assert loss.item() == pytest.approx(0.1 * 0.193147, abs=1e-6)
    assert st["kl"] == pytest.approx(0.193147, abs=1e-6)


def test_higher_advantage_gives_lower_loss():
    torch.manual_seed(0)
    logp = torch.randn(4, 5) * 0.1 - 1
    old = logp + torch.randn(4, 5) * 0.05
    mask = torch.ones(4, 5)
    lo, _ = grpo_loss(logp, old, None, torch.tensor([0.1, 0.2, 0.3, 0.4]), mask, beta=0.0)
    hi, _ = grpo_loss(logp, old, None, torch.tensor([0.5, 0.6, 0.7, 0.8]), mask, beta=0.0)
    assert hi.item() < lo.item()


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
def test_all_masked_row_contributes_nothing(agg):
    torch.manual_seed(1)
    logp, old, ref = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    adv = torch.tensor([0.5, -1.0])
    base, _ = grpo_loss(logp, old, ref, adv, mask, aggregation=agg, max_tokens=4)
    extra = lambda t, v: torch.cat([t, torch.full((1, 4), v)])  # noqa: E731
    with_dead, _ = grpo_loss(extra(logp, 50.0), extra(old, -50.0), extra(ref, 9.0),
                             torch.cat([adv, torch.tensor([1e6])]),
                             torch.cat([mask, torch.zeros(1, 4, dtype=mask.dtype)]),
                             aggregation=agg, max_tokens=4)
    if agg == "dr_grpo":  # its normaliser counts rows: N goes from 2 to 3
        assert with_dead.item() == pytest.approx(base.item() * 2 / 3, rel=1e-5)
    else:
        assert with_dead.item() == pytest.approx(base.item(), rel=1e-5)
    assert math.isfinite(with_dead.item())


def test_bad_inputs():
    with pytest.raises(ValueError, match="same"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 2), None, torch.zeros(2), torch.ones(2, 3),
                  beta=0)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3),
                  beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3),
                  beta=0, aggregation="mean")
