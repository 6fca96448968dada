import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_data

from mogrpo.cli import build_parser, main
from mogrpo.reward.model import MultiAspectRewardModel


def test_reward_train_then_score_end_to_end(tiny_encoder_dir, tmp_path, capsys):
    data = make_data(tmp_path / "data.jsonl")
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"aspects: [safety, politeness]\nbackbone: {tiny_encoder_dir}\n"
                   f"max_length: 32\ndata: [{data}]\nepochs: 2\nbatch_size: 8\nlr: 1.0e-3\n"
                   "splits: [0.6, 0.2, 0.2]\n")
    out = tmp_path / "run"
    assert main(["reward", "train", "--config", str(cfg), "--output", str(out), "--quiet",
                 "seed=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["aspects"]) == {"safety", "politeness"}
    for m in metrics["aspects"].values():
        assert set(m) == {"pearson", "spearman", "mae", "n"} and m["n"] > 0
    assert metrics["rows"]["train"] + metrics["rows"]["validation"] + metrics["rows"]["test"] == 60
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert any((out / "tensorboard").iterdir())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("validation/loss" in r for r in log) == 2 and all(
        r["loss"] == r["loss"] for r in log if "loss" in r)  # finite, not NaN
    assert "held-out test metrics" in capsys.readouterr().out

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "how do i make bread", "response": "first make bread",
                               "id": 7}) + "\n"
                   + json.dumps({"prompt": "q", "response": "a"}) + "\n")
    assert main(["reward", "score", "--model", str(out / "model"), "--input", str(inp),
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == 7 and set(rows[0]["scores"]) == {"safety", "politeness"}
    model = MultiAspectRewardModel.load(out / "model")
    expected = model.score(["how do i make bread"], ["first make bread"])[0].tolist()
    assert rows[0]["scores"]["safety"] == pytest.approx(expected[0], abs=1e-6)


def test_killed_run_resumes_to_the_same_weights(tiny_encoder_dir, tmp_path, monkeypatch):
    import mogrpo.reward.train as rt

    data = make_data(tmp_path / "data.jsonl")
    args = [f"backbone={tiny_encoder_dir}", f"data=[{data}]", "aspects=[safety, politeness]",
            "max_length=32", "batch_size=8", "patience=5", "lr=1e-3", "epochs=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["reward", "train", "--output", str(full), "--quiet", *args]) == 0

    real_evaluate = rt.evaluate
    calls = {"n": 0}

    def crash_in_third_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # validation of epoch 3: epochs 1-2 are checkpointed
            raise KeyboardInterrupt("simulated kill")
        return real_evaluate(*a, **k)

    monkeypatch.setattr(rt, "evaluate", crash_in_third_epoch)
    # Ctrl-C: one line, exit 130
    assert main(["reward", "train", "--output", str(part), "--quiet", *args]) == 130
    assert not (part / "metrics.json").exists()
    monkeypatch.setattr(rt, "evaluate", real_evaluate)
    assert main(["reward", "train", "--output", str(part), "--quiet", "--resume", *args]) == 0
    a = MultiAspectRewardModel.load(full / "model").state_dict()
    b = MultiAspectRewardModel.load(part / "model").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["reward", "train", "--output", str(tmp_path / "x"), "epoch=3"]) == 2
    assert "unknown key(s) ['epoch']" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    assert main(["reward", "score", "--model", str(tmp_path), "--input", str(bad),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def _commands(parser, path=()):
    """Every command path of the parser: (), ("assets",), ("reward",), ("reward", "train"), ..."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def test_the_commands_are_all_there():
    groups = {(), ("reward",), ("train",), ("data",)}
    assert {" ".join(c) for c in COMMANDS if c not in groups} == {
        "assets", "reward train", "reward score", "reward data", "train grpo", "train ppo",
        "train dpo", "train rloo", "eval", "run", "sweep", "data prepare", "export", "report"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda c: " ".join(c) or "mogrpo")
def test_every_subcommand_has_help(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    usage = f"usage: {' '.join(('mogrpo', *path))}"
    assert exc.value.code == 0 and usage in capsys.readouterr().out


def test_help_does_not_import_torch():
    """Building the parser, parsing, and the help of `mogrpo`, `mogrpo train` and `mogrpo run`
    import no config class (torch): their config keys are read only for the help that lists
    them."""
    code = ("import sys\n"
            "from mogrpo.cli import _parse, build_parser, main\n"
            "_parse(build_parser(), ['train', 'grpo', '--output', 'x', 'steps=2'])\n"
            "for argv in (['--help'], ['train', '--help'], ['run', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("argv", [["train", "grpo"], ["reward", "train"]])
def test_interrupted_names_the_last_checkpoint(argv, tmp_path):
    """After Ctrl-C, every trainer's run folder is read the same way (checkpoints/latest)."""
    from mogrpo.cli import _interrupted, _parse

    out = tmp_path / "run"
    full = [*argv, "--output", str(out), "--quiet"]
    args = _parse(build_parser(), full)
    assert "before the first checkpoint; start again with: mogrpo " in _interrupted(args, full)
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("checkpoint-4\n")
    line = _interrupted(args, full)
    assert f"the last checkpoint is {out / 'checkpoints' / 'checkpoint-4'}" in line
    assert line.endswith("--quiet --resume")
    args = _parse(build_parser(), ["eval", "--model", "m", "--output", str(out)])
    assert "nothing was written that a rerun needs" in _interrupted(args, [])
