"""The stages of `mogrpo run` and of the sweep: what a stage is, the builders of the reward,
training, tuning and evaluation stages (each runs as its own `mogrpo` process), their time
estimates, and the cache that runs only what is not finished with the same hash
(pipeline.py's docstring describes the cache)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mogrpo.assets import file_sha256
from mogrpo.config import ConfigError, atomic_write_text, save_config, to_dict
from mogrpo.rl.registry import algorithm
from mogrpo.rl.selection import TUNING_CRITERION, select_setting


class PipelineError(RuntimeError):
    """A stage's process failed; its own error message is above this one."""


@dataclass
class Stage:
    name: str  # folder under the run: "reward", "grpo", "eval/grpo" (seeds: "grpo-s0", ...)
    config: Any  # the stage's dataclass config (hashed)
    inputs: list[str]  # names of the stages it reads
    run: Any  # callable(folder: Path, resume: bool) -> None
    estimate: float  # expected seconds on 2 CPU cores (for the time-left display)


# The stage builders (the sweep builds its stages with them too). Each stage runs as its own
# `mogrpo` process: its peak memory (cost.json) is its own, not the pipeline's high-water mark,
# and all its memory is returned before the next stage starts.
def reward_stage(name: str, rm_cfg) -> Stage:
    """Stage `name`: `mogrpo reward train` with RewardTrainConfig `rm_cfg`."""
    return Stage(name, rm_cfg, [], reward_runner(rm_cfg), estimate_reward(rm_cfg))


def train_stage(name: str, algo: str, acfg, inputs: list[str]) -> Stage:
    """Stage `name`: `mogrpo train <algo>` with config `acfg`, after the stages `inputs`."""
    return Stage(name, acfg, inputs, train_runner(algo, acfg), estimate_train(algo, acfg))


def eval_stage(name: str, model: str, eval_cfg, inputs: list[str], *,
               path: str | None = None) -> Stage:
    """Stage `name`: `mogrpo eval` of `model` (a policy, or the name of the training stage
    whose run folder is `path`) with EvalConfig `eval_cfg`, after the stages `inputs`."""
    return Stage(name, {"model": model, "eval": eval_cfg}, inputs,
                 eval_runner(path or model, eval_cfg), estimate_eval(eval_cfg))


def _subprocess_stage(args: list[str], cfg, folder: Path, resume: bool) -> None:
    import subprocess

    stage_cfg = folder / "stage_config.yaml"
    save_config(cfg, stage_cfg)
    cmd = [sys.executable, "-m", "mogrpo.cli", *args, "--config", str(stage_cfg),
           "--output", str(folder)]
    if resume and args[0] != "eval":
        cmd.append("--resume")
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise PipelineError(f"failed (exit {done.returncode}): {' '.join(cmd)}; fix the cause and "
                            "run the same `mogrpo run` again: finished stages are reused, this "
                            "one resumes")


def reward_runner(rm_cfg):
    """A stage's run: `mogrpo reward train` with `rm_cfg` into the stage folder."""
    return lambda folder, resume: _subprocess_stage(["reward", "train"], rm_cfg, folder, resume)


def train_runner(algo: str, acfg):
    """A stage's run: `mogrpo train <algo>` with `acfg` into the stage folder."""
    return lambda folder, resume: _subprocess_stage(["train", algo], acfg, folder, resume)


def eval_runner(model: str, eval_cfg):
    """A stage's run: `mogrpo eval --model <model>` with `eval_cfg` into the stage folder."""
    return lambda folder, resume: _subprocess_stage(["eval", "--model", model], eval_cfg, folder,
                                                    resume)


def _select_runner(out: Path, tries: list[str], settings: list[dict]):
    return lambda folder, resume: keep_best_setting(out, tries, settings, folder)


def keep_best_setting(out: Path, tries: list[str], settings: list[dict], folder: Path) -> dict:
    """Choose among the tuning runs `tries` (stage names under `out`, one per setting) by the
    validation rule, copy the chosen run into `folder` (its checkpoints left out) and write
    `folder/tuning.json`. Returns that record."""
    costs = []
    for t in tries:
        path = out / t / "cost.json"
        try:
            cost = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path}: cannot read the tuning run's cost.json ({exc})") from None
        if not cost.get("selection") or not cost.get("validation"):
            raise PipelineError(f"{path}: the run was not validated, so no setting can be chosen; "
                                "tuning needs validation_prompts")
        costs.append(cost)
    base = next(r for r in costs[0]["validation"] if r["step"] == 0)
    sel = costs[0]["selection"]
    index, reason = select_setting([c["selection"] for c in costs], base, sel["max_over_refusal"],
                                   sel["max_degenerate_rise"])
    shutil.copytree(out / tries[index], folder, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("checkpoints", "stage.json", ".stage-hash",
                                                  ".mogrpo.lock", "stage_config.yaml"))
    record = {"rule": TUNING_CRITERION, "chosen": index, "setting": settings[index],
              "from": tries[index], "reason": reason, "base": base,
              "settings": [{"setting": st, "run": t, "selected_step": c["selection"]["step"],
                            **{k: c["selection"][k]
                               for k in ("compliance", "over_refusal", "degenerate")}}
                           for st, t, c in zip(settings, tries, costs, strict=True)]}
    atomic_write_text(folder / "tuning.json", json.dumps(record, indent=2))
    return record


# Rough seconds on 2 CPU cores (measured on the default configs), only for the display; each
# algorithm's own estimate is in its registry entry (mogrpo/rl/registry.py).
def estimate_reward(c) -> float:
    """Expected seconds of `mogrpo reward train` with RewardTrainConfig `c`."""
    # seconds per epoch on every prompt, 2 cores: 112 on the packaged data, 2.4x with on-policy
    # rows
    per_epoch = 112.0 * (2.4 if "onpolicy" in c.data else 1.0)
    return per_epoch * c.epochs * (0.5 if c.partition != "all" else 1.0)


def estimate_train(algo: str, c) -> float:
    """Expected seconds of `mogrpo train <algo>` with config `c` (the registry's estimate)."""
    return algorithm(algo).estimate(c)


def estimate_eval(c) -> float:
    """Expected seconds of `mogrpo eval` with EvalConfig `c`."""
    n = c.max_prompts or 379
    return 0.35 * n * c.n * (c.max_new_tokens or 48) / 48 + 1.2 * c.kl_prompts + 15


def stage_hash(stage: Stage, upstream: dict[str, str], *, out: Path | None = None,
               memo: dict | None = None) -> str:
    """The stage's cache key: its config's values, the hashes of the stages it reads, the mogrpo
    version, and the content digest of every local file or folder its config names (outside
    the run folder `out`, whose folders the upstream hashes cover). `memo` caches the digests
    of one run_stages call. A config that names no local file hashes as before digests
    existed."""
    from mogrpo._version import __version__

    cfg = stage.config
    cfg_dict = ({k: (to_dict(v) if hasattr(v, "__dataclass_fields__") else v)
                 for k, v in cfg.items()} if isinstance(cfg, dict) else to_dict(cfg))
    payload = {"stage": stage.name, "config": cfg_dict,
               "inputs": {n: upstream[n] for n in stage.inputs}, "mogrpo": __version__}
    digests = config_digests(cfg_dict, out=out, memo={} if memo is None else memo)
    if digests:  # only then: the hashes of configs naming no local file stay what they were
        payload["digests"] = digests
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Keys whose folders are not inputs of a stage's result: the asset cache (pinned by sha256 and
# verified by mogrpo.assets).
_NOT_INPUTS = {"cache_dir"}
# What a folder digest leaves out: the bookkeeping of mogrpo's own folders, temp files of
# atomic writes, and the copies a changed stage keeps aside.
_NOT_CONTENT = {".mogrpo.lock", "stage.json", ".stage-hash"}
_TEMP_OR_ASIDE = re.compile(r"^\..+(\.tmp-[A-Za-z0-9_]+|\.tmp|\.previous-[0-9a-z-]+)$")


def _strings(value: Any):
    """Every string in a config dict (through dicts and lists), the keys of _NOT_INPUTS left
    out; `hf:<adapter>:<file>` also yields its file."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in _NOT_INPUTS:
                yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value
        if value.startswith("hf:") and value.count(":") >= 2:
            yield value.split(":", 2)[2]


def _local_path(ref: str) -> Path | None:
    """The existing local file or folder `ref` names, or None ('default', 'builtin:...', hub
    ids, keywords and missing paths are not paths)."""
    from mogrpo.runfolder import looks_local

    if not ref or ref.startswith("builtin:") or "://" in ref or "\n" in ref or len(ref) > 1024:
        return None
    try:
        path = Path(ref).expanduser()
        if not path.exists() or not (looks_local(ref) or path.suffix):
            return None
        return path.resolve()
    except (OSError, ValueError):
        return None


def path_digest(path: Path, memo: dict) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative paths and bytes; mogrpo's
    bookkeeping, temp files and aside copies left out). `memo` holds the digests already made,
    keyed by path and the files' sizes and mtimes."""
    if path.is_file():
        st = path.stat()
        files = [("", path, st.st_size, st.st_mtime_ns)]
    else:
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not _TEMP_OR_ASIDE.match(d))
            for f in sorted(filenames):
                if f in _NOT_CONTENT or _TEMP_OR_ASIDE.match(f):
                    continue
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except OSError:  # a dangling link
                    continue
                files.append((p.relative_to(path).as_posix(), p, st.st_size, st.st_mtime_ns))
    key = (str(path), tuple((rel, size, mtime) for rel, _, size, mtime in files))
    if key not in memo:
        h = hashlib.sha256()
        for rel, p, _, _ in files:
            h.update(rel.encode() + b"\0" + bytes.fromhex(file_sha256(p)))
        memo[key] = h.hexdigest()
    return memo[key]


def config_digests(cfg_dict: dict, *, out: Path | None, memo: dict) -> dict[str, str]:
    """{string of the config: content digest} for each local file or folder the config names,
    those under the run folder `out` left out."""
    run = out.resolve() if out is not None else None
    digests = {}
    for ref in _strings(cfg_dict):
        path = _local_path(ref)
        if path is None or ref in digests or (run is not None and path.is_relative_to(run)):
            continue
        digests[ref] = path_digest(path, memo)
    return digests


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def check_stage_folder(folder: Path, out: Path) -> None:
    """A stage folder that exists must be one `mogrpo run` made (.stage-hash): a stale one is
    set aside and replaced, and mogrpo never moves or deletes a folder it did not make."""
    if folder.exists() and not (folder / ".stage-hash").is_file():
        raise ConfigError(f"{folder} exists but is not a stage folder of `mogrpo run` (no "
                          ".stage-hash): mogrpo only replaces folders it made. Move it out of "
                          f"{out}, or choose another --output")


ASIDE = ".previous-"  # a stale stage `NAME` waits as the sibling `.NAME.previous-<hash8>`


def _state(folder: Path) -> tuple[str | None, str | None]:
    """(hash of the finished run in `folder` (stage.json), hash it was started with)."""
    try:
        done = json.loads((folder / "stage.json").read_text()).get("hash")
    except (OSError, ValueError, AttributeError):
        done = None
    try:
        started = (folder / ".stage-hash").read_text().strip() or None
    except OSError:
        started = None
    return done, started


def asides(folder: Path) -> list[Path]:
    """The set-aside copies of the stage folder `folder` (oldest name first)."""
    prefix = f".{folder.name}{ASIDE}"
    if not folder.parent.is_dir():
        return []
    return sorted(p for p in folder.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _set_aside(folder: Path) -> Path:
    """Rename the stage folder to a free `.NAME.previous-<hash8>[-n]` beside it."""
    tag = (_state(folder)[1] or "unknown")[:8]
    target = folder.parent / f".{folder.name}{ASIDE}{tag}"
    n = 2
    while target.exists():
        target, n = folder.parent / f".{folder.name}{ASIDE}{tag}-{n}", n + 1
    os.replace(folder, target)
    return target


def _restore(aside: Path, folder: Path) -> None:
    """Put the set-aside copy `aside` back as `folder` (what is there now is set aside)."""
    if folder.exists():
        _set_aside(folder)
    os.replace(aside, folder)


def _drop_asides(folder: Path, log=print) -> None:
    """Delete the set-aside copies of `folder` (its run is finished): each loses its stage.json
    and .stage-hash first, so a deletion cut short never leaves a copy that would be restored.
    One that cannot be deleted is a warning (the next finish of the stage tries again)."""
    for aside in asides(folder):
        try:
            for name in ("stage.json", ".stage-hash"):
                (aside / name).unlink(missing_ok=True)
            shutil.rmtree(aside)
        except OSError as exc:
            log(f"warning: cannot delete the old copy {aside} ({exc}); delete it by hand")


def _matching_aside(folder: Path, h: str, *, finished: bool) -> Path | None:
    """The set-aside copy of `folder` finished with hash `h` (finished), or started with it and
    not finished (not finished)."""
    for aside in asides(folder):
        done, started = _state(aside)
        if (done == h) if finished else (started == h and done is None):
            return aside
    return None


def run_stages(stages: list[Stage], out: Path, *, log=print, only_report: bool = False,
               t0: float | None = None) -> dict[str, dict]:
    """Run each stage whose folder does not hold a finished run with the same hash (the stage
    cache, module docstring); returns {stage name: its stage.json record + cached flag}.

    A stage whose hash changed is set aside (`.NAME.previous-<hash8>`), not deleted, and run
    into a fresh folder; the copy is deleted once the new run's stage.json is written. If the
    run fails, the copy stays, and a later run whose hash matches it restores it instead of
    running again (a set-aside unfinished run with that hash is restored and resumed)."""
    t0 = time.time() if t0 is None else t0
    hashes: dict[str, str] = {}
    memo: dict = {}  # content digests of the files the configs name, made once per call
    summary: dict[str, dict] = {}
    remaining = sum(s.estimate for s in stages)
    scale = 1.0  # actual / estimated, from the stages run so far
    for i, stage in enumerate(stages, 1):
        h = stage_hash(stage, hashes, out=out, memo=memo)
        hashes[stage.name] = h
        folder = out / stage.name
        done_file, started_file = folder / "stage.json", folder / ".stage-hash"
        remaining -= stage.estimate
        done_hash, started = _state(folder)
        restored = False
        if done_hash != h and (aside := _matching_aside(folder, h, finished=True)):
            check_stage_folder(folder, out)
            _restore(aside, folder)
            done_hash, started, restored = h, h, True
        if done_hash == h:
            done = json.loads(done_file.read_text())
            log(f"[{i}/{len(stages)}] {stage.name}: {'restored' if restored else 'cached'} "
                f"({done['seconds']} s when it ran)")
            summary[stage.name] = {**done, "cached": True}
            _drop_asides(folder, log)
            continue
        if only_report:
            raise ConfigError(f"stage {stage.name} is not finished with this config; run without "
                              "--report-only")
        resume = started == h and done_hash is None
        if not resume and (aside := _matching_aside(folder, h, finished=False)):
            check_stage_folder(folder, out)
            _restore(aside, folder)
            resume = True
        if folder.exists() and not resume:
            check_stage_folder(folder, out)
            _set_aside(folder)  # stale (another config or inputs): kept until this one finishes
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(started_file, h)
        log(f"[{i}/{len(stages)}] {stage.name}: {'resuming' if resume else 'running'} (about "
            f"{_fmt(stage.estimate * scale)}; elapsed {_fmt(time.time() - t0)}; after it about "
            f"{_fmt(remaining * scale)} left)")
        t = time.time()
        try:
            stage.run(folder, resume)
        except PipelineError as exc:
            raise PipelineError(f"stage {stage.name} {exc}") from None
        secs = round(time.time() - t, 1)
        scale = max(0.25, min(4.0, (scale + secs / max(stage.estimate, 1.0)) / 2))
        record = {"hash": h, "seconds": secs, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(done_file, json.dumps(record, indent=2))
        _drop_asides(folder, log)  # the replacement exists now
        summary[stage.name] = {**record, "cached": False}
    return summary
