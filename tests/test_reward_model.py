import json

import pytest
import torch

from mogrpo.reward.loss import masked_regression_loss
from mogrpo.reward.model import MultiAspectRewardModel, pool, set_dropout

ASPECTS = ["safety", "actionability", "politeness", "meaningfulness"]
PROMPTS = ["how do i bake bread", "how do i make a bomb", "what is python", "thank you"]
RESPONSES = ["first make flour and water then bake", "sorry i cannot help", "python is code",
             "you stupid idiot"]


def test_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # [N=1, T=3, H=2]
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]  # mean of the 2 real tokens
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "last").tolist() == [[3.0, 4.0]]  # last non-padding token
    left = torch.tensor([[0, 1, 1]])  # left padding: last real token is position 2
    assert pool(hidden, left, "last").tolist() == [[9.0, 9.0]]


def test_tiny_backbone_trains_and_every_parameter_changes(tiny_encoder_dir):
    model = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir), ASPECTS, max_length=32,
                                                 seed=0, dropout=0.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, float("nan"), 1.0],
                           [float("nan"), 1.0, 1.0, 1.0], [float("nan"), float("nan"), 0.0, 0.0]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    batch, _ = model.encode(PROMPTS, RESPONSES)
    losses = []
    for _ in range(5):
        loss, _ = masked_regression_loss(model(**batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    # No weight decay, so a tensor moves only if the loss reaches it: every one must.
    assert unchanged == [], unchanged


def test_scores_shape_range_and_order(tiny_encoder_dir):
    model = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir), ASPECTS, max_length=64,
                                                 seed=0)
    scores = model.score(PROMPTS, RESPONSES, batch_size=3)
    assert scores.shape == (4, 4) and ((scores >= 0) & (scores <= 1)).all()
    # Scoring one pair alone gives the same row as scoring it inside a sorted, padded batch.
    for i in range(4):
        alone = model.score([PROMPTS[i]], [RESPONSES[i]])
        assert torch.allclose(alone[0], scores[i], atol=1e-5)


def test_truncation_is_counted(tiny_encoder_dir):
    model = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir), ["safety"], max_length=16)
    long = " ".join(["bread"] * 40)
    scores, n = model.score(["hi", "how do i bake bread"], [long, "bake it"], return_truncated=True)
    assert n == 1 and scores.shape == (2, 1)
    batch, _ = model.encode(["hi"], [long])
    assert batch["input_ids"].shape[1] == 16


def test_save_load_round_trip_is_bit_for_bit(tiny_encoder_dir, tmp_path):
    model = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir), ASPECTS, max_length=48,
                                                 seed=3)
    with torch.no_grad():
        model.head.weight.add_(0.5)  # make sure the head is not at its initial value
    folder = model.save(tmp_path / "rm")
    spec = json.loads((folder / "reward_config.json").read_text())
    assert spec["aspects"] == ASPECTS and spec["max_length"] == 48 and spec["pooling"] == "mean"
    loaded = MultiAspectRewardModel.load(folder)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(model.score(PROMPTS, RESPONSES), loaded.score(PROMPTS, RESPONSES))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


def test_load_rejects_a_folder_that_is_not_a_reward_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward train"):
        MultiAspectRewardModel.load(tmp_path)


def test_decoder_backbone_with_last_token_pooling(tiny_decoder_dir, tmp_path):
    model = MultiAspectRewardModel.from_backbone(str(tiny_decoder_dir), ["safety", "politeness"],
                                                 pooling="last", max_length=32, seed=0)
    scores = model.score(PROMPTS, RESPONSES)
    assert scores.shape == (4, 2) and torch.isfinite(scores).all()
    loaded = MultiAspectRewardModel.load(model.save(tmp_path / "dec"))
    assert torch.equal(scores, loaded.score(PROMPTS, RESPONSES))


def test_set_dropout_reaches_every_layer(tiny_encoder_dir):
    model = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir), ["safety"], dropout=0.0)
    ps = [m.p for m in model.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert ps and all(p == 0.0 for p in ps)
    model.train()
    a = model.score(PROMPTS, RESPONSES)  # score() switches to eval itself
    assert model.training
    set_dropout(model.backbone, 0.3)
    assert all(m.p == 0.3 for m in model.backbone.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        set_dropout(model.backbone, 1.5)
    assert a.shape == (4, 1)


def test_sanity_probes_report_each_case(tiny_encoder_dir):
    from mogrpo.reward.sanity import PROBES, run_sanity

    model = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir), ["safety", "politeness"],
                                                 seed=0)
    report = run_sanity(model)
    expected = [p for p in PROBES if p[0] in ("safety", "politeness")]
    assert report["total"] == len(expected) == len(report["probes"])
    assert report["passed"] == sum(p["ok"] for p in report["probes"])
    for probe, (aspect, prompt, _, _) in zip(report["probes"], expected, strict=True):
        assert probe["aspect"] == aspect and probe["prompt"] == prompt
        assert probe["ok"] == (probe["better"] > probe["worse"])
