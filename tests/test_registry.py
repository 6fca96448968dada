"""The registry carries each algorithm's facts, and an algorithm added to it alone (no edit of
the pipeline or the CLI) is trained by `mogrpo train <name>` and `mogrpo run`."""

from __future__ import annotations

import importlib
import json
import textwrap
from pathlib import Path

import pytest

from mogrpo.cli import main
from mogrpo.config import ConfigError, from_dict, load_config
from mogrpo.pipeline import RunConfig, build_stages, run_config_class
from mogrpo.rl import registry

ROOT = Path(__file__).resolve().parent.parent

STUB = '''
"""A fifth algorithm for tests: a config of its own and a train function that writes a file."""
import json
from dataclasses import dataclass
from pathlib import Path

from mogrpo.config import field
from mogrpo.rl.config import OnlineConfig


@dataclass
class StubConfig(OnlineConfig):
    """Config of `mogrpo train stub`."""

    stub_knob: float = field(0.5, help="a key only the stub algorithm has")


def train_stub(cfg, output, *, resume=False, show_progress=True):
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "stub.json").write_text(json.dumps({"steps": cfg.steps, "knob": cfg.stub_knob}))
    return {"cost": {"wall_seconds": 0.0}}
'''


@pytest.fixture
def stub(tmp_path, monkeypatch):
    """The algorithm "stub", registered in the registry alone, from a module in tmp_path."""
    (tmp_path / "mogrpo_stub_algorithm.py").write_text(textwrap.dedent(STUB))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    entry = registry.Algorithm("stub", "mogrpo_stub_algorithm", "StubConfig", "train_stub",
                               "a stub algorithm for tests", lambda c: 2.0 * c.steps,
                               outputs=("stub.json",))
    monkeypatch.setitem(registry.ALGORITHMS, "stub", entry)
    return entry


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_a_registered_algorithm_gets_its_section_and_stages(stub, tmp_path, seeds):
    cls = run_config_class()
    cfg = from_dict(cls, {"algorithms": ["grpo", "stub"], "stub": {"steps": 3, "stub_knob": 0.25},
                          "seeds": seeds})
    stages = {s.name: s for s in build_stages(cfg, tmp_path)}
    names = ["stub"] if seeds == [0] else ["stub-s0", "stub-s1"]
    for seed, name in zip(seeds, names, strict=True):
        train, ev = stages[name], stages[f"eval/{name}"]
        assert type(train.config).__name__ == "StubConfig"
        assert (train.config.steps, train.config.stub_knob, train.config.seed) == (3, 0.25, seed)
        assert train.config.reward_model == str(tmp_path / "reward" / "model")
        assert train.config.eval_prompts == "none"  # the pipeline's eval stage evaluates
        assert train.inputs == ["reward"] and train.estimate == 6.0  # the stub's own estimate
        assert ev.config["model"] == name and ev.inputs == ["reward", "evaluator_reward", name]
    assert list(stages)[:3] == ["reward", "evaluator_reward", "eval/base"]
    # the same section by a dotted override, as on the command line
    cfg = load_config(cls, None, ["algorithms=[stub]", "stub.steps=5"])
    assert next(s for s in build_stages(cfg, tmp_path) if s.name == "stub").config.steps == 5


def test_the_stage_runs_mogrpo_train_with_the_algorithm(stub, tmp_path, monkeypatch):
    import mogrpo.stages as stages

    calls = []
    monkeypatch.setattr(stages, "_subprocess_stage", lambda *a: calls.append(a))
    cfg = from_dict(run_config_class(), {"algorithms": ["stub"]})
    stage = next(s for s in build_stages(cfg, tmp_path) if s.name == "stub")
    stage.run(tmp_path / "stub", False)
    assert calls[0][0] == ["train", "stub"] and calls[0][1] is stage.config


def test_unknown_sections_and_algorithms_are_clear_errors(stub):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['sac'\]; valid keys are: .*stub"):
        from_dict(run_config_class(), {"sac": {"steps": 3}})
    with pytest.raises(ValueError, match=r"subset of \['grpo', 'ppo', 'dpo', 'rloo', 'stub'\]"):
        from_dict(run_config_class(), {"algorithms": ["grpo", "sac"]})
    with pytest.raises(ConfigError, match="StubConfig: unknown key"):
        build_stages(from_dict(run_config_class(), {"algorithms": ["stub"], "stub": {"stepz": 3}}),
                     Path("r"))


def test_the_cli_lists_and_trains_a_registered_algorithm(stub, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0 and "a stub algorithm for tests" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["train", "stub", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "usage: mogrpo train stub" in out
    assert "Writes stub.json" in out and "stub_knob" in out and "a key only the stub" in out
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert "stub (default {}): StubConfig keys" in capsys.readouterr().out
    assert main(["train", "stub", "--output", str(tmp_path / "run"), "steps=4"]) == 0
    assert json.loads((tmp_path / "run" / "stub.json").read_text()) == {"steps": 4, "knob": 0.5}


def test_a_name_of_a_run_key_is_refused(monkeypatch):
    entry = registry.Algorithm("seeds", "m", "C", "t", "d", lambda c: 0.0)
    monkeypatch.setitem(registry.ALGORITHMS, "seeds", entry)
    with pytest.raises(ValueError, match=r"\['seeds'\] take the name of a `mogrpo run` key"):
        run_config_class()


def test_the_facts_of_every_algorithm():
    assert run_config_class() is RunConfig  # built once per set of registered algorithms
    assert registry.TRAINERS is registry.ALGORITHMS  # the former name
    for name, algo in registry.ALGORITHMS.items():
        cls, fn = registry.trainer(name)
        assert (algo.name, algo.section) == (name, name)
        assert cls is algo.config_class() and callable(fn) and fn.__name__ == algo.train
        assert registry.algorithm_of(cls()) == name and algo.description
        assert {"final/", "eval_after.json", "cost.json", "metrics.jsonl"} <= set(algo.outputs)
    with pytest.raises(ValueError, match="unknown algorithm 'sac'; known: grpo, ppo, dpo, rloo"):
        registry.trainer("sac")


def test_the_estimates_are_the_measured_ones():
    """Seconds on 2 CPU cores: GRPO 15, PPO 31, RLOO 17 per step of 16 sequences of 48 tokens;
    DPO 3.5 per pair prompt of 4 samples (configs/quick.yaml: 2 steps of 8, 12 tokens)."""
    cfg = load_config(RunConfig, ROOT / "configs" / "quick.yaml", ["algorithms=[grpo,ppo,dpo,rloo]",
                                                                  "rloo={batch_size: 8, steps: 2}"])
    estimates = {s.name: s.estimate for s in build_stages(cfg, Path("r"))}
    assert {a: estimates[a] for a in ("grpo", "ppo", "dpo", "rloo")} == {
        "grpo": 3.75, "ppo": 7.75, "dpo": 3.5, "rloo": 4.25}
    defaults = {name: registry.algorithm(name).estimate(registry.trainer(name)[0]())
                for name in registry.ALGORITHMS}
    assert defaults == {"grpo": 900.0, "ppo": 1860.0, "dpo": 840.0, "rloo": 1020.0}
