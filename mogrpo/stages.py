"""The stages of `mogrpo run` and of the sweep: what a stage is, the builders of the reward,
training, tuning and evaluation stages (each runs as its own `mogrpo` process), their time
estimates, and the cache that runs only what is not finished with the same hash
(pipeline.py's docstring describes the cache)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    return 0.35 * n * c.n * c.max_new_tokens / 48 + 1.2 * c.kl_prompts + 15


def stage_hash(stage: Stage, upstream: dict[str, str]) -> str:
    from mogrpo._version import __version__

    cfg = stage.config
    cfg_dict = ({k: (to_dict(v) if hasattr(v, "__dataclass_fields__") else v)
                 for k, v in cfg.items()} if isinstance(cfg, dict) else to_dict(cfg))
    payload = {"stage": stage.name, "config": cfg_dict,
               "inputs": {n: upstream[n] for n in stage.inputs}, "mogrpo": __version__}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def check_stage_folder(folder: Path, out: Path) -> None:
    """A stage folder that exists must be one `mogrpo run` made (.stage-hash): a stale one is
    replaced, and mogrpo never deletes a folder it did not make."""
    if folder.exists() and not (folder / ".stage-hash").is_file():
        raise ConfigError(f"{folder} exists but is not a stage folder of `mogrpo run` (no "
                          ".stage-hash): mogrpo only replaces folders it made. Move it out of "
                          f"{out}, or choose another --output")


def run_stages(stages: list[Stage], out: Path, *, log=print, only_report: bool = False,
               t0: float | None = None) -> dict[str, dict]:
    """Run each stage whose folder does not hold a finished run with the same hash (the stage
    cache, module docstring); returns {stage name: its stage.json record + cached flag}."""
    t0 = time.time() if t0 is None else t0
    hashes: dict[str, str] = {}
    summary: dict[str, dict] = {}
    remaining = sum(s.estimate for s in stages)
    scale = 1.0  # actual / estimated, from the stages run so far
    for i, stage in enumerate(stages, 1):
        h = stage_hash(stage, hashes)
        hashes[stage.name] = h
        folder = out / stage.name
        done_file, started_file = folder / "stage.json", folder / ".stage-hash"
        done = json.loads(done_file.read_text()) if done_file.is_file() else None
        remaining -= stage.estimate
        if done and done.get("hash") == h:
            log(f"[{i}/{len(stages)}] {stage.name}: cached ({done['seconds']} s when it ran)")
            summary[stage.name] = {**done, "cached": True}
            continue
        if only_report:
            raise ConfigError(f"stage {stage.name} is not finished with this config; run without "
                              "--report-only")
        resume = started_file.is_file() and started_file.read_text().strip() == h and not done
        if folder.exists() and not resume:
            check_stage_folder(folder, out)
            shutil.rmtree(folder)  # stale: another config or inputs
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
        summary[stage.name] = {**record, "cached": False}
    return summary
