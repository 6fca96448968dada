"""Nothing a user does loses their files or runs code from a file; a killed run resumes to the
uninterrupted result (SIGKILL at seeded random moments, including inside checkpoint writes);
a damaged newest checkpoint falls back to the previous one; one process per output folder."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, make_data, run_overrides
from safetensors.torch import load_file

from mogrpo.cli import main

ROOT = Path(__file__).resolve().parents[1]

# A child process that runs `mogrpo ARGS` and SIGKILLs itself at the N-th call of one point:
# a scoring call (mid-step), a metrics row, torch.save (inside a checkpoint write, before the
# state file), os.replace (a write finished, before its rename) or the reward trainer's validation.
KILLER = r'''
import os, signal, sys
point, n = os.environ["KILL_POINT"], int(os.environ["KILL_N"])
calls = [0]

def dying(real):
    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return wrapper

if point == "score":
    from mogrpo.reward import scoring
    scoring.Scorer.score = dying(scoring.Scorer.score)
elif point == "log":
    from mogrpo import tracking
    tracking.Tracker.log = dying(tracking.Tracker.log)
elif point == "save":
    import torch
    torch.save = dying(torch.save)
elif point == "replace":
    os.replace = dying(os.replace)
elif point in ("gap", "final"):
    real_replace = os.replace

    def watched(src, dst):
        parent, name = os.path.split(os.fspath(dst))
        if point == "gap":  # an old folder set aside, its replacement not yet renamed in
            hit = ".tmp-" in os.path.basename(os.fspath(src)) and any(
                f.startswith(f".{name}.old-") for f in os.listdir(parent or "."))
        else:  # the rename that puts final/ (or a reward model's model/) in place
            hit = name in ("final", "model") and ".tmp-" in os.path.basename(os.fspath(src))
        if hit:
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = watched
elif point == "validate":
    import mogrpo.reward.train as rt
    rt.evaluate = dying(rt.evaluate)
from mogrpo.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _run(args: list[str], tmp_path: Path, point: str | None = None, n: int = 0) -> int:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "KILL_POINT": point or "none", "KILL_N": str(n), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300).returncode


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_killed_five_times_resumes_to_the_uninterrupted_adapter(tiny_policy_dir,
                                                                     tiny_reward_model_dir,
                                                                     prompt_file, tmp_path):
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", FAST,
                         steps=12, save_every=1, keep_checkpoints=2, report_to=[])
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(["train", "grpo", "--quiet", "--output", str(full), *args], tmp_path) == 0
    rng = random.Random(12)
    # n <= 2 (3 for os.replace, which a step calls twice): a killed process makes at most 2 steps,
    # so
    # every one of the five moments is reached within the 12 steps
    # every kind of moment once (mid-step scoring, a metrics row, a checkpoint's state write, a
    # rename), a fifth drawn at random, in a seeded order
    points = ["score", "log", "save", "replace", rng.choice(["score", "log", "save", "replace"])]
    rng.shuffle(points)
    kills = [(p, rng.randint(1, 3 if p == "replace" else 2)) for p in points]
    codes = []
    for i, (point, n) in enumerate(kills):
        resume = ["--resume"] if i else []
        codes.append(_run(["train", "grpo", "--quiet", "--output", str(part), *resume, *args],
                          tmp_path, point, n))
    # every moment was reached, and the process died
    assert codes == [-signal.SIGKILL] * 5, (kills, codes)
    assert _run(["train", "grpo", "--quiet", "--output", str(part), "--resume", *args],
                tmp_path) == 0
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kills
    assert _steps(part) == list(range(1, 13))  # each step exactly once
    assert not [p for p in part.rglob(".*tmp*")]  # no temp file or folder of a killed write is left


@pytest.mark.slow
def test_reward_trainer_killed_twice_resumes_to_the_uninterrupted_model(tiny_encoder_dir, tmp_path):
    from mogrpo.reward.model import MultiAspectRewardModel

    data = make_data(tmp_path / "data.jsonl")
    args = [f"backbone={tiny_encoder_dir}", f"data=[{data}]", "aspects=[safety, politeness]",
            "max_length=32", "batch_size=8", "patience=5", "lr=1e-3", "epochs=4",
            "splits=[0.6, 0.2, 0.2]"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(["reward", "train", "--quiet", "--output", str(full), *args], tmp_path) == 0
    # validation of epoch 2 (after epoch 1's state), then inside epoch 3's state write
    assert _run(["reward", "train", "--quiet", "--output", str(part), *args], tmp_path, "validate",
                2) == -9
    assert _run(["reward", "train", "--quiet", "--output", str(part), "--resume", *args], tmp_path,
                "save", 2) == -9
    assert _run(["reward", "train", "--quiet", "--output", str(part), "--resume", *args],
                tmp_path) == 0
    a = MultiAspectRewardModel.load(full / "model").state_dict()
    b = MultiAspectRewardModel.load(part / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in rows] == [(r["step"], "loss" in r) for r in full_rows]
    # the trainer state is removed after success (keep_state=false)
    assert not (part / "checkpoints").exists()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_policy_dir,
                                                              tiny_reward_model_dir, prompt_file,
                                                              tmp_path, monkeypatch, capsys):
    from mogrpo.reward import scoring

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", FAST, steps=4,
                         save_every=1, keep_checkpoints=0, report_to=[])
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "grpo", "--quiet", "--output", str(full), *args]) == 0
    real, calls = scoring.Scorer.score, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # step 4, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(scoring.Scorer, "score", dying)
    assert main(["train", "grpo", "--quiet", "--output", str(part), *args]) == 130
    monkeypatch.setattr(scoring.Scorer, "score", real)
    newest = part / "checkpoints" / "checkpoint-3" / "trainer_state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a damaged newest checkpoint
    capsys.readouterr()
    assert main(["train", "grpo", "--quiet", "--output", str(part), "--resume", *args]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint checkpoint-3" in err and "resumed from" in err and \
        "checkpoint-2" in err
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(part) == [1, 2, 3, 4]


def test_run_never_deletes_a_users_folder_inside_the_output(tmp_path):
    """Data loss before: `mogrpo run` removed OUTPUT/reward, a user's own trained model and notes,
    because its stage hash did not match."""
    from mogrpo.pipeline import RunConfig, run_pipeline

    out = tmp_path / "run"
    (out / "reward" / "model").mkdir(parents=True)
    (out / "reward" / "notes.md").write_text("my reward model, trained by hand")
    (out / "reward" / "model" / "model.safetensors").write_bytes(b"weights")
    (out / ".mogrpo").write_text("{}")  # even inside a folder mogrpo made
    with pytest.raises(ValueError,
                       match=r"reward exists but is not a stage folder of `mogrpo run`"):
        run_pipeline(RunConfig(algorithms=["grpo"]), out, log=lambda m: None)
    assert (out / "reward" / "notes.md").read_text() == "my reward model, trained by hand"
    assert (out / "reward" / "model" / "model.safetensors").read_bytes() == b"weights"


def test_reward_train_never_overwrites_a_users_config(tmp_path, capsys):
    """Data loss before: `reward train --output DIR` replaced DIR/config.yaml before validating."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my: settings\n")
    assert main(["reward", "train", "--output", str(out), "data=[nonexistent.jsonl]"]) == 2
    assert (out / "config.yaml").read_text() == "my: settings\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_config_is_written_only_after_validation(tiny_encoder_dir, tmp_path):
    """In a folder mogrpo made, a start that fails leaves the previous config.yaml as it was."""
    out = tmp_path / "rm"
    data = make_data(tmp_path / "d.jsonl")
    ok = [f"backbone={tiny_encoder_dir}", f"data=[{data}]", "aspects=[safety]", "max_length=32",
          "epochs=1", "splits=[0.6, 0.2, 0.2]"]
    assert main(["reward", "train", "--quiet", "--output", str(out), *ok]) == 0
    before = (out / "config.yaml").read_text()
    assert main(["reward", "train", "--quiet", "--output", str(out), *ok,
                 "backbone=./no-such-backbone"]) == 2
    assert (out / "config.yaml").read_text() == before


class _Evil:
    target = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_crafted_reward_trainer_state_does_not_run(tiny_encoder_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    data = make_data(tmp_path / "d.jsonl")
    args = [f"backbone={tiny_encoder_dir}", f"data=[{data}]", "aspects=[safety]", "max_length=32",
            "epochs=1", "splits=[0.6, 0.2, 0.2]", "keep_state=true"]
    assert main(["reward", "train", "--quiet", "--output", str(out), *args]) == 0
    marker = tmp_path / "PWNED"
    _Evil.target = str(marker)
    # the one checkpoint format
    (state,) = (out / "checkpoints").glob("checkpoint-*/trainer_state.pt")
    torch.save({"trainable": _Evil()}, state)
    assert main(["reward", "train", "--quiet", "--output", str(out), "--resume", *args]) == 2
    assert not marker.exists()
    assert "will not load" in capsys.readouterr().err


def test_crafted_judge_pickles_do_not_run(tmp_path):
    import joblib

    from mogrpo.reward.judges import ASSET_SHA256, ToxicityJudge, UntrustedModelError

    marker = tmp_path / "PWNED"
    _Evil.target = str(marker)
    for f in ("vectorizer.joblib", "model.joblib"):
        joblib.dump(_Evil(), tmp_path / f)
    # a folder the user names
    with pytest.raises(UntrustedModelError, match="trust_toxicity_model=true"):
        ToxicityJudge(tmp_path)
    with pytest.raises(UntrustedModelError, match="is not the pinned"):  # a tampered default asset
        ToxicityJudge(tmp_path, sha256=ASSET_SHA256)
    assert not marker.exists()


def test_no_pickle_loading_in_the_package():
    sources = {p: p.read_text() for p in (ROOT / "mogrpo").rglob("*.py")}
    assert not [p for p, s in sources.items() if "weights_only=False" in s]
    assert not [p for p, s in sources.items() if "pickle.load" in s]


def test_a_second_process_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".mogrpo").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
        "from mogrpo.runfolder import claim_output; claim_output(Path(sys.argv[1]), 'test'); "
        "print('held', flush=True); time.sleep(60)"), str(out), str(ROOT)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["reward", "train", "--output", str(out)]) == 2
        assert "in use by another mogrpo process (pid" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock file stays, and the next process takes it over
    from mogrpo.runfolder import claim_output

    assert "pid" in (out / ".mogrpo.lock").read_text()
    claim_output(out, "test").release()


def test_stale_temp_files_are_removed_when_a_run_takes_its_folder(tmp_path):
    from mogrpo.config import atomic_write_text
    from mogrpo.runfolder import claim_output

    out = tmp_path / "run"
    atomic_write_text(out / "metrics.jsonl", "")
    (out / ".mogrpo").write_text("{}")
    # a killed checkpoint write
    (out / "checkpoints" / ".checkpoint-4.tmp-ab12cd34").mkdir(parents=True)
    (out / ".metrics.jsonl.tmp-xyz").write_text("half")
    (out / "notes.txt").write_text("kept")
    claim_output(out, "test").release()
    assert sorted(p.name for p in out.rglob("*")) == [".mogrpo", ".mogrpo.lock", "checkpoints",
                                                      "metrics.jsonl", "notes.txt"]


def test_ctrl_c_ends_in_one_line_naming_the_checkpoint(tiny_policy_dir, tiny_reward_model_dir,
                                                       prompt_file, tmp_path):
    # never finishes by itself: 400 steps of this tiny run take ~10 s
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", FAST,
                         steps=100000, save_every=1, report_to=[])
    out = tmp_path / "run"
    # SIGINT handled and unblocked in the child, whatever this process inherited
    def as_from_a_terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen([sys.executable, "-m", "mogrpo.cli", "train", "grpo", "--quiet",
                             "--output", str(out),
                             *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=as_from_a_terminal)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    status = Path(f"/proc/{proc.pid}/status")
    signals = ([x for x in status.read_text().splitlines() if x.startswith("Sig")]
               if status.is_file() else [])
    proc.send_signal(signal.SIGINT)
    try:
        err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"SIGINT did not end the run within 60 s; the child's signal state: "
                             f"{signals}") from None
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mogrpo: interrupted; the last checkpoint is ") and \
        "checkpoints/checkpoint-" in line
    assert line.endswith("--resume") and "train grpo" in line


def test_overrides_may_sit_on_either_side_of_the_options(tmp_path, capsys):
    from mogrpo.cli import _parse, build_parser

    args = _parse(build_parser(), ["train", "grpo", "lr=0.1", "--output", str(tmp_path), "steps=2",
                                   "--quiet", "seed=3"])
    assert args.overrides == ["lr=0.1", "steps=2", "seed=3"] and args.quiet
    with pytest.raises(SystemExit) as exc:
        _parse(build_parser(), ["train", "grpo", "--output", str(tmp_path), "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_resume_reports_changed_keys_and_config_yaml_tells_the_truth(tiny_policy_dir,
                                                                     tiny_reward_model_dir,
                                                                     prompt_file, tmp_path, capsys):
    import yaml

    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", FAST, steps=2,
                         save_every=1, report_to=[])
    out = tmp_path / "run"
    assert main(["train", "grpo", "--quiet", "--output", str(out), *args]) == 0
    capsys.readouterr()
    assert main(["train", "grpo", "--quiet", "--output", str(out), "--resume", *args, "lr=0.01",
                 "steps=3"]) == 0
    err = capsys.readouterr().err
    assert "lr: the run was started with 0.05; 0.01 is ignored" in err and \
        "steps: 2 -> 3 (the new value" in err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.05 and saved["steps"] == 3
    assert _steps(out) == [1, 2, 3]


def test_text_is_cut_by_characters_before_tokenising(tiny_reward_model_dir, monkeypatch):
    """A 12 MB response costs no more than a long one: the tokenizer never sees more than
    CHARS_PER_TOKEN * max_length characters of a text, and the scores are those of the cut text."""
    from mogrpo.reward.model import CHARS_PER_TOKEN, MultiAspectRewardModel

    rm = MultiAspectRewardModel.load(tiny_reward_model_dir)
    cls, seen = type(rm.tokenizer), []
    real = cls.__call__

    def spy(self, text, *a, **k):
        seen.append(max(len(t) for t in text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(cls, "__call__", spy)
    huge = "bread " * 2_000_000
    s, n_trunc = rm.score(["how do i bake bread"], [huge], return_truncated=True)
    cut = huge[:CHARS_PER_TOKEN * rm.spec.max_length]
    assert max(seen) <= len(cut) and n_trunc == 1
    assert torch.equal(s, rm.score(["how do i bake bread"], [cut]))


@pytest.mark.slow
def test_ten_seeded_kills_lose_nothing_and_resume_to_the_uninterrupted_result(
        tiny_encoder_dir, tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path):
    """SIGKILL at 10 seeded moments: 7 in a GRPO run that selects checkpoints (mid-step scoring,
    a metrics row, a checkpoint's state write, a rename, the instant between setting best/ aside
    and renaming its replacement in, the rename of final/, and one drawn at random) and 3 in a
    reward model's training (validation, a state write, the rename of model/). After each kill
    the selected weights (best/) and final files that existed are still there (or come back at
    the next start); the resumed runs end as the uninterrupted ones did."""
    from mogrpo.config import recover_folders

    rng = random.Random(25)
    validation = tmp_path / "validation.jsonl"
    validation.write_text(prompt_file.read_text())  # another path: selection may read it
    args = run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", FAST,
                         steps=14, save_every=1, keep_checkpoints=2, report_to=[],
                         validation_prompts=str(validation), validate_every=2)
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(["train", "grpo", "--quiet", "--output", str(full), *args], tmp_path) == 0
    # first a checkpoint write (the second: one checkpoint is complete), so that every later
    # process resumes and restores best/ over the one there (the gap's moment); the rest in a
    # seeded order; final/'s rename last, when every step is made
    middle = ["score", "log", "replace", "gap", rng.choice(["score", "log", "save", "replace"])]
    rng.shuffle(middle)
    kills = [("save", 2), *[(p, 1 if p == "gap" else rng.randint(1, 2)) for p in middle],
             ("final", 1)]
    codes = []
    for i, (point, n) in enumerate(kills):
        before = (part / "best" / "trainable.safetensors").is_file()
        resume = ["--resume"] if i else []
        codes.append(_run(["train", "grpo", "--quiet", "--output", str(part), *resume, *args],
                          tmp_path, point, n))
        recover_folders(part)  # what the next start does first
        assert (part / "best" / "trainable.safetensors").is_file() or not before, (point, n)
    assert codes == [-signal.SIGKILL] * 7, (kills, codes)
    assert _run(["train", "grpo", "--quiet", "--output", str(part), "--resume", *args],
                tmp_path) == 0
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kills
    assert _steps(part) == [0, *range(1, 15)]  # the base's validation row, then each step once
    assert not [p for p in part.rglob(".*tmp*")] and not [p for p in part.rglob(".*.old-*")]

    data = make_data(tmp_path / "data.jsonl")
    rm_args = [f"backbone={tiny_encoder_dir}", f"data=[{data}]", "aspects=[safety, politeness]",
               "max_length=32", "batch_size=8", "patience=5", "lr=1e-3", "epochs=3",
               "splits=[0.6, 0.2, 0.2]", "report_to=[]"]
    rm_full, rm_part = tmp_path / "rm_full", tmp_path / "rm_part"
    assert _run(["reward", "train", "--quiet", "--output", str(rm_full), *rm_args], tmp_path) == 0
    rm_kills = [("validate", rng.randint(1, 2)), ("save", rng.randint(1, 2)), ("final", 1)]
    rm_codes = [_run(["reward", "train", "--quiet", "--output", str(rm_part),
                      *(["--resume"] if i else []), *rm_args], tmp_path, point, n)
                for i, (point, n) in enumerate(rm_kills)]
    assert rm_codes == [-signal.SIGKILL] * 3, (rm_kills, rm_codes)
    assert _run(["reward", "train", "--quiet", "--output", str(rm_part), "--resume", *rm_args],
                tmp_path) == 0
    from mogrpo.reward.model import MultiAspectRewardModel

    x = MultiAspectRewardModel.load(rm_full / "model").state_dict()
    y = MultiAspectRewardModel.load(rm_part / "model").state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x), rm_kills
