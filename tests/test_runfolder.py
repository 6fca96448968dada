"""Run folders (mogrpo/runfolder.py): links planted in a run folder never make mogrpo write
the file they point to; a folder holds one kind of run; outputs get the modes the umask
gives; the package loads no pickle outside the one vouched-for place; the process group of
a multi-process run is torn down by every process, once all are done."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
from helpers import FAST, make_data, run_overrides

from mogrpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("mogrpo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _run_folder(tmp_path: Path, name: str = "run") -> Path:
    """A folder mogrpo made (its marker, kindless as old versions wrote it) with a config."""
    out = tmp_path / name
    out.mkdir()
    (out / ".mogrpo").write_text("{}")
    (out / "config.yaml").write_text("lr: 0.123\n")
    return out


# ----------------------------------------------------------------------------- links and links

@pytest.mark.parametrize("name", [".mogrpo.lock", ".mogrpo"])
def test_a_link_planted_as_lock_or_marker_is_refused(name, tmp_path, capsys):
    """The lock is truncated and rewritten by every command, the marker written by the first:
    through a link either would overwrite the file it points to."""
    from mogrpo.runfolder import OutputError, claim_output

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = _run_folder(tmp_path)
    if name == ".mogrpo":
        (out / ".mogrpo").unlink()
        (out / ".stage-hash").write_text("abc")  # still a folder mogrpo made
    (out / name).symlink_to(victim)
    before = _sha(victim)
    with pytest.raises(OutputError, match=rf"{name} is a symbolic link \(to .*victim\.txt\)"):
        claim_output(out, "train grpo")
    # as a command: one line naming the link, exit 2
    assert main(["reward", "train", "--quiet", "--output", str(out)]) == 2
    line = _one_error(capsys)
    assert f"{out / name} is a symbolic link" in line and "choose another --output" in line
    assert _sha(victim) == before and (out / name).is_symlink()
    assert (out / "config.yaml").read_text() == "lr: 0.123\n"


def test_a_dangling_marker_link_creates_nothing(tmp_path):
    """A link to a file that does not exist yet: writing the marker through it would create
    that file wherever the link points."""
    from mogrpo.runfolder import OutputError, claim_output

    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "elsewhere" / "planted"
    target.parent.mkdir()
    (out / ".mogrpo").symlink_to(target)
    with pytest.raises(OutputError, match=r"\.mogrpo is a symbolic link"):
        claim_output(out, "eval")
    assert not target.exists() and not (out / ".mogrpo.lock").exists()


def test_a_lock_hard_linked_to_another_file_is_refused(tmp_path):
    from mogrpo.runfolder import OutputError, claim_output

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = _run_folder(tmp_path)
    os.link(victim, out / ".mogrpo.lock")
    with pytest.raises(OutputError, match=r"\.mogrpo\.lock has 2 hard links"):
        claim_output(out, "train grpo")
    assert victim.read_text() == "precious\n"
    # the marker is only read (and created new): a hard-linked one (a `cp -al` copy) is fine
    (out / ".mogrpo.lock").unlink()
    (out / ".mogrpo").unlink()
    os.link(victim, out / ".mogrpo")
    claim_output(out, "train grpo").release()
    assert victim.read_text() == "precious\n"


def test_a_linked_checkpoints_folder_is_not_cleaned(tmp_path):
    """Stale temps are removed from the run folder and its checkpoints/, never from the folder
    a link named checkpoints points to."""
    from mogrpo.runfolder import claim_output

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".keep.tmp-abc").write_text("not mogrpo's")
    out = _run_folder(tmp_path)
    (out / "checkpoints").symlink_to(elsewhere)
    (out / ".metrics.jsonl.tmp-xyz").write_text("half")
    claim_output(out, "train grpo").release()
    assert (elsewhere / ".keep.tmp-abc").read_text() == "not mogrpo's"
    assert not (out / ".metrics.jsonl.tmp-xyz").exists()


# ----------------------------------------------------------------------------- one kind per folder

def test_the_marker_records_the_kind_and_another_kind_is_refused(tmp_path):
    from mogrpo.runfolder import OutputError, claim_output

    out = tmp_path / "run"
    lock = claim_output(out, "train grpo")
    (out / "config.yaml").write_text("lr: 0.1\n")  # what the run writes
    lock.release()
    marker = json.loads((out / ".mogrpo").read_text())
    assert marker["kind"] == marker["command"] == "train grpo"
    claim_output(out, "train grpo").release()  # the same kind again: a resume
    for other in ("reward train", "eval", "run", "train ppo", "data prepare"):
        with pytest.raises(OutputError) as exc:
            claim_output(out, other)
        assert str(exc.value) == (f"--output {out} holds a `mogrpo train grpo` run (.mogrpo says "
                                  f"so), not a `mogrpo {other}` one, and its files would be "
                                  f"replaced: choose another --output")
    assert json.loads((out / ".mogrpo").read_text()) == marker


def test_claiming_without_a_kind_takes_any_mogrpo_folder_and_marks_nothing(tmp_path):
    """command=None (--overwrite, which moves a run aside): the lock of a folder mogrpo made,
    whatever its kind; a folder mogrpo did not make is still refused."""
    from mogrpo.runfolder import OutputError, claim_output

    out = tmp_path / "rm"
    lock = claim_output(out, "reward train")
    (out / "config.yaml").write_text("lr: 0.1\n")
    lock.release()
    marker = (out / ".mogrpo").read_text()
    assert json.loads(marker)["kind"] == "reward train"
    claim_output(out, None).release()
    assert (out / ".mogrpo").read_text() == marker
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not created by mogrpo"):
        claim_output(mine, None)


@pytest.mark.parametrize("exists", [False, True])
def test_a_claim_that_wrote_nothing_leaves_nothing(exists, tmp_path):
    """A command refused for a bad input after it claimed its output (the policy is checked
    when the run loads it) leaves the path as it found it: no folder holding only a marker
    and a lock (an empty folder it was given stays, empty)."""
    from mogrpo.runfolder import claim_output, release_all

    out = tmp_path / "a" / "b" / "run"
    if exists:
        out.mkdir(parents=True)
    claim_output(out, "train grpo")
    assert sorted(p.name for p in out.iterdir()) == [".mogrpo", ".mogrpo.lock"]
    release_all()  # what the CLI does when a command ends, however it ends
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == (
        [Path("a"), Path("a/b"), Path("a/b/run")] if exists else [])
    lock = claim_output(out, "train grpo")
    (out / "metrics.jsonl").write_text("")  # the command wrote something: its output stays
    lock.release()
    assert sorted(p.name for p in out.iterdir()) == [".mogrpo", ".mogrpo.lock", "metrics.jsonl"]


@pytest.mark.parametrize("text", ["", "{}", "not json", '{"mogrpo": "0.1"}'])
def test_old_markers_without_a_kind_are_accepted(text, tmp_path):
    from mogrpo.runfolder import claim_output

    out = tmp_path / "run"
    out.mkdir()
    (out / ".mogrpo").write_text(text)
    claim_output(out, "reward train").release()
    claim_output(out, "train grpo").release()
    assert (out / ".mogrpo").read_text() == text  # left as the older version wrote it


def test_a_marker_of_the_version_before_kind_counts_by_its_command(tmp_path):
    """Markers written before `kind` already named the command: they protect their run too."""
    from mogrpo.runfolder import OutputError, claim_output

    out = _run_folder(tmp_path)
    (out / ".mogrpo").write_text(json.dumps({"command": "reward train", "mogrpo": "0.1"}))
    with pytest.raises(OutputError, match=r"holds a `mogrpo reward train` run"):
        claim_output(out, "train grpo")
    claim_output(out, "reward train").release()


def _reward_args(tmp_path: Path, encoder: Path) -> list[str]:
    data = make_data(tmp_path / "rm.jsonl", n=40)
    kw = {"backbone": str(encoder), "data": [str(data)], "aspects": ["safety", "politeness"],
          "max_length": 32, "batch_size": 8, "epochs": 1, "splits": [0.6, 0.2, 0.2]}
    return [f"{k}={json.dumps(v)}" for k, v in kw.items()]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".mogrpo.lock"}


@pytest.mark.slow
def test_reward_train_into_a_grpo_run_and_back_are_refused(tiny_policy_dir, tiny_reward_model_dir,
                                                           prompt_file, tiny_encoder_dir,
                                                           tmp_path, capsys):
    """A finished GRPO run folder given to `reward train` (which would replace its
    config.yaml, metrics and final/), and a reward-model folder given to `train grpo`: one
    line each, exit 2, every file as it was."""
    grpo, rm = tmp_path / "grpo", tmp_path / "rm"
    grpo_args = ["--quiet", *run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file,
                                           "grpo", FAST)]
    reward_args = ["--quiet", *_reward_args(tmp_path, tiny_encoder_dir)]
    assert main(["train", "grpo", "--output", str(grpo), *grpo_args]) == 0
    assert main(["reward", "train", "--output", str(rm), *reward_args]) == 0
    capsys.readouterr()
    for folder, argv, holds, wants in (
            (grpo, ["reward", "train", *reward_args], "train grpo", "reward train"),
            (rm, ["train", "grpo", *grpo_args], "reward train", "train grpo")):
        before = _tree(folder)
        assert "config.yaml" in before
        assert main([*argv, "--output", str(folder)]) == 2
        line = _one_error(capsys)
        assert f"holds a `mogrpo {holds}` run" in line and f"not a `mogrpo {wants}` one" in line
        assert "its files would be replaced: choose another --output" in line
        assert _tree(folder) == before


# ----------------------------------------------------------------------------- modes

@pytest.mark.parametrize("umask,file_mode,folder_mode", [(0o022, 0o644, 0o755),
                                                         (0o077, 0o600, 0o700)])
def test_outputs_get_the_modes_the_umask_gives(umask, file_mode, folder_mode, tmp_path):
    """What atomic_write_text and atomic_folder write has the mode a plain open()/mkdir()
    would give (not mkstemp's 0600 or mkdtemp's 0700, which kept other users of a shared
    machine from reading a run)."""
    from mogrpo.config import atomic_folder, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_write_text(tmp_path / "a.json", "{}")  # replacing one too
        with atomic_folder(tmp_path / "final") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
        with atomic_folder(tmp_path / "final") as tmp:  # replacing one too
            (tmp / "w.bin").write_bytes(b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "final").stat().st_mode) == folder_mode
    assert (tmp_path / "final" / "w.bin").read_bytes() == b"y"


# ----------------------------------------------------------------------------- no pickles

# Unpickling runs code. The one place the package unpickles: the toxicity judge's joblib
# files, only after their sha256 matches the pinned asset or with trust_toxicity_model=true
# (mogrpo/reward/judges.py; tests/test_robustness.py tries crafted ones).
ALLOWED = {("mogrpo/reward/judges.py", "joblib.load"): 2}
PICKLING = {"pickle", "cPickle", "_pickle", "joblib", "dill", "cloudpickle", "shelve"}


def _unpickling_calls(tree: ast.AST) -> list[str]:
    """The calls in `tree` that can unpickle: pickle/joblib/dill loads, Unpickler, shelve,
    pandas.read_pickle, numpy.load with allow_pickle not False, torch.load without
    weights_only=True (and imports of such functions by name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING:
            found += [f"from {node.module} import {a.name}" for a in node.names
                      if a.name in ("load", "loads", "Unpickler", "open")]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr, owner = node.func.attr, node.func.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        kw = {k.arg: k.value for k in node.keywords}
        if name in PICKLING and attr in ("load", "loads", "Unpickler", "open"):
            found.append(f"{name}.{attr}")
        elif attr == "read_pickle":
            found.append(f"{name}.read_pickle")
        elif name in ("np", "numpy") and attr == "load" and "allow_pickle" in kw and not (
                isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
            found.append(f"{name}.load(allow_pickle=...)")
        elif name == "torch" and attr == "load" and not (
                isinstance(kw.get("weights_only"), ast.Constant)
                and kw["weights_only"].value is True):
            found.append("torch.load without weights_only=True")
    return found


def test_the_scan_finds_every_way_to_unpickle():
    src = """
import pickle, joblib, numpy as np, torch, pandas as pd
from joblib import load
pickle.load(f); pickle.loads(b); joblib.load(p); np.load(p, allow_pickle=True)
np.load(p, allow_pickle=flag); pd.read_pickle(p); torch.load(p); torch.load(p, weights_only=False)
pickle.Unpickler(f)
np.load(p); np.load(p, allow_pickle=False); torch.load(p, weights_only=True)
"""
    assert _unpickling_calls(ast.parse(src)) != []
    assert sorted(_unpickling_calls(ast.parse(src))) == sorted([
        "from joblib import load", "pickle.load", "pickle.loads", "joblib.load",
        "np.load(allow_pickle=...)", "np.load(allow_pickle=...)", "pd.read_pickle",
        "torch.load without weights_only=True", "torch.load without weights_only=True",
        "pickle.Unpickler"])


def test_no_unpickling_in_the_package_but_the_vouched_judge():
    seen: dict[tuple[str, str], int] = {}
    for path in sorted((ROOT / "mogrpo").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for call in _unpickling_calls(ast.parse(path.read_text(encoding="utf-8"))):
            seen[(rel, call)] = seen.get((rel, call), 0) + 1
    assert seen == ALLOWED


# ----------------------------------------------------------------------------- process groups

CLOSE_SCRIPT = """
import sys, time
import torch
import torch.distributed as dist
from mogrpo.runtime import Runtime

rt = Runtime(device="cpu")
assert rt.world == 2 and dist.is_initialized()
total = rt.all_sum(torch.tensor([float(rt.rank + 1)]))
if rt.rank == 1:
    time.sleep(2)  # the other process reaches close() first and must wait
rt.close()
rt.close()  # again: nothing left to close
assert not dist.is_initialized()
print(f"rank {rt.rank} sum {total.item():g} closed", flush=True)
"""


@pytest.mark.slow
def test_close_waits_for_every_process_then_tears_the_group_down(tmp_path):
    from helpers import accelerate_launch

    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    proc = accelerate_launch("ddp", [], script=str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two processes share one stdout: their lines may run together, so find each one
    assert sorted(re.findall(r"rank \d sum \d+ closed", proc.stdout)) == [
        "rank 0 sum 3 closed", "rank 1 sum 3 closed"]


def test_close_without_a_process_group_is_a_no_op():
    import torch.distributed as dist

    from mogrpo.runtime import Runtime

    rt = Runtime(device="cpu")
    rt.close()
    rt.close()
    assert not (dist.is_available() and dist.is_initialized())


def test_free_ports_are_free():
    import socket

    from helpers import free_port

    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))  # nobody holds it
    assert 1024 <= port <= 65535
