from pathlib import Path

import pytest
import yaml

from mogrpo.config import ConfigError, load_config, parse_overrides, save_config
from mogrpo.reward.train import RewardTrainConfig


def test_yaml_plus_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 2\nlr: 1.0e-4\naspects: [safety, politeness]\n")
    cfg = load_config(RewardTrainConfig, f, ["lr=3e-4", "aspect_weights={safety: 2}",
                                             "batch_size=8"])
    assert cfg.epochs == 2 and cfg.lr == pytest.approx(3e-4) and cfg.batch_size == 8
    assert cfg.aspects == ["safety", "politeness"] and cfg.aspect_weights == {"safety": 2}
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["lr"] == pytest.approx(3e-4)
    assert load_config(RewardTrainConfig, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides, error, message", [
    (["epoch=3"], ConfigError, r"unknown key\(s\) \['epoch'\]"),
    (["epochs"], ConfigError, "override 'epochs' is not of the form key=value"),
    (["epochs=many"], ConfigError, "epochs: 'many' is not a valid int"),
    # checked by the config class itself (a ValueError that is not a ConfigError)
    (["aspect_weights={honesty: 1}"], ValueError,
     r"aspect_weights names \['honesty'\], which are not in aspects"),
    (["splits=[0.5, 0.5, 0.5]"], ValueError, r"splits must be three fractions summing to 1"),
    (["pooling=max"], ValueError, "pooling must be one of"),
    (["batch_size=0"], ValueError, "batch_size must be >= 1"),
])
def test_bad_config_says_what_to_change(overrides, error, message):
    with pytest.raises(ValueError, match=message) as exc:
        load_config(RewardTrainConfig, None, overrides)
    assert type(exc.value) is error


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RewardTrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(RewardTrainConfig, bad)


def test_parse_overrides_types():
    assert parse_overrides(["a=1", "b=x", "c=[1, 2]", "d.e=true"]) == {
        "a": 1, "b": "x", "c": [1, 2], "d.e": True}


def test_shipped_default_config_loads():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(RewardTrainConfig, root / "configs" / "reward" / "default.yaml")
    assert cfg.aspects == ["safety", "actionability", "politeness", "meaningfulness"]
    assert cfg.data == ["default", "onpolicy"]
