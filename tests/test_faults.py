"""Faults leave nothing lost or mixed: a folder replaced by replace-then-delete, a fresh run
refused in a folder that holds another run (or the old one moved aside), a diverged run stopped
with one line naming the step, a full disk reported in one line with the previous checkpoint
intact, a resume that would change the learning-rate schedule refused."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import FAST, run_overrides

from mogrpo.checkpointing import load_checkpoint
from mogrpo.cli import main
from mogrpo.config import atomic_folder, recover_folders


def _errors(capsys) -> list[str]:
    """mogrpo's own lines on stderr (a library's progress bars aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("mogrpo:")]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (the lock's "pid since" line aside)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".mogrpo.lock"}


def test_replace_then_delete_and_recovery(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "a.txt").write_text("old")
    real = os.replace
    calls = []

    def dying(src, dst):  # the second rename (the new folder in) never happens
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    os.replace = dying
    try:
        with pytest.raises(KeyboardInterrupt), atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("new")
    finally:
        os.replace = real
    assert not target.exists() and calls[0][0] == "final"  # the old one is aside, not deleted
    (aside,) = tmp_path.glob(".final.old-*")
    assert recover_folders(tmp_path) == [
        f"restored final from {aside.name} (its replacement never finished)"]
    assert (target / "a.txt").read_text() == "old"
    with atomic_folder(target) as tmp:  # and an uninterrupted replacement leaves nothing aside
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.fixture
def tiny(tiny_policy_dir, tiny_reward_model_dir, prompt_file):
    """key=value overrides of a tiny GRPO run (helpers.FAST) plus the test's own."""
    return lambda **kw: run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo",
                                      FAST, report_to=[], **kw)


def test_a_fresh_run_into_an_old_run_is_refused_or_moves_it_aside(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny(steps=2, save_every=1,
                 keep_checkpoints=0)
    assert main(["train", "grpo", "--quiet", "--output", str(out), *args]) == 0
    before = _tree(out)
    capsys.readouterr()
    assert main(["train", "grpo", "--quiet", "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run (checkpoints/, final/)" in err and "--overwrite" in err
    assert _tree(out) == before  # refused before anything was written
    assert main(["train", "grpo", "--quiet", "--output", str(out), "--overwrite", *args]) == 0
    (aside,) = tmp_path.glob("run.previous-*")
    assert _tree(aside) == before  # the old run, whole, beside the new one
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_fresh_reward_run_into_an_old_one_is_refused(tiny_encoder_dir, tmp_path, capsys):
    from helpers import make_data

    out = tmp_path / "rm"
    args = [f"backbone={tiny_encoder_dir}", f"data=[{make_data(tmp_path / 'd.jsonl')}]",
            "aspects=[safety]", "max_length=32", "epochs=1", "splits=[0.6, 0.2, 0.2]",
            "report_to=[]"]
    assert main(["reward", "train", "--quiet", "--output", str(out), *args]) == 0
    before = _tree(out)
    capsys.readouterr()
    assert main(["reward", "train", "--quiet", "--output", str(out), *args]) == 2
    assert "holds an earlier run (model/)" in capsys.readouterr().err and _tree(out) == before


def test_an_infinite_reward_at_step_3_stops_the_run(tiny, tmp_path, monkeypatch, capsys):
    from mogrpo.reward import sources

    calls = [0]

    def broken(name, cache=None):
        def fn(prompts, completions):
            calls[0] += 1
            return [float("inf") if calls[0] == 3 else 1.0 for _ in completions]
        return fn

    monkeypatch.setattr(sources, "extra_reward", broken)
    out = tmp_path / "run"
    args = tiny(steps=5, save_every=1,
                 keep_checkpoints=2, extra_rewards=["concise"])
    assert main(["train", "grpo", "--quiet", "--output", str(out), *args]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "step 3: reward function 'concise' returned inf" in err[0]
    assert "checkpoints/checkpoint-2, is intact" in err[0]
    steps = [load_checkpoint(out / "checkpoints", lambda s: None)["step"]]
    assert steps == [2] and not (out / "final").exists()
    rows = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]  # nothing of step 3 was logged


def test_a_diverging_learning_rate_stops_with_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny(steps=12, save_every=1,
                 keep_checkpoints=2, lr=1e12, grad_clip=0.0, weight_decay=0.1)
    assert main(["train", "grpo", "--quiet", "--output", str(out), *args]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith("mogrpo: error: step ") and "not finite" in err[0]
    step = int(err[0].split("step ")[1].split(":")[0])
    state = load_checkpoint(out / "checkpoints", lambda s: None)
    if step > 1:  # the last finite checkpoint is the step before, and loads with finite weights
        assert state["step"] == step - 1
        assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert not (out / "final").exists()


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny, tmp_path,
                                                                   monkeypatch,
                                                                   capsys):
    import errno

    real, calls = torch.save, [0]

    def full(obj, f, *a, **k):  # the second checkpoint's state: the disk fills mid-write
        calls[0] += 1
        if calls[0] == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    args = tiny(steps=4, save_every=1,
                 keep_checkpoints=2)
    assert main(["train", "grpo", "--quiet", "--output", str(out), *args]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "No space left on device" in err[0] and "checkpoint-2" in err[0]
    assert load_checkpoint(out / "checkpoints", lambda s: None)["step"] == 1
    assert (out / "checkpoints" / "latest").read_text() == "checkpoint-1"
    assert not [p for p in out.rglob(".*tmp*")]


def test_a_resume_that_would_make_the_schedule_jump_is_refused(tmp_path):
    import yaml

    from mogrpo.rl.grpo import GRPOConfig
    from mogrpo.rl.registry import check_schedule_horizon

    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"steps": 60}))
    check_schedule_horizon(GRPOConfig(steps=80), saved)  # constant: more steps are fine
    check_schedule_horizon(GRPOConfig(steps=60, lr_schedule="cosine"), saved)
    with pytest.raises(ValueError, match=r"steps changed since the run started \(60 -> 80\)"):
        check_schedule_horizon(GRPOConfig(steps=80, lr_schedule="cosine"), saved)
