"""The baselines' tuning budget: each algorithm tries the same settings count, and the
validation split keeps one by the checkpoint rule (mogrpo/rl/selection.py, mogrpo/pipeline.py),
on fixture runs whose validation records make the right choice known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mogrpo.config import ConfigError
from mogrpo.pipeline import RunConfig, build_stages, keep_best_setting, tune_settings
from mogrpo.rl.selection import select_setting

BASE = {"step": 0, "compliance": 0.9, "over_refusal": 0.02, "degenerate": 0.01}


def rec(compliance, over_refusal, degenerate=0.01, step=30):
    return {"step": step, "compliance": compliance, "over_refusal": over_refusal,
            "degenerate": degenerate}


def test_select_setting_by_hand():
    # setting 0 refuses everything (over-refusal 0.3): out; 1 and 2 within limits, 2 safer
    i, why = select_setting([rec(0.1, 0.30), rec(0.6, 0.04), rec(0.5, 0.05)], BASE, 0.05, 0.02)
    assert i == 2 and why.startswith("setting 2:") and "2 settings" in why
    # a tie goes to the earlier setting; a degenerate run is out
    assert select_setting([rec(0.5, 0.0, degenerate=0.2), rec(0.5, 0.0), rec(0.5, 0.01)], BASE,
                          0.05, 0.02)[0] == 1
    # none within the limits: the lowest over-refusal
    i, why = select_setting([rec(0.2, 0.4), rec(0.3, 0.2)], BASE, 0.05, 0.02)
    assert i == 1 and "no validated" in why


def _fake_run(folder: Path, selection: dict, lr: float) -> None:
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "adapter_model.safetensors").write_bytes(f"weights lr={lr}".encode())
    (folder / "checkpoints" / "checkpoint-30").mkdir(parents=True)
    (folder / "stage.json").write_text("{}")
    cost = {"selection": {**selection, "max_over_refusal": 0.05, "max_degenerate_rise": 0.02},
            "validation": [BASE, selection]}
    (folder / "cost.json").write_text(json.dumps(cost))


def test_keep_best_setting_copies_the_chosen_run(tmp_path):
    settings = [{"lr": 1e-4}, {"lr": 4e-4}, {"lr": 1.6e-3}]
    records = [rec(0.7, 0.0), rec(0.4, 0.03), rec(0.05, 0.5)]  # the last over-refuses: out
    tries = []
    for i, (st, r) in enumerate(zip(settings, records, strict=True)):
        _fake_run(tmp_path / f"ppo-t{i}", r, st["lr"])
        tries.append(f"ppo-t{i}")
    out = tmp_path / "ppo"
    out.mkdir()
    record = keep_best_setting(tmp_path, tries, settings, out)
    assert record["chosen"] == 1 and record["setting"] == {"lr": 4e-4} and record["from"] == \
        "ppo-t1"
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == b"weights lr=0.0004"
    assert not (out / "checkpoints").exists() and not (out / "stage.json").exists()
    written = json.loads((out / "tuning.json").read_text())
    assert [s["compliance"] for s in written["settings"]] == [0.7, 0.4, 0.05] and \
        written["base"] == BASE


def test_keep_best_setting_needs_validated_runs(tmp_path):
    from mogrpo.pipeline import PipelineError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cost.json").write_text(json.dumps({"selection": None, "validation": []}))
    with pytest.raises(PipelineError, match="not validated"):
        keep_best_setting(tmp_path, ["a"], [{}], tmp_path / "out")


def test_tune_builds_one_run_per_setting_and_a_choice(tmp_path):
    cfg = RunConfig(algorithms=["grpo", "dpo"], seeds=[0, 1],
                    tune={"grpo": {"lr": [2e-4, 4e-4, 8e-4]},
                          "dpo": {"lr": [2e-5, 5e-5, 1e-4], "beta": [.1, .1, .2]}})
    names = [s.name for s in build_stages(cfg, tmp_path)]
    for algo in ("grpo", "dpo"):
        for seed in (0, 1):
            tries = [f"{algo}-s{seed}-t{i}" for i in range(3)]
            assert all(t in names for t in tries)
            assert names.index(f"{algo}-s{seed}") > max(names.index(t) for t in tries)
            assert names.index(f"eval/{algo}-s{seed}") > names.index(f"{algo}-s{seed}")
    stages = {s.name: s for s in build_stages(cfg, tmp_path)}
    assert stages["dpo-s1-t2"].config.lr == 1e-4 and stages["dpo-s1-t2"].config.beta == 0.2
    assert stages["dpo-s1-t2"].config.seed == 1 and stages["grpo-s0"].inputs == \
        [f"grpo-s0-t{i}" for i in range(3)]
    assert tune_settings(cfg.tune, "grpo") == [{"lr": 2e-4}, {"lr": 4e-4}, {"lr": 8e-4}]
    assert tune_settings({}, "ppo") == [{}]


@pytest.mark.parametrize("tune, message", [
    ({"grpo": {"lr": [1e-4, 2e-4]}, "ppo": {"lr": [1e-4, 2e-4, 3e-4]}}, "same number of settings"),
    ({"grpo": {"lr": [1e-4, 2e-4]}}, "same number of settings"),  # ppo untuned: not the same budget
    ({"grpo": {"lr": [1e-4], "beta": [0.1, 0.2]}, "ppo": {"lr": [1e-4]}}, "same length"),
    ({"sac": {"lr": [1e-4]}}, "not among algorithms"),
    ({"grpo": {"lr": []}, "ppo": {"lr": []}}, "non-empty lists"),
])
def test_tune_errors_say_what_to_do(tune, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(algorithms=["grpo", "ppo"], tune=tune)


def test_tune_may_not_set_the_seed(tmp_path):
    cfg = RunConfig(algorithms=["grpo"], tune={"grpo": {"seed": [1, 2]}})
    with pytest.raises(ConfigError, match="seed"):
        build_stages(cfg, tmp_path)
