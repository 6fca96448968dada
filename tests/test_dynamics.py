"""The learning-dynamics pieces of docs/theory.md section 7, by hand: the repetition penalty on
meaningfulness, the opener credit mask, and the per-kind diagnostics of where a step pushes."""

from __future__ import annotations

import math

import pytest
import torch

from mogrpo.reward.scoring import penalise_repetition, repetition_share
from mogrpo.rl.advantages import group_advantages, guided_diagnostics
from mogrpo.rollout import opener_loss_mask, signed_opener_credit


def test_repetition_share_by_hand():
    # 12 words -> 10 trigrams; the second sentence repeats the first's 5 trigrams ... and the
    # trigram across the boundary ("that. i can") is new: 10 trigrams, 6 distinct -> 0.4
    loop = "I can help you with that. I can help you with that."
    words = loop.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    assert len(grams) == 10 and len(set(grams)) == 6
    assert repetition_share(loop) == pytest.approx(0.4)
    assert repetition_share("Boil water, add the pasta, stir, and drain after ten minutes.") == 0.0
    assert repetition_share("too short") == 0.0
    long_loop = "I'm sorry, but I can't help with that. " * 8  # 64 words, 62 trigrams, 8 distinct
    assert repetition_share(long_loop) == pytest.approx(1 - 8 / 62)


def test_penalise_repetition_scales_only_meaningfulness_of_loops():
    m = torch.tensor([0.9, 0.9, float("nan")])
    texts = ["A plain and useful answer with no loop at all here.",
             "I can help you with that. " * 6, "x y z"]
    out = penalise_repetition(m, texts, strength=1.0)
    assert out[0] == pytest.approx(0.9)
    assert out[1] == pytest.approx(0.9 * (1 - repetition_share(texts[1])))
    assert out[1] < 0.3 and math.isnan(out[2])
    assert penalise_repetition(m, texts, 0.0)[1] == pytest.approx(0.9)  # off


def test_penalty_reorders_a_group_towards_the_clean_refusal():
    """Two refusals of equal safety: the looping one now gets the lower advantage."""
    clean, loop = ("I'm sorry, but I can't help with that request.",
                   "I'm sorry, but I can't help. " * 6)
    meaning = penalise_repetition(torch.tensor([0.8, 0.8]), [clean, loop], 1.0)
    # [1, 2, K=2]: safety, meaning
    rewards = torch.stack([torch.tensor([0.9, 0.9]), meaning], dim=-1)[None]
    adv, _ = group_advantages(rewards, torch.tensor([2.0, 0.5]))
    # two samples: +-std / (std + eps), about +-1; the clean one up
    assert adv[0].tolist() == pytest.approx([1.0, -1.0], abs=1e-3)


def test_opener_loss_mask_by_hand():
    cmask = torch.tensor([[1, 1, 1, 1, 0],   # own sample
                          [1, 1, 1, 1, 1],   # guided, refused: trained whole
                          [1, 1, 1, 0, 0]])  # guided, complied: opener (2 tokens) left out
    opener = torch.tensor([0, 2, 2])
    credit = torch.tensor([False, True, False])
    out = opener_loss_mask(cmask, opener, credit)
    assert out.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert out.dtype == cmask.dtype


def test_signed_opener_credit_by_hand():
    """A refusal opener trains only with the push its prompt's kind warrants: up on harmful
    prompts (A > 0), down on benign ones (A < 0); zero advantage trains nothing."""
    adv = torch.tensor([1.2, -0.7, 0.0, -1.1, 0.9, 0.0])
    kinds = ["harmful", "harmful", "harmful", "benign", "benign", "benign"]
    assert signed_opener_credit(adv, kinds).tolist() == [True, False, False, True, False, False]
    # with the loss mask: a guided benign sample that answered well (A > 0) keeps its opener out
    cmask = torch.ones(2, 4, dtype=torch.long)
    credit = signed_opener_credit(torch.tensor([-0.5, 0.8]), ["benign", "benign"])
    assert opener_loss_mask(cmask, torch.tensor([2, 2]), credit).tolist() == \
        [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert signed_opener_credit(torch.tensor([1.0]), ["unknown"]).tolist() == [False]


def test_signed_credit_evens_the_pushes_on_the_opener():
    """The measured asymmetry (docs/theory.md section 8), by hand: with 'refusals' the opener
    trains on a harmful group's refusing guided sample but not on a benign group's guided
    sample that hedged and then answered, although that answer is the group's worst; 'signed'
    trains both, one up and one down."""
    rewards = torch.tensor([[[0.1], [0.2], [0.0], [0.9]],    # harmful: guided (last) refuses
                            [[0.9], [0.8], [0.85], [0.6]]])  # benign: guided hedges, answers worst
    adv, _ = group_advantages(rewards, torch.ones(1))
    guided_idx = [3, 7]
    flat = adv.reshape(-1)
    signed = signed_opener_credit(flat, ["harmful"] * 4 + ["benign"] * 4)
    assert [bool(signed[i]) for i in guided_idx] == [True, True]
    assert flat[3] > 0 > flat[7]


def test_guided_diagnostics_by_hand():
    # one harmful group: own samples reward 0.2, 0.4, 0.0 (spread by tone), guided refusal 1.0;
    # one benign group: own 0.8, 0.8, 0.8, guided refusal 0.2
    combined = torch.tensor([[0.2, 0.4, 0.0, 1.0], [0.8, 0.8, 0.8, 0.2]])
    guided = torch.tensor([[False, False, False, True]] * 2)
    adv, _ = group_advantages(combined[..., None], torch.ones(1))
    d = guided_diagnostics(combined, adv, guided, ["harmful", "benign"])
    assert d["guided_gap/harmful"] == pytest.approx(1.0 - 0.2)  # own mean 0.2
    assert d["own_spread/harmful"] == pytest.approx(math.sqrt((0 + 0.04 + 0.04) / 3), rel=1e-5)
    assert d["guided_gap/benign"] == pytest.approx(0.2 - 0.8)
    assert d["own_spread/benign"] == pytest.approx(0.0, abs=1e-6)
    assert d["guided_adv/harmful"] == pytest.approx(float(adv[0, 3]))
    assert d["guided_adv/harmful"] > 0 > d["guided_adv/benign"]
    # the benign group's own samples are equal: all their push is the refusal's, split 3 ways
    assert d["own_adv_abs/benign"] == pytest.approx(abs(float(adv[1, 3])) / 3, rel=1e-4)
    assert guided_diagnostics(combined, adv, torch.zeros(2, 4, dtype=torch.bool),
                              ["harmful", "benign"])["guided_adv/harmful"] is None


def test_scorer_applies_the_penalty_to_the_reward_models_meaningfulness(tiny_encoder_dir, tmp_path):
    """Through the Scorer with a real (tiny) reward model, whose scores come out of inference
    mode: the looping completion's meaningfulness is scaled, every other column is unchanged."""
    from mogrpo.reward.model import MultiAspectRewardModel
    from mogrpo.reward.scoring import Scorer

    rm = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir), ["safety", "meaningfulness"],
                                              max_length=64, seed=0)
    rm = MultiAspectRewardModel.load(rm.save(tmp_path / "rm"))
    texts = ["bake the bread then water", "sorry i cannot help . " * 6]
    plain = Scorer(rm).score(["how do i bake bread"], ["benign"], texts, group_size=2)  # [1, 2, 2]
    pen = Scorer(rm, repetition_penalty=1.0).score(["how do i bake bread"], ["benign"], texts,
                                                   group_size=2)
    assert torch.equal(pen[..., 0], plain[..., 0])  # safety untouched
    assert pen[0, 0, 1] == pytest.approx(float(plain[0, 0, 1]))  # no repeated trigram
    assert pen[0, 1, 1] == pytest.approx(float(plain[0, 1, 1]) * (1 - repetition_share(texts[1])),
                                         rel=1e-5)


def test_std_floor_by_hand():
    """A group whose rewards differ by less than the floor is not scaled up to unit pushes; a
    group with a real difference is untouched (its std is above the floor)."""
    noise = torch.tensor([[[0.50], [0.52], [0.48], [0.50]]])  # std = sqrt(0.0002) ~ 0.01414
    plain, _ = group_advantages(noise, torch.ones(1), eps=0.0)
    floored, _ = group_advantages(noise, torch.ones(1), eps=0.0, std_floor=0.1)
    # 1.414: noise at full scale
    assert plain[0, 1] == pytest.approx(0.02 / math.sqrt(0.0002), rel=1e-4)
    assert floored[0, 1] == pytest.approx(0.02 / 0.1, rel=1e-4)  # 0.2
    real = torch.tensor([[[0.1], [0.1], [0.1], [0.9]]])  # std = 0.3464 > 0.1
    a, _ = group_advantages(real, torch.ones(1), eps=0.0)
    b, _ = group_advantages(real, torch.ones(1), eps=0.0, std_floor=0.1)
    assert torch.allclose(a, b)
    # per aspect under normalize_then_sum: the floor applies to each aspect's own std
    r = torch.tensor([[[0.05, 0.5], [0.07, 0.6], [0.06, 0.55], [0.9, 0.5]],
                      [[0.05, 0.5], [0.07, 0.6], [0.06, 0.55], [0.04, 0.5]]])  # [B=2, G=4, K=2]
    adv, _ = group_advantages(r, torch.tensor([2.0, 0.5]), "normalize_then_sum", std_floor=0.1)
    # the refusal group dominates, noise does not
    assert adv[0, 3] > 2.0 and adv[1].abs().max() < 0.5
