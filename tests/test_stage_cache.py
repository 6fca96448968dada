"""The stage cache of `mogrpo run` (mogrpo/stages.py) with tiny stages whose `run` is a Python
function writing a file (no model): the hash follows the contents of the files and folders a
config names, and a changed stage is set aside, not deleted, until its replacement exists."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mogrpo import stages as st
from mogrpo._version import __version__
from mogrpo.config import ConfigError, to_dict
from mogrpo.runfolder import clean_stale_temps
from mogrpo.stages import PipelineError, Stage, asides, run_stages, stage_hash


@dataclass
class Cfg:
    data: str = "default"
    value: int = 0
    sources: list[str] = field(default_factory=lambda: ["default"])
    cache_dir: str | None = None


def _old_hash(stage: Stage, upstream: dict[str, str]) -> str:
    """The hash as it was before digests existed (configs naming no local file keep it)."""
    payload = {"stage": stage.name, "config": to_dict(stage.config),
               "inputs": {n: upstream[n] for n in stage.inputs}, "mogrpo": __version__}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stage(cfg: Cfg, name: str = "s", inputs=(), calls: list | None = None, fail=None) -> Stage:
    """A stage that writes out.txt (the config's value and its data file's text) into its
    folder; `calls` records (name, resume) per run; `fail` raises from inside the run."""

    def run(folder: Path, resume: bool) -> None:
        if calls is not None:
            calls.append((name, resume))
        text = Path(cfg.data).read_text() if Path(cfg.data).is_file() else cfg.data
        (folder / "out.txt").write_text(f"{cfg.value}:{text}")
        if fail is not None:
            raise fail

    return Stage(name, cfg, list(inputs), run, 1.0)


# ------------------------------------------------------------------------------- stage_hash --


def test_a_config_naming_no_local_file_hashes_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a bare word is no path, even when such a folder exists
    (tmp_path / "cache").mkdir()
    cfg = Cfg(data="default", sources=["default", "onpolicy", "builtin:all-minilm-l6-v2",
                                       "HuggingFaceTB/SmolLM2-135M-Instruct", "hf:x:org/name",
                                       str(tmp_path / "missing.jsonl")],
              cache_dir=str(tmp_path / "cache"))  # the asset cache is not an input
    s = _stage(cfg)
    assert stage_hash(s, {}, out=tmp_path / "run") == _old_hash(s, {})
    up = _stage(Cfg(), "b", inputs=["s"])
    assert stage_hash(up, {"s": "abc"}) == _old_hash(up, {"s": "abc"})


def test_the_hash_follows_the_contents_of_named_files(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n')
    s = _stage(Cfg(data=str(data)))
    first = stage_hash(s, {})
    assert first != _old_hash(s, {})
    data.write_text('{"a": 1}\n')  # rewritten, same bytes (new mtime): same hash
    assert stage_hash(s, {}) == first
    data.write_text('{"a": 2}\n')  # edited in place: another hash
    edited = stage_hash(s, {})
    assert edited != first
    # in a list, and as the file of an hf: source
    data.write_text('{"a": 1}\n')
    listed = _stage(Cfg(sources=["default", str(data)]))
    via_hf = _stage(Cfg(sources=[f"hf:pku-saferlhf:{data}"]))
    before = stage_hash(listed, {}), stage_hash(via_hf, {})
    data.write_text('{"a": 3}\n')
    after = stage_hash(listed, {}), stage_hash(via_hf, {})
    assert before[0] != after[0] and before[1] != after[1]


def test_the_hash_follows_the_contents_of_a_named_folder(tmp_path):
    rm = tmp_path / "external-rm"
    (rm / "model").mkdir(parents=True)
    (rm / "model" / "weights.bin").write_bytes(b"\x00" * 64)
    (rm / "config.json").write_text("{}")
    s = _stage(Cfg(data=str(rm)))
    first = stage_hash(s, {})
    # mogrpo's bookkeeping, temp files and set-aside copies are not content
    (rm / ".mogrpo.lock").write_text("pid 1")
    (rm / "stage.json").write_text("{}")
    (rm / ".stage-hash").write_text("x")
    (rm / ".config.json.tmp-abc123").write_text("half")
    (rm / ".model.previous-0123abcd").mkdir()
    (rm / ".model.previous-0123abcd" / "weights.bin").write_bytes(b"old")
    assert stage_hash(s, {}) == first
    (rm / "model" / "weights.bin").write_bytes(b"\x01" * 64)  # retrained, same size
    retrained = stage_hash(s, {})
    assert retrained != first
    (rm / "model" / "weights.bin").rename(rm / "model" / "other.bin")  # renamed: other content
    assert stage_hash(s, {}) not in (first, retrained)


def test_folders_of_the_run_are_not_digested(tmp_path):
    """A stage's inputs inside the run folder are covered by the upstream hashes."""
    out = tmp_path / "run"
    (out / "reward" / "model").mkdir(parents=True)
    (out / "reward" / "model" / "w.bin").write_bytes(b"1")
    s = _stage(Cfg(data=str(out / "reward" / "model")), inputs=["reward"])
    assert stage_hash(s, {"reward": "h"}, out=out) == _old_hash(s, {"reward": "h"})
    assert stage_hash(s, {"reward": "h"}) != _old_hash(s, {"reward": "h"})  # no run given


def test_a_folder_named_by_several_stages_is_digested_once_per_call(tmp_path, monkeypatch):
    policy = tmp_path / "policy"
    policy.mkdir()
    for i in range(3):
        (policy / f"f{i}.bin").write_bytes(bytes([i]) * 10)
    hashed: list[Path] = []
    real = st.file_sha256
    monkeypatch.setattr(st, "file_sha256", lambda p: hashed.append(p) or real(p))
    stages = [_stage(Cfg(data=str(policy), value=i), f"s{i}") for i in range(3)]
    run_stages(stages, tmp_path / "run", log=lambda m: None)
    assert len(hashed) == 3  # three files, once, for three stages
    hashed.clear()
    run_stages(stages, tmp_path / "run", log=lambda m: None)  # a new call digests afresh
    assert len(hashed) == 3


# ------------------------------------------------------------------------------- run_stages --


def test_an_edited_data_file_reruns_its_stage_and_the_stages_after_it(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("one")
    out, calls, log = tmp_path / "run", [], []
    stages = [_stage(Cfg(data=str(data)), "a", calls=calls),
              _stage(Cfg(value=1), "b", inputs=["a"], calls=calls),
              _stage(Cfg(value=2), "c", calls=calls)]
    run_stages(stages, out, log=log.append)
    assert calls == [("a", False), ("b", False), ("c", False)]
    summary = run_stages(stages, out, log=log.append)
    assert len(calls) == 3 and all(r["cached"] for r in summary.values())
    data.write_text("two")  # the same path, other contents
    summary = run_stages(stages, out, log=log.append)
    assert calls[3:] == [("a", False), ("b", False)]
    assert summary["c"]["cached"] and not summary["a"]["cached"]
    assert (out / "a" / "out.txt").read_text() == "0:two"
    assert asides(out / "a") == [] and asides(out / "b") == []  # replaced: the copies are gone


def test_a_changed_stage_waits_aside_until_its_replacement_is_finished(tmp_path):
    out, calls, log = tmp_path / "run", [], []
    run_stages([_stage(Cfg(value=1), calls=calls)], out, log=log.append)
    old_record = json.loads((out / "s" / "stage.json").read_text())
    seen = {}

    def run(folder: Path, resume: bool) -> None:  # the new run sees the old one aside
        seen["asides"] = [(p.name, (p / "out.txt").read_text(),
                           json.loads((p / "stage.json").read_text())) for p in asides(folder)]
        seen["fresh"] = sorted(x.name for x in folder.iterdir())
        (folder / "out.txt").write_text("new")

    run_stages([Stage("s", Cfg(value=2), [], run, 1.0)], out, log=log.append)
    assert seen["asides"] == [(f".s.previous-{old_record['hash'][:8]}", "1:default", old_record)]
    assert seen["fresh"] == [".stage-hash"]  # a fresh folder
    assert asides(out / "s") == [] and (out / "s" / "out.txt").read_text() == "new"


@pytest.mark.parametrize("fault", [PipelineError("failed (exit 1)"), KeyboardInterrupt()])
def test_a_failed_replacement_keeps_the_finished_stage_and_a_revert_restores_it(tmp_path, fault):
    out, calls, log = tmp_path / "run", [], []
    good = _stage(Cfg(value=1), calls=calls)
    run_stages([good], out, log=log.append)
    record = json.loads((out / "s" / "stage.json").read_text())
    with pytest.raises(type(fault)):
        run_stages([_stage(Cfg(value=2), calls=calls, fail=fault)], out, log=log.append)
    # the finished stage waits aside, whole; the failed one is in place, unfinished
    [aside] = asides(out / "s")
    assert json.loads((aside / "stage.json").read_text()) == record
    assert (aside / "out.txt").read_text() == "1:default"
    assert not (out / "s" / "stage.json").exists()
    assert clean_stale_temps(out) == [] and aside.is_dir()  # no temp file to the cleaner
    st.check_stage_folder(out / "s", out)  # the folders still pass the check

    # back to the old config: restored, not run again
    log.clear()
    summary = run_stages([good], out, log=log.append)
    assert calls == [("s", False), ("s", False)]
    assert log == [f"[1/1] s: restored ({record['seconds']} s when it ran)"]
    assert summary["s"] == {**record, "cached": True}
    assert (out / "s" / "out.txt").read_text() == "1:default"
    assert asides(out / "s") == []  # a finished stage is in place: the copies are dropped
    assert run_stages([good], out, log=log.append)["s"]["cached"] and len(calls) == 2


def test_the_failed_config_again_resumes_in_place(tmp_path):
    out, calls = tmp_path / "run", []
    run_stages([_stage(Cfg(value=1), calls=calls)], out, log=lambda m: None)
    with pytest.raises(PipelineError):
        run_stages([_stage(Cfg(value=2), calls=calls, fail=PipelineError("x"))], out,
                   log=lambda m: None)
    run_stages([_stage(Cfg(value=2), calls=calls)], out, log=lambda m: None)
    assert calls[-1] == ("s", True)  # resumed
    assert asides(out / "s") == [] and (out / "s" / "out.txt").read_text() == "2:default"


def test_an_unfinished_run_set_aside_is_restored_and_resumed(tmp_path):
    out, calls = tmp_path / "run", []
    run_stages([_stage(Cfg(value=1), calls=calls)], out, log=lambda m: None)  # A finished
    for value in (2, 3):  # B fails, then C fails: A and the unfinished B wait aside
        with pytest.raises(PipelineError):
            run_stages([_stage(Cfg(value=value), calls=calls, fail=PipelineError("x"))], out,
                       log=lambda m: None)
    assert len(asides(out / "s")) == 2
    log: list[str] = []
    run_stages([_stage(Cfg(value=2), calls=calls)], out, log=log.append)  # B again
    assert calls[-1] == ("s", True) and "s: resuming" in log[0]
    assert (out / "s" / "out.txt").read_text() == "2:default"
    assert asides(out / "s") == []


def test_nested_stage_folders_move_with_their_parent(tmp_path):
    """The sweep's `point-0/eval` lives inside `point-0`: setting `point-0` aside takes it
    along, and a restore brings it back finished."""
    out, calls = tmp_path / "run", []

    def pair(value: int, fail=None) -> list[Stage]:
        return [_stage(Cfg(value=value), "p", calls=calls, fail=fail),
                _stage(Cfg(value=9), "p/eval", inputs=["p"], calls=calls)]

    run_stages(pair(1), out, log=lambda m: None)
    with pytest.raises(PipelineError):
        run_stages(pair(2, fail=PipelineError("x")), out, log=lambda m: None)
    [aside] = asides(out / "p")
    assert (aside / "eval" / "stage.json").is_file()
    calls.clear()
    summary = run_stages(pair(1), out, log=lambda m: None)
    assert calls == [] and summary["p"]["cached"] and summary["p/eval"]["cached"]
    run_stages(pair(2), out, log=lambda m: None)
    assert calls == [("p", False), ("p/eval", False)] and asides(out / "p") == []


def _raise(exc):
    def f(*args, **kwargs):
        raise exc
    return f


def test_a_copy_whose_deletion_was_cut_short_is_never_restored(tmp_path, monkeypatch):
    out, calls = tmp_path / "run", []
    run_stages([_stage(Cfg(value=1), calls=calls)], out, log=lambda m: None)
    real = st.shutil.rmtree
    monkeypatch.setattr(st.shutil, "rmtree", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed while the old copy was being deleted
        run_stages([_stage(Cfg(value=2), calls=calls)], out, log=lambda m: None)
    monkeypatch.setattr(st.shutil, "rmtree", real)
    [aside] = asides(out / "s")
    assert not (aside / "stage.json").exists() and not (aside / ".stage-hash").exists()
    assert (out / "s" / "stage.json").is_file()  # the new run had finished
    run_stages([_stage(Cfg(value=1), calls=calls)], out, log=lambda m: None)
    assert calls[-1] == ("s", False)  # run again, not restored from the half-deleted copy
    assert asides(out / "s") == []


def test_a_copy_that_cannot_be_deleted_is_a_warning(tmp_path, monkeypatch):
    out, log = tmp_path / "run", []
    run_stages([_stage(Cfg(value=1))], out, log=log.append)
    monkeypatch.setattr(st.shutil, "rmtree", _raise(PermissionError("denied")))
    summary = run_stages([_stage(Cfg(value=2))], out, log=log.append)
    assert not summary["s"]["cached"]
    [aside] = asides(out / "s")
    assert log[-1] == f"warning: cannot delete the old copy {aside} (denied); delete it by hand"


def test_a_folder_mogrpo_did_not_make_is_not_moved(tmp_path):
    out = tmp_path / "run"
    (out / "s").mkdir(parents=True)
    (out / "s" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a stage folder"):
        run_stages([_stage(Cfg())], out, log=lambda m: None)
    assert (out / "s" / "mine.txt").read_text() == "keep" and asides(out / "s") == []


def test_report_only_restores_a_finished_copy_but_runs_nothing(tmp_path):
    out, calls = tmp_path / "run", []
    run_stages([_stage(Cfg(value=1), calls=calls)], out, log=lambda m: None)
    with pytest.raises(PipelineError):
        run_stages([_stage(Cfg(value=2), calls=calls, fail=PipelineError("x"))], out,
                   log=lambda m: None)
    with pytest.raises(ConfigError, match="not finished with this config"):
        run_stages([_stage(Cfg(value=3), calls=calls)], out, log=lambda m: None,
                   only_report=True)
    assert run_stages([_stage(Cfg(value=1), calls=calls)], out, log=lambda m: None,
                      only_report=True)["s"]["cached"]
    assert len(calls) == 2
