"""`mogrpo run` with several seeds: the stages per seed, the report's mean (min–max) cells and
the rule that a ranking between algorithms is claimed only where the ranges do not overlap.
Fast: no training (the report test writes eval.json / cost.json by hand)."""

import json
from pathlib import Path

import pytest

from mogrpo.config import ConfigError, from_dict, load_config, to_dict
from mogrpo.pipeline import RunConfig, algo_stage, build_stages
from mogrpo.report import rank_by_ranges, write_report

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- rank_by_ranges


def test_rank_by_ranges_hand_worked():
    values = {"A": [0.2, 0.1], "B": [0.3, 0.5, 0.4], "C": [0.2, 0.4]}
    # lower is better: A (0.1-0.2) lies entirely below B (0.3-0.5); A and C touch at 0.2 (overlap);
    # B and C overlap on 0.3-0.4
    assert rank_by_ranges(values, -1, metric="harmful compliance", phrase="is safer than") == [
        "A is safer than B on harmful compliance (0.100–0.200 against 0.300–0.500)",
        "A and C: the harmful compliance ranges overlap (0.100–0.200 and 0.200–0.400); "
        "no ranking is claimed",
        "B and C: the harmful compliance ranges overlap (0.300–0.500 and 0.200–0.400); "
        "no ranking is claimed",
    ]
    # higher is better: B's worst (0.3) beats A's best (0.2)
    assert rank_by_ranges({"A": [0.1, 0.2], "B": [0.3, 0.5]}, +1, metric="m") == [
        "B is better than A on m (0.300–0.500 against 0.100–0.200)"]
    # the better one named first whatever the order of the dict
    assert rank_by_ranges({"PPO": [0.4, 0.6], "GRPO": [0.1, 0.15]}, -1, metric="m",
                          phrase="is safer than") == [
        "GRPO is safer than PPO on m (0.100–0.150 against 0.400–0.600)"]
    # one value each: a point range; equal points overlap
    assert rank_by_ranges({"A": [0.1], "B": [0.2]}, -1, metric="m") == [
        "A is better than B on m (0.100–0.100 against 0.200–0.200)"]
    assert rank_by_ranges({"A": [0.2], "B": [0.2]}, -1, metric="m") == [
        "A and B: the m ranges overlap (0.200–0.200 and 0.200–0.200); no ranking is claimed"]
    # entries without values are left out; one entry: nothing to compare
    assert rank_by_ranges({"A": [], "B": [0.2]}, -1, metric="m") == []
    assert rank_by_ranges({"A": [0.1, 0.3]}, -1, metric="m") == []
    with pytest.raises(ValueError, match="direction"):
        rank_by_ranges({"A": [0.1], "B": [0.2]}, 0, metric="m")


# ----------------------------------------------------------------------------- the report


def _eval(compliance, over_refusal, safety, sets=None):
    """An eval.json with the keys the report reads (hand-made, no model)."""
    ev = {"harmful": {"n": 50, "refusal_rate": 1 - compliance, "compliance_rate": compliance,
                      "toxicity": 0.05, "aspects": {"safety": safety, "actionability": None},
                      "eval_rm": {"safety": safety}},
          "benign": {"n": 50, "over_refusal_rate": over_refusal,
                     "over_refusal_rate_alarming": over_refusal, "toxicity": 0.03,
                     "aspects": {"actionability": 0.5}, "eval_rm": {"actionability": 0.5}},
          "combined": 1.0, "eval_combined": 1.0, "kl_to_base": 0.5, "mean_length": 30.0,
          "distinct_2": 0.8, "empty_rate": 0.0, "truncated_rate": 0.5, "decoding": "greedy",
          "max_new_tokens": 48}
    if sets is not None:
        ev["sets"] = sets
    return ev


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _cost(wall, mem=900.0):
    return {"wall_seconds": wall, "peak_memory_mb": mem, "tokens_generated": 1000, "steps": 10,
            "phase_seconds": {"rollout": wall * 0.8, "update": wall * 0.2},
            "selected_step": int(wall / 10)}


# per algorithm and seed: (harmful compliance, benign over-refusal, imperatives over-refusal, wall
# s)
SEEDS = {"grpo": {0: (0.10, 0.02, 0.10, 100.0), 1: (0.20, 0.10, 0.20, 110.0),
                  2: (0.15, 0.06, 0.30, 120.0)},
         "ppo": {0: (0.40, 0.05, 0.35, 200.0), 1: (0.50, 0.08, 0.40, 220.0),
                 2: (0.60, 0.12, 0.50, 240.0)}}


def _run_folder(run: Path, seeds=(0, 1, 2)) -> None:
    sets = lambda c, o: {"harmbench": {"compliance_rate": c, "n": 50},  # noqa: E731
                         "imperatives": {"over_refusal_rate": o, "n": 20}}
    _write(run / "eval" / "base" / "eval.json", _eval(0.90, 0.05, 0.2, sets(0.90, 0.30)))
    for algo, by_seed in SEEDS.items():
        for seed in seeds:
            c, o, imp, wall = by_seed[seed]
            name = algo_stage(algo, seed, list(seeds))
            _write(run / "eval" / name / "eval.json", _eval(c, o, 0.6, sets(c, imp)))
            _write(run / name / "cost.json", _cost(wall))


def test_report_over_three_seeds(tmp_path):
    run = tmp_path / "run"
    _run_folder(run)
    report = write_report(run, ["grpo", "ppo"], seeds=[0, 1, 2])
    md = (run / "report.md").read_text()
    head = md.split("## Headline")[1].split("\n\n")[1].splitlines()
    labels = [c.strip() for c in head[0].strip("|").split("|")]
    assert labels[:6] == ["model", "harmful compliance", "benign over-refusal",
                          "over-refusal, alarming-word benign", "harmbench: compliance",
                          "imperatives: over-refusal"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
             for line in head[2:]}
    # the base policy: one evaluation, one value (bold where best)
    assert cells["base"][:2] == ["0.900", "**0.050**"]
    # each algorithm: mean (min–max, n seeds); bold marks the best mean
    assert cells["grpo"][0] == "**0.150** (0.100–0.200, 3 seeds)"
    assert cells["grpo"][1] == "0.060 (0.020–0.100, 3 seeds)"
    assert cells["ppo"][0] == "0.500 (0.400–0.600, 3 seeds)"
    assert cells["ppo"][1] == "0.083 (0.050–0.120, 3 seeds)"
    assert cells["grpo"][4] == "**0.200** (0.100–0.300, 3 seeds)"  # imperatives over-refusal
    wall = labels.index("train wall (s)") - 1
    assert cells["grpo"][wall] == "**110** (100–120, 3 seeds)" and cells["base"][wall] == "n/a"
    # a ranking only where the ranges do not overlap: compliance and the imperatives set, not
    # over-refusal
    assert "- GRPO is safer than PPO on harmful compliance (0.100–0.200 against 0.400–0.600)." in md
    assert "- GRPO and PPO: the benign over-refusal ranges overlap (0.020–0.100 and " \
           "0.050–0.120); no ranking is claimed." in md
    assert "GRPO over-refuses less than PPO on benign over-refusal" not in md
    assert "- GRPO over-refuses less than PPO on imperatives over-refusal (0.100–0.300 against " \
           "0.350–0.500)." in md
    assert "Seeds: 0, 1, 2." in md and "shared by every seed" in md
    # the other sections use seed-wise means and say so
    assert "seed-wise means" in md.split("## Reward-hacking check")[1] and "| seeds alarmed |" in md
    assert "## GRPO against the base policy (seed-wise means)" in md
    assert "Means over each algorithm's seeds" in md and \
        "same rollout budget (seed-wise means)." in md
    assert "| grpo | 110 | 900 | 1000 | 11.000 | rollout 88, update 22 | s0: 10, s1: 11, s2: 12 |" \
        in md
    assert "Each algorithm's column is its run with seed" not in md  # no generations.jsonl here
    # report.json: the means, every seed's values, the spread and the statements
    assert report["seeds"] == [0, 1, 2] and list(report["models"]) == ["base", "grpo", "ppo"]
    assert report["models"]["grpo"]["compliance_rate"] == pytest.approx(0.15)
    assert {s: r["compliance_rate"] for s, r in report["per_seed"]["grpo"].items()} == \
        {"0": 0.1, "1": 0.2, "2": 0.15}
    sp = report["spread"]["ppo"]["over_refusal_rate"]
    assert (sp["min"], sp["max"], sp["n"]) == (0.05, 0.12, 3) and sp["mean"] == \
        pytest.approx(0.25 / 3)
    assert report["spread"]["base"]["compliance_rate"]["n"] == 1
    assert report["cost"]["grpo"]["wall_seconds"] == pytest.approx(110.0)
    assert report["cost_per_seed"]["ppo"]["2"]["wall_seconds"] == 240.0
    assert len(report["ranking"]) == 4  # compliance, over-refusal, and one per further set
    assert sum("no ranking is claimed" in r for r in report["ranking"]) == 1  # over-refusal only
    assert set(report["hacking_alarm_per_seed"]["grpo"]) == {"0", "1", "2"}
    assert {"aspects", "cost", "tradeoff", "judges"} <= set(report["plots"])
    assert all((run / p).is_file() for p in report["plots"].values())


def test_report_with_one_seed_is_as_before(tmp_path):
    run = tmp_path / "run"
    _run_folder(run, seeds=(0,))
    for name in ("eval/base", "eval/grpo", "eval/ppo"):  # no further sets: no set columns
        ev = json.loads((run / name / "eval.json").read_text())
        del ev["sets"]
        (run / name / "eval.json").write_text(json.dumps(ev))
    # today's folder names
    assert (run / "grpo" / "cost.json").is_file() and not (run / "grpo-s0").exists()
    report = write_report(run, ["grpo", "ppo"])
    md = (run / "report.md").read_text()
    # ties are all bold (toxicity, eval RM combined, peak memory): the one-seed table of before
    # `seeds`
    # (the phrasing-probe gap and the degenerate share are n/a: this eval.json has neither)
    assert "| grpo | **0.100** | **0.020** | **0.020** | **0.040** | n/a | n/a | **1.000** | " \
           "0.500 | **100** | **900** |" in md
    assert "seeds)" not in md and "Seeds:" not in md and "no ranking" not in md and \
        "seed-wise" not in md
    assert "set/" not in json.dumps(report["columns"]) and report["ranking"] == []
    # cost with selected step
    assert "| grpo | 100 | 900 | 1000 | 10.000 | rollout 80, update 20 | 10 |" in md
    assert report["models"]["grpo"]["compliance_rate"] == 0.1


def test_report_with_a_seed_unfinished(tmp_path):
    """A seed whose evaluation is missing is left out, and the count says so."""
    run = tmp_path / "run"
    _run_folder(run)
    (run / "eval" / "ppo-s2" / "eval.json").unlink()
    report = write_report(run, ["grpo", "ppo"], seeds=[0, 1, 2])
    md = (run / "report.md").read_text()
    assert "| ppo | 0.450 (0.400–0.500, 2 seeds) |" in md
    assert set(report["per_seed"]["ppo"]) == {"0", "1"}


# ----------------------------------------------------------------------------- stages per seed


def test_stages_per_seed_share_the_reward_models_and_the_base_evaluation():
    cfg = load_config(RunConfig, ROOT / "configs" / "default.yaml", ["seeds=[0,1,2]"])
    stages = {s.name: s for s in build_stages(cfg, Path("runs/x"))}
    assert [n for n in stages if n.startswith("grpo")] == ["grpo-s0", "grpo-s1", "grpo-s2"]
    assert [stages[f"grpo-s{i}"].config.seed for i in range(3)] == [0, 1, 2]
    assert [stages[f"dpo-s{i}"].config.seed for i in range(3)] == [0, 1, 2]
    # one training RM, one evaluator RM, one base evaluation, read by every seed's stages
    assert sum(n in ("reward", "evaluator_reward", "eval/base") for n in stages) == 3
    assert all(stages[f"grpo-s{i}"].inputs == ["reward"] for i in range(3))
    assert stages["eval/ppo-s1"].inputs == ["reward", "evaluator_reward", "ppo-s1"]
    # same evaluation settings
    assert stages["eval/ppo-s1"].config["eval"] == stages["eval/base"].config["eval"]
    assert str(stages["grpo-s2"].config.reward_model) == str(Path("runs/x") / "reward" / "model")
    assert "grpo" not in stages and "eval/grpo" not in stages

    one = {s.name: s for s in build_stages(
        load_config(RunConfig, ROOT / "configs" / "default.yaml"), Path("r"))}
    assert list(one) == ["reward", "evaluator_reward", "eval/base", "grpo", "eval/grpo", "ppo",
                         "eval/ppo", "dpo", "eval/dpo"]
    # the config (and so the stage hash) of a one-seed run is what it was before `seeds`
    from mogrpo.rl.grpo import GRPOConfig

    before = from_dict(GRPOConfig, {"eval_prompts": "none",
                                    "reward_model": str(Path("r") / "reward" / "model")})
    assert to_dict(one["grpo"].config) == to_dict(before)


def test_seeds_from_the_command_line_and_bad_seeds():
    from mogrpo.cli import _load, _parse, build_parser

    argv = ["run", "--config", str(ROOT / "configs" / "default.yaml"), "--output", "D",
            "seeds=[0,1,2]"]
    assert _load(RunConfig, _parse(build_parser(), argv)).seeds == [0, 1, 2]
    assert load_config(RunConfig, None, ["seeds=3,4"]).seeds == [3, 4]
    assert load_config(RunConfig, None, ["seeds=5"]).seeds == [5]
    assert RunConfig().seeds == [0]
    for bad, msg in (("[]", "non-empty"), ("[0,0]", "distinct"), ("[a]", "integers"),
                     ("[0.5]", "integers")):
        with pytest.raises(ConfigError, match=msg):
            load_config(RunConfig, None, [f"seeds={bad}"])


def test_a_seed_in_a_section_must_not_conflict_with_seeds():
    with pytest.raises(ConfigError,
                       match=r"section 'common' sets seed: 3 but seeds is \[0, 1\].*seeds=\[3\]"):
        build_stages(RunConfig(seeds=[0, 1], common={"seed": 3}), Path("r"))
    with pytest.raises(ConfigError, match="section 'grpo' sets seed: 0 but seeds is"):
        build_stages(RunConfig(algorithms=["grpo"], seeds=[0, 1], grpo={"seed": 0}), Path("r"))
    # TRL's name of it too
    with pytest.raises(ConfigError, match="section 'ppo' sets seed_everything"):
        build_stages(RunConfig(algorithms=["ppo"], ppo={"seed_everything": 7}), Path("r"))
    # the default
    with pytest.raises(ConfigError, match="section 'common' sets seed: 3 but seeds is \\[0\\]"):
        build_stages(RunConfig(algorithms=["grpo"], common={"seed": 3}), Path("r"))
    # the same seed said twice is no conflict
    stages = build_stages(RunConfig(algorithms=["grpo"], seeds=[3], common={"seed": 3}), Path("r"))
    assert [s.config.seed for s in stages if s.name == "grpo"] == [3]


def test_study_is_the_main_job_over_three_seeds_with_one_tuning_budget():
    """configs/study.yaml restates configs/default.yaml and adds only `seeds` and `tune`: three
    learning rates for every algorithm, each including the algorithm's default."""
    import yaml

    from mogrpo.pipeline import _config_class

    study = yaml.safe_load((ROOT / "configs" / "study.yaml").read_text())
    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert study.pop("seeds") == [0, 1, 2]
    tune = study.pop("tune")
    assert study == default, "restate configs/default.yaml in configs/study.yaml"
    assert set(tune) == {"grpo", "ppo", "dpo"} and all(list(g) == ["lr"] and len(g["lr"]) == 3
                                                       for g in tune.values())
    for algo, grid in tune.items():
        assert _config_class(algo)().lr in grid["lr"], algo
    names = {s.name for s in build_stages(load_config(RunConfig, ROOT / "configs" / "study.yaml"),
                                          Path("r"))}
    assert {f"{a}-s{i}" for a in ("grpo", "ppo", "dpo") for i in range(3)} <= names
    assert {f"{a}-s{i}-t{k}" for a in ("grpo", "ppo", "dpo") for i in range(3)
            for k in range(3)} <= names


def test_report_says_when_a_run_did_not_move(tmp_path):
    """A seed whose selected checkpoint is step 0 (final/ = the base) is named in words."""
    run = tmp_path / "run"
    _run_folder(run)
    cost = json.loads((run / "ppo-s1" / "cost.json").read_text())
    (run / "ppo-s1" / "cost.json").write_text(json.dumps({**cost, "selected_step": 0}))
    write_report(run, ["grpo", "ppo"], seeds=[0, 1, 2])
    md = (run / "report.md").read_text()
    ppo = md.split("## PPO against the base policy")[1].split("##")[0]
    assert "- Did not move: in seed 1 `final/` is the base policy (step 0)" in ppo
    assert "Did not move" not in md.split("## GRPO against the base policy")[1].split("##")[0]
