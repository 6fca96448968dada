"""`mogrpo run`: the whole job in one command, with cached, resumable stages.

    assets -> reward model (half a of the prompts) -> evaluator reward model (half b, other seed)
    -> evaluation of the base policy -> for each algorithm and each of `seeds`: train (each
    setting of `tune`, then keep one by the validation rule) -> evaluate -> report

With several `seeds`, each algorithm is trained and evaluated once per seed (its config's `seed`
set to that seed); the reward model, the evaluator reward model and the base policy's
evaluation are shared by every seed, and every evaluation uses the same `eval` settings (same
prompts, same evaluation seed). Stage folders: with one seed `grpo` and `eval/grpo`; with
several `grpo-s0`, `eval/grpo-s0`, `grpo-s1`, ... (`report.algo_stage`).

Tuning. `tune` gives each algorithm the same small budget, e.g. three learning rates each:
every setting trains in `grpo-s0-t0`, `grpo-s0-t1`, ...; the stage `grpo-s0` then keeps the
setting whose selected checkpoint is best on the validation split by the rule that selects
checkpoints (`selection.select_setting`; no test set is read), copies that run there and
writes `tuning.json` (every setting's validation record and the reason). The evaluation and
the report read `grpo-s0` as they would an untuned run.

Each stage's folder holds `stage.json` once it is finished: the hash of its config and of
the hashes of the stages it reads, plus its wall time. A rerun skips a stage whose hash
matches; a stage whose hash changed is wiped and run again (and so is everything after it
that reads it, because their hashes include its hash); a stage that was interrupted
(its `.stage-hash` matches but no `stage.json`) resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mogrpo.config import ConfigError, atomic_write_text, field, from_dict, save_config, to_dict
from mogrpo.report import algo_stage  # the stage names per seed, which the report reads too
from mogrpo.rl.registry import TRAINERS, trainer
from mogrpo.rl.selection import TUNING_CRITERION, select_setting

ALGORITHMS = tuple(TRAINERS)
DEFAULT_ALGORITHMS = ("grpo", "ppo", "dpo")  # the paper's comparison


class PipelineError(RuntimeError):
    """A stage's process failed; its own error message is above this one."""


@dataclass
class RunConfig:
    """Config of `mogrpo run` (YAML). Each section holds the keys of one stage's own config
    (see `mogrpo reward train --help`, `mogrpo train grpo --help`, `mogrpo eval --help`);
    `common` is merged into every algorithm section first. Reward-model paths are set by the
    pipeline, and each algorithm's `seed` by `seeds` (one training and evaluation per seed; the
    reward models and the base evaluation are shared by every seed)."""

    algorithms: list[str] = field(default_factory=lambda: list(DEFAULT_ALGORITHMS),
                                  help=f"which of {', '.join(ALGORITHMS)} to train")
    reward: dict[str, Any] = field(default_factory=lambda: {"partition": "a"},
                                   help="RewardTrainConfig keys of the training reward model")
    evaluator_reward: dict[str, Any] | None = field(default_factory=lambda: {"partition": "b", "seed": 1},
                                                    help="RewardTrainConfig keys of the evaluator RM "
                                                         "(disjoint prompts, other seed); null = none")
    common: dict[str, Any] = field(default_factory=dict, help="keys shared by every algorithm (policy, "
                                                              "weights, max_new_tokens, ...; the seed comes "
                                                              "from `seeds`)")
    grpo: dict[str, Any] = field(default_factory=dict, help="GRPOConfig keys")
    ppo: dict[str, Any] = field(default_factory=dict, help="PPOConfig keys")
    dpo: dict[str, Any] = field(default_factory=dict, help="DPOConfig keys")
    rloo: dict[str, Any] = field(default_factory=dict, help="RLOOConfig keys")
    eval: dict[str, Any] = field(default_factory=dict, help="EvalConfig keys (weights default to common's)")
    seeds: list[int] = field(default_factory=lambda: [0],
                             help="train and evaluate every algorithm once per seed (its `seed`); the reward "
                                  "models and the base evaluation are shared; e.g. seeds=[0,1,2]")
    tune: dict[str, dict[str, list]] = field(default_factory=dict,
                                             help="per algorithm, settings to try, e.g. {grpo: {lr: [2e-4, 4e-4, "
                                                  "8e-4]}, ppo: {lr: [...]}}; every listed algorithm gets the same "
                                                  "number, and the validation split picks one (module docstring)")
    cache_dir: str | None = field(None, help="asset cache")

    def __post_init__(self) -> None:
        bad = sorted(set(self.algorithms) - set(ALGORITHMS))
        if bad or not self.algorithms:
            raise ValueError(f"algorithms must be a non-empty subset of {list(ALGORITHMS)}, got {self.algorithms}")
        self.seeds = _check_seeds(self.seeds)
        self.tune = _check_tune(self.tune, self.algorithms)


def _check_tune(tune: Any, algorithms: list[str]) -> dict[str, dict[str, list]]:
    """`tune` as {algorithm: {key: [values]}} with lists of one length per algorithm and the
    same number of settings for every algorithm of the run (one budget for all)."""
    if not tune:
        return {}
    if not isinstance(tune, dict):
        raise ConfigError(f"tune must map algorithms to {{key: [values]}}, e.g. tune={{grpo: {{lr: [2e-4, 4e-4]}}}}; "
                          f"got {tune!r}")
    sizes = {}
    for algo, grid in tune.items():
        if algo not in algorithms:
            raise ConfigError(f"tune names {algo!r}, which is not among algorithms {algorithms}")
        if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError(f"tune.{algo} must map config keys to non-empty lists, e.g. {{lr: [2e-4, 4e-4]}}; "
                              f"got {grid!r}")
        lengths = {len(v) for v in grid.values()}
        if len(lengths) != 1:
            raise ConfigError(f"tune.{algo}: every list must have the same length (setting i takes the i-th value "
                              f"of each); got lengths {sorted(lengths)}")
        sizes[algo] = lengths.pop()
    if set(sizes) != set(algorithms) or len(set(sizes.values())) != 1:
        raise ConfigError(f"tune must give every algorithm of the run the same number of settings (the same "
                          f"budget): got {sizes} for algorithms {algorithms}")
    return tune


def tune_settings(tune: dict, algo: str) -> list[dict]:
    """The settings of `algo` in order: [{key: value_i, ...}] (one empty setting if untuned)."""
    grid = tune.get(algo)
    if not grid:
        return [{}]
    n = len(next(iter(grid.values())))
    return [{k: v[i] for k, v in grid.items()} for i in range(n)]


def _check_seeds(seeds: Any) -> list[int]:
    """`seeds` as a list of distinct ints (a single int, or int strings from `seeds=0,1,2`, are accepted)."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ConfigError(f"seeds must be a non-empty list of integers, e.g. seeds=[0,1,2]; got {seeds!r}")
    out = []
    for s in seeds:
        if isinstance(s, str) and s.strip().lstrip("-").isdigit():
            s = int(s)
        if not isinstance(s, int) or isinstance(s, bool):
            raise ConfigError(f"seeds must be a non-empty list of integers, e.g. seeds=[0,1,2]; {s!r} is not one")
        out.append(s)
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds must be distinct; {out} repeats "
                          f"{sorted({s for s in out if out.count(s) > 1})}")
    return out


def _seed_keys(cls, section: dict) -> list[str]:
    """The keys of `section` that set `seed` (the field, or one of the class's aliases of it)."""
    aliases = getattr(cls, "ALIASES", {})
    return [k for k in section if k == "seed" or
            "seed" in ((aliases[k],) if isinstance(aliases.get(k), str) else (aliases.get(k) or ()))]


@dataclass
class Stage:
    name: str  # folder under the run, e.g. "reward", "grpo", "eval/grpo" (several seeds: "grpo-s0", "eval/grpo-s0")
    config: Any  # the stage's dataclass config (hashed)
    inputs: list[str]  # names of the stages it reads
    run: Any  # callable(folder: Path, resume: bool) -> None
    estimate: float  # expected seconds on 2 CPU cores (for the time-left display)


def build_stages(cfg: RunConfig, out: Path) -> list[Stage]:
    """The stage list with fully resolved configs (pure: reads no model): the reward models and
    the base evaluation once, then per algorithm and seed its training (`seed` = that seed) and
    its evaluation, named by `algo_stage`. A `seed` under `common` or an algorithm section is a
    ConfigError unless `seeds` is exactly that one seed."""
    from mogrpo.eval.harness import EvalConfig
    from mogrpo.reward.train import RewardTrainConfig

    def make(cls, data: dict, what: str):
        try:
            return from_dict(cls, data)
        except (ConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"section '{what}': {exc}") from exc

    stages: list[Stage] = []
    rm_cfg = make(RewardTrainConfig, {"cache_dir": cfg.cache_dir, **cfg.reward}, "reward")
    stages.append(Stage("reward", rm_cfg, [], _reward_runner(rm_cfg), _estimate_reward(rm_cfg)))
    rm_path = str(out / "reward" / "model")
    ev_path = None
    if cfg.evaluator_reward is not None:
        ev_cfg = make(RewardTrainConfig, {"cache_dir": cfg.cache_dir, **cfg.evaluator_reward}, "evaluator_reward")
        if ev_cfg.partition == "all" or ev_cfg.partition == rm_cfg.partition:
            raise ConfigError("evaluator_reward must train on the other half: partition a for one, b for "
                              f"the other (got {rm_cfg.partition!r} and {ev_cfg.partition!r})")
        stages.append(Stage("evaluator_reward", ev_cfg, [], _reward_runner(ev_cfg), _estimate_reward(ev_cfg)))
        ev_path = str(out / "evaluator_reward" / "model")

    algo_cfgs = {}  # stage name -> (algorithm, its config)
    for algo in cfg.algorithms:
        cls = _config_class(algo)
        sections = {"common": cfg.common, algo: getattr(cfg, algo)}
        for where, section in sections.items():
            for key in _seed_keys(cls, section):
                if cfg.seeds != [section[key]]:
                    raise ConfigError(
                        f"section '{where}' sets {key}: {section[key]!r} but seeds is {cfg.seeds}: `mogrpo run` "
                        f"sets each algorithm's seed from `seeds`; remove {key} from '{where}' and list the "
                        f"seeds in `seeds` (e.g. seeds=[{section[key]}])")
        plain = {w: {k: v for k, v in sec.items() if k not in _seed_keys(cls, sec)} for w, sec in sections.items()}
        settings = tune_settings(cfg.tune, algo)
        if _seed_keys(cls, cfg.tune.get(algo, {})):
            raise ConfigError(f"tune.{algo} sets a seed: `mogrpo run` sets seeds from `seeds`; tune other keys")
        for seed in cfg.seeds:
            name = algo_stage(algo, seed, cfg.seeds)
            cfgs = [make(cls, {"cache_dir": cfg.cache_dir, "eval_prompts": "none", **plain["common"], **plain[algo],
                               **setting, "seed": seed, "reward_model": rm_path}, f"{algo} (tune: {setting})")
                    for setting in settings]
            if len(settings) > 1 and any(c.validation_prompts == "none" for c in cfgs):
                raise ConfigError(f"tune.{algo} needs validation (validation_prompts is 'none'): the validation "
                                  "split chooses the setting")
            algo_cfgs[name] = (algo, cfgs, settings)
    first = next(iter(algo_cfgs.values()))[1][0]
    ev_data = {"cache_dir": cfg.cache_dir, "weights": first.weights, "not_applicable": first.not_applicable,
               "max_new_tokens": first.max_new_tokens, **cfg.eval,
               "reward_model": rm_path, "evaluator_model": ev_path}
    eval_cfg = make(EvalConfig, ev_data, "eval")
    rm_inputs = ["reward"] + (["evaluator_reward"] if ev_path else [])
    stages.append(Stage("eval/base", {"model": first.policy, "eval": eval_cfg}, rm_inputs,
                        _eval_runner(first.policy, eval_cfg), _estimate_eval(eval_cfg)))
    for name, (algo, cfgs, settings) in algo_cfgs.items():
        if len(cfgs) == 1:
            stages.append(Stage(name, cfgs[0], ["reward"], _train_runner(algo, cfgs[0]), _estimate_train(algo, cfgs[0])))
        else:
            tries = [f"{name}-t{i}" for i in range(len(cfgs))]
            stages += [Stage(t, c, ["reward"], _train_runner(algo, c), _estimate_train(algo, c))
                       for t, c in zip(tries, cfgs)]
            stages.append(Stage(name, {"settings": settings, "rule": TUNING_CRITERION}, tries,
                                _select_runner(out, tries, settings), 1.0))
        stages.append(Stage(f"eval/{name}", {"model": name, "eval": eval_cfg}, rm_inputs + [name],
                            _eval_runner(str(out / name), eval_cfg), _estimate_eval(eval_cfg)))
    return stages


def _config_class(algo: str):
    return trainer(algo)[0]


# Each stage runs as its own `mogrpo` process: its peak memory (cost.json) is its own, not the
# pipeline's high-water mark, and all its memory is returned before the next stage starts.
def _subprocess_stage(args: list[str], cfg, folder: Path, resume: bool) -> None:
    import subprocess

    stage_cfg = folder / "stage_config.yaml"
    save_config(cfg, stage_cfg)
    cmd = [sys.executable, "-m", "mogrpo.cli", *args, "--config", str(stage_cfg), "--output", str(folder)]
    if resume and args[0] != "eval":
        cmd.append("--resume")
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise PipelineError(f"failed (exit {done.returncode}): {' '.join(cmd)}; fix the cause "
                           "and run the same `mogrpo run` again: finished stages are reused, this one resumes")


def _reward_runner(rm_cfg):
    return lambda folder, resume: _subprocess_stage(["reward", "train"], rm_cfg, folder, resume)


def _train_runner(algo: str, acfg):
    return lambda folder, resume: _subprocess_stage(["train", algo], acfg, folder, resume)


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
                    ignore=shutil.ignore_patterns("checkpoints", "stage.json", ".stage-hash", ".mogrpo.lock",
                                                  "stage_config.yaml"))
    record = {"rule": TUNING_CRITERION, "chosen": index, "setting": settings[index], "from": tries[index],
              "reason": reason, "base": base,
              "settings": [{"setting": st, "run": t, "selected_step": c["selection"]["step"],
                            **{k: c["selection"][k] for k in ("compliance", "over_refusal", "degenerate")}}
                           for st, t, c in zip(settings, tries, costs)]}
    atomic_write_text(folder / "tuning.json", json.dumps(record, indent=2))
    return record


def _eval_runner(model: str, eval_cfg):
    return lambda folder, resume: _subprocess_stage(["eval", "--model", model], eval_cfg, folder, resume)


# Rough seconds on 2 CPU cores (measured on the default configs), only for the display.
def _estimate_reward(c) -> float:
    # seconds per epoch on every prompt, 2 cores: 112 on the packaged data, 2.4x with on-policy rows
    per_epoch = 112.0 * (2.4 if "onpolicy" in c.data else 1.0)
    return per_epoch * c.epochs * (0.5 if c.partition != "all" else 1.0)


def _estimate_train(algo: str, c) -> float:
    scale = c.max_new_tokens / 48
    if algo == "grpo":
        return 15.0 * c.steps * c.batch_size / 16 * scale
    if algo == "ppo":
        return 31.0 * c.steps * c.batch_size / 16 * scale
    if algo == "rloo":
        return 17.0 * c.steps * c.batch_size / 16 * scale
    return 3.5 * c.pair_prompts * c.group_size / 4 * scale


def _estimate_eval(c) -> float:
    n = c.max_prompts or 379
    return 0.35 * n * c.n * c.max_new_tokens / 48 + 1.2 * c.kl_prompts + 15


def stage_hash(stage: Stage, upstream: dict[str, str]) -> str:
    from mogrpo._version import __version__

    cfg = stage.config
    cfg_dict = ({k: (to_dict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in cfg.items()}
                if isinstance(cfg, dict) else to_dict(cfg))
    payload = {"stage": stage.name, "config": cfg_dict, "inputs": {n: upstream[n] for n in stage.inputs},
               "mogrpo": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def check_stage_folder(folder: Path, out: Path) -> None:
    """A stage folder that exists must be one `mogrpo run` made (.stage-hash): a stale one is
    replaced, and mogrpo never deletes a folder it did not make."""
    if folder.exists() and not (folder / ".stage-hash").is_file():
        raise ConfigError(f"{folder} exists but is not a stage folder of `mogrpo run` (no .stage-hash): mogrpo "
                          f"only replaces folders it made. Move it out of {out}, or choose another --output")


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
            raise ConfigError(f"stage {stage.name} is not finished with this config; run without --report-only")
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


def run_pipeline(cfg: RunConfig, output: str | os.PathLike, *, log=print, only_report: bool = False) -> dict:
    """Run every stage not already finished with the same hash, then write the report."""
    from mogrpo.runfolder import claim_output

    t0 = time.time()
    out = Path(output)
    stages = build_stages(cfg, out)  # every section validated before anything is written
    lock = claim_output(out, "run")
    try:
        return _run(cfg, out, stages, t0, log=log, only_report=only_report)
    finally:
        lock.release()


def _run(cfg: RunConfig, out: Path, stages: list[Stage], t0: float, *, log, only_report: bool) -> dict:
    from mogrpo.assets import fetch_all
    from mogrpo.report import write_report

    for stage in stages:  # before any work
        check_stage_folder(out / stage.name, out)
    save_config(cfg, out / "run_config.yaml")
    if not only_report:
        log(f"[0/{len(stages)}] assets")
        fetch_all(cfg.cache_dir, log=log)
    summary = run_stages(stages, out, log=log, only_report=only_report, t0=t0)
    wall = round(time.time() - t0, 1)
    report = write_report(out, cfg.algorithms, seeds=cfg.seeds, stages=summary, pipeline_seconds=wall)
    log(f"done in {_fmt(wall)}: {out / 'report.md'}")
    return report


def main_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
