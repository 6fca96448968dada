"""`mogrpo report RUN [RUN ...] --output DIR`: the pipeline's report of standalone runs (a tiny GRPO
and a tiny RLOO run, each `mogrpo train ALGO`), named by their folders, and its bad inputs."""

import json
import shutil

import pytest
from helpers import FAST, run_overrides

from mogrpo.cli import main


@pytest.fixture(scope="module")
def two_runs(tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path_factory):
    """Two finished one-step runs, GRPO and RLOO, each evaluated before and after training."""
    root = tmp_path_factory.mktemp("standalone")
    runs = []
    for algo, name in (("grpo", "grpo-lr5e-2"), ("rloo", "rloo-lr5e-2")):
        args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, algo, FAST,
                             eval_prompts=str(prompt_file), eval_max_prompts=4,
                             eval_max_new_tokens=6, steps=2, report_to=[])
        assert main(["train", algo, "--quiet", "--output", str(root / name), *args]) == 0
        runs.append(root / name)
    return runs


def _errors(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("mogrpo: error:")]


def test_report_of_standalone_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, two_runs), "--output", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    md = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert md.startswith("# mogrpo report\n")
    assert list(report["models"]) == ["base", "grpo-lr5e-2", "rloo-lr5e-2"]
    head = md.split("## Headline")[1].split("\n\n")[1].splitlines()
    assert [line.split("|")[1].strip() for line in head[2:]] == ["base", "grpo-lr5e-2",
                                                                 "rloo-lr5e-2"]
    after = json.loads((two_runs[1] / "eval_after.json").read_text())
    rloo = next(line for line in head if line.startswith("| rloo-lr5e-2 |"))
    assert f"{after['harmful']['compliance_rate']:.3f}" in rloo
    before = json.loads((two_runs[0] / "eval_before.json").read_text())
    assert report["models"]["base"]["compliance_rate"] == before["harmful"]["compliance_rate"]
    for name in ("grpo-lr5e-2", "rloo-lr5e-2"):
        assert f"## {name.upper()} against the base policy" in md
        assert f"| {name} |" in md.split("## Cost")[1]  # cost.json of each run
    # every plot, training curves of both runs included
    assert {"aspects", "training_curves", "cost", "judges"} <= set(report["plots"])
    for path in report["plots"].values():
        assert (out / path).is_file() and f"]({path})" in md
    assert "## Examples" in md  # the runs' eval generations, side by side
    # a second report into the same folder replaces the first
    assert main(["report", str(two_runs[0]), "--output", str(out)]) == 0
    assert list(json.loads((out / "report.json").read_text())["models"]) == ["base", "grpo-lr5e-2"]


def test_runs_with_one_name_are_told_apart_by_their_parent(two_runs, tmp_path):
    other = tmp_path / "other" / two_runs[0].name
    shutil.copytree(two_runs[0], other)
    out = tmp_path / "report"
    assert main(["report", str(two_runs[0]), str(other), "--output", str(out)]) == 0
    names = list(json.loads((out / "report.json").read_text())["models"])
    assert names == ["base", f"{two_runs[0].parent.name}/{two_runs[0].name}",
                     f"other/{two_runs[0].name}"]


def test_a_pipeline_algorithm_run_is_reported_from_the_pipelines_evaluation(two_runs, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(two_runs[0], pipe / "grpo")
    (pipe / "run_config.yaml").write_text("algorithms: [grpo]\n")
    for name, src in (("base", "eval_before"), ("grpo", "eval_after")):
        ev = json.loads((two_runs[0] / f"{src}.json").read_text())
        ev["harmful"]["compliance_rate"] = 0.25 if name == "grpo" else 0.75
        (pipe / "eval" / name).mkdir(parents=True)
        (pipe / "eval" / name / "eval.json").write_text(json.dumps(ev))
        (pipe / "grpo" / f"{src}.json").write_text("{}")  # trained with eval_prompts=none
    out = tmp_path / "report"
    assert main(["report", str(pipe / "grpo"), str(two_runs[1]), "--output", str(out)]) == 0
    rows = json.loads((out / "report.json").read_text())["models"]
    assert rows["base"]["compliance_rate"] == 0.75 and rows["grpo"]["compliance_rate"] == 0.25


@pytest.mark.parametrize("case, message", [
    ("missing", "no such run folder"),
    ("pipeline", "is a `mogrpo run` folder: its report is"),
    ("not_a_run", "is not a finished policy run"),
    ("no_eval", "holds no evaluation"),
    ("twice", "the same run folder is given twice"),
    ("into_a_run", "holds a `mogrpo train rloo` run"),
])
def test_bad_inputs_are_one_line(case, message, two_runs, tmp_path, capsys):
    runs, out = [str(two_runs[0])], tmp_path / "report"
    bad = tmp_path / "bad"
    if case == "pipeline":
        bad.mkdir()
        (bad / "run_config.yaml").write_text("algorithms: [grpo]\n")
    elif case == "not_a_run":
        bad.mkdir()
    elif case == "no_eval":
        shutil.copytree(two_runs[1], bad)
        (bad / "eval_after.json").write_text("{}")  # trained with eval_prompts=none
    runs += {"missing": [str(bad)], "pipeline": [str(bad)], "not_a_run": [str(bad)],
             "no_eval": [str(bad)], "twice": [str(two_runs[0])], "into_a_run": []}[case]
    if case == "into_a_run":
        out = two_runs[1]
    assert main(["report", *runs, "--output", str(out)]) == 2
    (err,) = _errors(capsys)
    assert message in err, err
    assert not (out / "report.md").exists()
