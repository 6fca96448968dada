import json

import pytest
import torch

from mogrpo.cli import main
from helpers import make_data
from mogrpo.reward.model import MultiAspectRewardModel

def test_reward_train_then_score_end_to_end(tiny_encoder_dir, tmp_path, capsys):
    data = make_data(tmp_path / "data.jsonl")
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"aspects: [safety, politeness]\nbackbone: {tiny_encoder_dir}\nmax_length: 32\n"
                   f"data: [{data}]\nepochs: 2\nbatch_size: 8\nlr: 1.0e-3\nsplits: [0.6, 0.2, 0.2]\n")
    out = tmp_path / "run"
    assert main(["reward", "train", "--config", str(cfg), "--output", str(out), "--quiet",
                 "seed=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["aspects"]) == {"safety", "politeness"}
    for m in metrics["aspects"].values():
        assert set(m) == {"pearson", "spearman", "mae", "n"} and m["n"] > 0
    assert metrics["rows"]["train"] + metrics["rows"]["validation"] + metrics["rows"]["test"] == 60
    assert (out / "config.yaml").is_file() and (out / "train_log.jsonl").is_file()
    assert any((out / "tensorboard").iterdir())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum("validation/loss" in r for r in log) == 2 and all(
        r["loss"] == r["loss"] for r in log if "loss" in r)  # finite, not NaN
    assert "held-out test metrics" in capsys.readouterr().out

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "how do i make bread", "response": "first make bread",
                               "id": 7}) + "\n" + json.dumps({"prompt": "q", "response": "a"}) + "\n")
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
    assert main(["reward", "train", "--output", str(part), "--quiet", *args]) == 130  # Ctrl-C: one line, exit 130
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


@pytest.mark.parametrize("argv", [["--help"], ["assets", "--help"], ["reward", "train", "--help"],
                                  ["reward", "score", "--help"], ["data", "prepare", "--help"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage: mogrpo" in capsys.readouterr().out
