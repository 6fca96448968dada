import math

import pytest
import torch

from mogrpo.rl.advantages import combine, group_advantages, update_multipliers, weighted_sum

nan = float("nan")


def T(x):
    return torch.tensor(x, dtype=torch.float32)


def test_sum_then_normalize_by_hand():
    rewards = T([[[1.0, 0.5], [0.0, 0.5], [0.5, 0.5]]])  # B=1, G=3, K=2
    adv, st = group_advantages(rewards, T([2.0, 1.0]), "sum_then_normalize", eps=0.0)
    # combined = 2*r0 + r1 = [2.5, 0.5, 1.5]; mean 1.5; population std sqrt((1 + 1 + 0) / 3) =
    # 0.8165
    # A = [1, -1, 0] / 0.8165 = [1.2247, -1.2247, 0]
    assert adv[0].tolist() == pytest.approx([1.2247449, -1.2247449, 0.0], abs=1e-6)
    assert st["combined/mean"] == pytest.approx(1.5) and st["zero_variance_groups"] == 0


def test_zero_variance_group_gets_zero_advantage_and_is_counted():
    # group 0: sums 1, 1; mins 0, 0
    rewards = T([[[1.0, 0.0], [0.0, 1.0]], [[0.9, 0.3], [0.1, 0.2]]])
    for mode in ("sum_then_normalize", "normalize_then_sum", "min"):
        adv, st = group_advantages(rewards, T([1.0, 1.0]), mode)
        if mode != "normalize_then_sum":  # per-aspect z-scores do differ in group 0
            assert adv[0].abs().max().item() == 0.0
            assert st["zero_variance_groups"] == 1 and st["zero_variance_fraction"] == 0.5
    same = T([[[0.3, 0.7]] * 4])
    adv, st = group_advantages(same, T([1.0, 1.0]), "normalize_then_sum")
    assert adv.abs().max().item() == 0.0 and st["zero_variance_groups"] == 1


def test_dr_grpo_does_not_scale_by_std():
    rewards = T([[[1.0], [0.0], [0.5], [0.5]]])
    adv, _ = group_advantages(rewards, T([1.0]), scale_rewards="none")
    assert adv[0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])  # r - mean(r) = r - 0.5


@pytest.mark.parametrize("mode", ["sum_then_normalize", "min", "lagrangian"])
def test_batch_scale_divides_by_the_whole_batch_std_by_hand(mode):
    # groups [1, 0] and [0.75, 0.25]: both centre on 0.5 -> [0.5, -0.5], [0.25, -0.25].
    # "group" divides each by its own std (0.5, 0.25): [1, -1] twice, the weaker spread lost.
    # "batch" divides both by the std of all four rewards: mean 0.5, population variance
    # (0.25 + 0.25 + 0.0625 + 0.0625) / 4 = 0.15625, std 0.3952847.
    rewards = T([[[1.0], [0.0]], [[0.75], [0.25]]])
    kw = {"multipliers": T([0.0]), "constrained": torch.tensor([False])}
    group, _ = group_advantages(rewards, T([1.0]), mode, eps=0.0, **kw)
    assert group.flatten().tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0])
    batch, st = group_advantages(rewards, T([1.0]), mode, scale_rewards="batch", eps=0.0, **kw)
    assert batch.flatten().tolist() == pytest.approx([1.2649111, -1.2649111, 0.6324555, -0.6324555])
    # the floor applies to the batch std too: max(0.395, 0.5) = 0.5
    floored, _ = group_advantages(rewards, T([1.0]), mode, scale_rewards="batch", eps=0.0,
                                  std_floor=0.5, **kw)
    assert floored.flatten().tolist() == pytest.approx([1.0, -1.0, 0.5, -0.5])
    # a group with no spread still gets 0 and is counted
    flat = T([[[1.0], [0.0]], [[0.4], [0.4]]])
    adv, st = group_advantages(flat, T([1.0]), mode, scale_rewards="batch", **kw)
    assert adv[1].tolist() == [0.0, 0.0] and st["zero_variance_groups"] == 1


def test_batch_scale_normalize_then_sum_by_hand():
    # aspect 0: groups [1, 0] and [0.5, 0.5]; aspect 1: [0.2, 0.2] and [0.8, 0.4]; w = [1, 1].
    # Batch std of aspect 0 over [1, 0, .5, .5]: sqrt(0.5 / 4) = 0.3535534; of aspect 1 over
    # [.2, .2, .8, .4]: sqrt(0.24 / 4) = 0.2449490. Centred in their groups, divided by those:
    # group 0: aspect 0 [0.5, -0.5] / 0.354 = [1.4142, -1.4142] (aspect 1 constant: 0);
    # group 1: aspect 1 [0.2, -0.2] / 0.245 = [0.8165, -0.8165] (aspect 0 constant: 0).
    # Summed, then over the whole batch: mean 0, std sqrt((2 * 2 + 2 * 2/3) / 4) = 1.1547005.
    rewards = T([[[1.0, 0.2], [0.0, 0.2]], [[0.5, 0.8], [0.5, 0.4]]])
    adv, _ = group_advantages(rewards, T([1.0, 1.0]), "normalize_then_sum",
                              scale_rewards="batch", eps=0.0)
    assert adv.flatten().tolist() == pytest.approx([1.2247449, -1.2247449, 0.7071068, -0.7071068])
    group, _ = group_advantages(rewards, T([1.0, 1.0]), "normalize_then_sum", eps=0.0)
    assert group.flatten().tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0])
    none, _ = group_advantages(rewards, T([1.0, 1.0]), "normalize_then_sum",
                               scale_rewards="none", eps=0.0)
    assert none.flatten().tolist() == pytest.approx([0.5, -0.5, 0.2, -0.2])  # unscaled


def test_batch_scale_over_processes_equals_one_process():
    """Each process holds one group; `gather` hands it the whole batch's rewards (here the
    combined reward is the one column), so both compute what one process does."""
    rewards = T([[[1.0], [0.0]], [[0.75], [0.25]]])
    whole, _ = group_advantages(rewards, T([1.0]), scale_rewards="batch", eps=0.0)
    for p in range(2):
        def gather(x, p=p):  # x: this process's [1, G] combined rewards -> [2, G], in order
            other = rewards[1 - p:2 - p, :, 0]
            return torch.cat([x, other] if p == 0 else [other, x])
        part, _ = group_advantages(rewards[p:p + 1], T([1.0]), scale_rewards="batch", eps=0.0,
                                   gather=gather)
        assert part.flatten().tolist() == pytest.approx(whole[p].tolist())


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(torch.zeros(1, 2, 1), torch.ones(1), scale_rewards="global")


def test_nan_aspect_is_masked_not_zero():
    # weighted_sum renormalises over present aspects: [1, NaN] with w [2, 1] -> 1*2 * 3/2 = 3,
    # the value all-present rewards of 1 would give; a zero would give 2 instead.
    assert weighted_sum(T([1.0, nan]), T([2.0, 1.0])).item() == pytest.approx(3.0)
    assert math.isnan(weighted_sum(T([nan, nan]), T([1.0, 1.0])).item())
    rewards = T([[[1.0, nan], [0.0, 0.0], [0.5, 1.0]]])
    adv, _ = group_advantages(rewards, T([1.0, 1.0]), eps=0.0)
    # combined = [2 (1 renormalised), 0, 1.5]; mean 1.1667; std = sqrt((.8333^2+1.1667^2+.3333^2)/3)
    c = torch.tensor([2.0, 0.0, 1.5])
    assert adv[0].tolist() == pytest.approx(((c - c.mean()) / c.std(unbiased=False)).tolist(),
                                            abs=1e-5)


def test_normalize_then_sum_is_invariant_to_affine_rescaling_of_one_aspect():
    torch.manual_seed(0)
    rewards = torch.rand(3, 4, 2)
    w = T([1.0, 1.0])
    base, _ = group_advantages(rewards, w, "normalize_then_sum", eps=1e-8)
    rescaled = rewards.clone()
    rescaled[..., 1] = 10.0 * rescaled[..., 1] - 3.0
    again, _ = group_advantages(rescaled, w, "normalize_then_sum", eps=1e-8)
    assert torch.allclose(base, again, atol=1e-4)
    # The paper's sum-then-normalise is not: the rescaled aspect now dominates the sum.
    a, _ = group_advantages(rewards, w, "sum_then_normalize", eps=1e-8)
    b, _ = group_advantages(rescaled, w, "sum_then_normalize", eps=1e-8)
    assert not torch.allclose(a, b, atol=1e-2)


def test_sum_then_normalize_maps_different_mixes_to_the_same_advantage():
    # Two groups with opposite trade-offs get identical advantages under the paper's mode
    # (the GDPO/MO-GRPO observation) but not once each aspect is normalised first.
    g1 = [[1.0, 0.0], [0.0, 0.5]]  # sample 0 is better on aspect 0 by more
    g2 = [[0.5, 0.0], [0.0, 0.0]]
    rewards = T([g1, g2])
    a, _ = group_advantages(rewards, T([1.0, 1.0]), "sum_then_normalize", eps=0.0)
    assert a[0].tolist() == pytest.approx(a[1].tolist())  # both [1, -1]
    b, _ = group_advantages(rewards, T([1.0, 1.0]), "normalize_then_sum", eps=0.0)
    # z-scores: g1 [1, -1] + [-1, 1] = [0, 0]; g2 [1, -1] + [0, 0] (no variance) = [1, -1];
    # then over the batch [0, 0, 1, -1]: mean 0, std sqrt(1/2)
    assert b.flatten().tolist() == pytest.approx([0.0, 0.0, math.sqrt(2), -math.sqrt(2)])


def test_min_mode_by_hand():
    rewards = T([[[0.9, 0.2], [0.5, 0.6]]])
    assert combine(rewards, T([1.0, 1.0]), "min")[0].tolist() == pytest.approx([0.2, 0.5])
    adv, _ = group_advantages(rewards, T([1.0, 1.0]), "min", eps=0.0)
    assert adv[0].tolist() == pytest.approx([-1.0, 1.0])  # (0.2 - .35) / .15, (0.5 - .35) / .15


def test_lagrangian_multiplier_changes_the_preference():
    rewards = T([[[0.2, 1.0], [1.0, 0.4]]])  # aspect 0 = safety (constrained), aspect 1 = helpful
    constrained = torch.tensor([True, False])
    adv0, _ = group_advantages(rewards, T([1.0, 1.0]), "lagrangian", eps=0.0,
                               multipliers=T([0.0, 0.0]), constrained=constrained)
    assert adv0[0].tolist() == pytest.approx([1.0, -1.0])  # only helpfulness counts: 1.0 vs 0.4
    adv1, _ = group_advantages(rewards, T([1.0, 1.0]), "lagrangian", eps=0.0,
                               multipliers=T([1.0, 0.0]), constrained=constrained)
    # r = (helpful + 1 * safety) / (1 + 1) = [0.6, 0.7]: the safe sample now wins.
    assert combine(rewards, T([1.0, 1.0]), "lagrangian", T([1.0, 0.0]),
                   constrained)[0].tolist() == \
        pytest.approx([0.6, 0.7])
    assert adv1[0].tolist() == pytest.approx([-1.0, 1.0])


def test_dual_ascent_step_by_hand():
    lam = T([0.5, 0.0])
    constrained = torch.tensor([True, False])
    tau = T([0.9, 0.0])
    low = T([[[0.6, 0.1], [0.6, 0.9]]])  # safety mean 0.6 < 0.9: violated
    assert update_multipliers(lam, low, tau, constrained, lr=0.1).tolist() == \
        pytest.approx([0.53, 0.0])
    high = T([[[1.0, 0.1], [1.0, 0.9]]])  # mean 1.0 >= 0.9: relax by 0.1 * 0.1
    assert update_multipliers(lam, high, tau, constrained, lr=0.1).tolist() == \
        pytest.approx([0.49, 0.0])
    assert update_multipliers(T([0.0, 0.0]), high, tau, constrained, lr=0.1).tolist() == [0.0, 0.0]


def test_shape_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(2, 1, 3), torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        group_advantages(torch.zeros(2, 2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="unknown advantage mode"):
        group_advantages(torch.zeros(2, 2, 3), torch.ones(3), "max")
