"""One recipe: the standalone configs (README: the commands one by one) resolve to exactly the
settings of the main job's stages (`mogrpo run --config configs/default.yaml`), so both ways
train the same models. Only what the pipeline itself wires differs, and each difference is
named here with its reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mogrpo.config import load_config, to_dict
from mogrpo.eval.harness import EvalConfig
from mogrpo.eval.run_settings import with_run_settings
from mogrpo.pipeline import RunConfig, build_stages
from mogrpo.reward.train import RewardTrainConfig
from mogrpo.rl.registry import trainer

ROOT = Path(__file__).resolve().parent.parent
# Keys the pipeline sets by itself, and why they cannot change what is trained:
WIRED = {
    "reward_model",  # the pipeline's own reward stage (same config as configs/reward/default.yaml)
    "evaluator_model",  # the main job adds an evaluator reward model as one more judge
    "eval_prompts",  # training stages skip the trainer's before/after evaluation (greedy: no RNG
    # is drawn, so the trajectory is the same); the pipeline's eval stage evaluates instead
    "cache_dir",
}


def _stage(stages, name):
    return next(s for s in stages if s.name == name)


def _same(a, b) -> dict:
    da, db = to_dict(a), to_dict(b)
    return {k: (da[k], db.get(k)) for k in da if k not in WIRED and da[k] != db.get(k)}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    cfg = load_config(RunConfig, ROOT / "configs" / "default.yaml")
    return build_stages(cfg, tmp_path_factory.mktemp("run"))


def test_reward_model_config_is_the_main_jobs(stages):
    standalone = load_config(RewardTrainConfig, ROOT / "configs" / "reward" / "default.yaml")
    assert _same(standalone, _stage(stages, "reward").config) == {}


@pytest.mark.parametrize("algo", ["grpo", "ppo", "dpo"])
def test_algorithm_config_is_the_main_jobs(stages, algo):
    cls = trainer(algo)[0]
    standalone = load_config(cls, ROOT / "configs" / algo / "default.yaml")
    assert _same(standalone, _stage(stages, algo).config) == {}


def test_eval_config_is_the_main_jobs(stages):
    """`mogrpo eval` with its defaults judges like the main job's eval stages: same prompts,
    tokens, weights and KL prompts (the README's standalone eval passes reward_model=)."""
    main = _stage(stages, "eval/grpo").config["eval"]
    standalone = EvalConfig()
    # weights and masks: None = the evaluated run's own (harness.eval_objective), which are the
    # ones the main job passes its eval stage
    assert standalone.weights is None and standalone.not_applicable is None
    grpo = _stage(stages, "grpo").config
    assert (main.weights, main.not_applicable) == (grpo.weights, grpo.not_applicable)
    resolved = dataclasses.replace(standalone, weights=grpo.weights,
                                   not_applicable=grpo.not_applicable)
    # settings left unset are the evaluated run's own (eval/run_settings.py), as for the stage
    run_cfg = to_dict(grpo)
    assert _same(with_run_settings(resolved, run_cfg), with_run_settings(main, run_cfg)) == {}


def test_a_changed_setting_is_caught(stages):
    """The comparison can fail: a standalone override shows up as a difference."""
    cls = trainer("grpo")[0]
    changed = load_config(cls, ROOT / "configs" / "grpo" / "default.yaml", ["lr=1e-4"])
    assert set(_same(changed, _stage(stages, "grpo").config)) == {"lr"}
