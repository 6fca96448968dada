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

Each stage's folder holds `stage.json` once it is finished: the hash of its config (with the
content digest of every local file or folder the config names outside the run folder: an
edited data file or a retrained external reward model changes it) and of the hashes of the
stages it reads, plus its wall time. A rerun skips a stage whose hash matches; a stage whose
hash changed is run again (and so is everything after it that reads it, because their hashes
include its hash): its old folder waits beside it as `.NAME.previous-<hash8>` until the new
run is finished, and is restored, not rerun, by a later run with its hash. A stage that was
interrupted (its `.stage-hash` matches but no `stage.json`) resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mogrpo.config import (
    ConfigError,
    field,
    from_dict,
    save_config,
)
from mogrpo.report import (
    algo_stage,  # the stage names per seed, which the report reads too
)
from mogrpo.rl.registry import ALGORITHMS, Algorithm, algorithm
from mogrpo.rl.selection import TUNING_CRITERION
from mogrpo.stages import (
    PipelineError,
    Stage,
    _fmt,
    _select_runner,
    check_stage_folder,
    estimate_eval,
    estimate_train,
    eval_stage,
    keep_best_setting,
    reward_stage,
    run_stages,
    train_stage,
)

DEFAULT_ALGORITHMS = ("grpo", "ppo", "dpo")  # the paper's comparison
# the public names of the pipeline, the stage layer's included (mogrpo/stages.py)
__all__ = ["DEFAULT_ALGORITHMS", "PipelineError", "RunConfig", "RunConfigBase", "Stage",
           "algo_stage",
           "build_stages", "check_stage_folder", "estimate_eval", "estimate_train", "eval_stage",
           "keep_best_setting", "main_log", "reward_stage", "run_config_class", "run_pipeline",
           "run_stages",
           "train_stage", "tune_settings"]


@dataclass
class RunConfigBase:
    """Config of `mogrpo run` (YAML). Each section holds the keys of one stage's own config
    (see `mogrpo reward train --help`, `mogrpo train grpo --help`, `mogrpo eval --help`);
    every registered algorithm has a section named after it (its config's keys), and `common`
    is merged into every algorithm section first. Reward-model paths are set by the pipeline,
    and each algorithm's `seed` by `seeds` (one training and evaluation per seed; the reward
    models and the base evaluation are shared by every seed)."""

    # The keys every run has; run_config_class adds one section per registered algorithm (and
    # restates `algorithms` with their names in its help). Use RunConfig or run_config_class().
    SECTIONS: ClassVar[tuple[str, ...]] = ()  # the algorithm sections

    algorithms: list[str] = field(default_factory=lambda: list(DEFAULT_ALGORITHMS),
                                  help="which of the registered algorithms to train")
    reward: dict[str, Any] = field(default_factory=lambda: {"partition": "a"},
                                   help="RewardTrainConfig keys of the training reward model")
    evaluator_reward: dict[str, Any] | None = field(
        default_factory=lambda: {"partition": "b", "seed": 1},
        help="RewardTrainConfig keys of the evaluator RM (disjoint prompts, other seed); "
             "null = none")
    common: dict[str, Any] = field(default_factory=dict,
                                   help="keys shared by every algorithm (policy, weights, "
                                        "max_new_tokens, ...; the seed comes from `seeds`)")
    eval: dict[str, Any] = field(default_factory=dict,
                                 help="EvalConfig keys (weights default to common's)")
    seeds: list[int] = field(default_factory=lambda: [0],
                             help="train and evaluate every algorithm once per seed (its `seed`); "
                                  "the reward models and the base evaluation are shared; e.g. "
                                  "seeds=[0,1,2]")
    tune: dict[str, dict[str, list]] = field(
        default_factory=dict,
        help="per algorithm, settings to try, e.g. {grpo: {lr: [2e-4, 4e-4, 8e-4]}, ppo: {lr: "
             "[...]}}; every listed algorithm gets the same number, and the validation split "
             "picks one (module docstring)")
    cache_dir: str | None = field(None, help="asset cache")

    def __post_init__(self) -> None:
        bad = sorted(set(self.algorithms) - set(self.SECTIONS))
        if bad or not self.algorithms:
            raise ValueError(f"algorithms must be a non-empty subset of {list(self.SECTIONS)}, "
                             f"got {self.algorithms}")
        self.seeds = _check_seeds(self.seeds)
        self.tune = _check_tune(self.tune, self.algorithms)

    def section(self, algo: str) -> dict[str, Any]:
        """The keys of algorithm `algo`'s section."""
        return getattr(self, algo)


def run_config_class() -> type[RunConfigBase]:
    """The config class of `mogrpo run` for the algorithms registered now: RunConfigBase's keys
    plus one section (a dict of its config's keys, default {}) per algorithm of
    mogrpo.rl.registry.ALGORITHMS, named after it. Built once per set of algorithms;
    `RunConfig` is the one for the algorithms registered when this module was imported."""
    return _run_config_class(tuple(ALGORITHMS.values()))


@functools.lru_cache(maxsize=None)
def _run_config_class(algos: tuple[Algorithm, ...]) -> type[RunConfigBase]:
    taken = {a.section for a in algos} & {f.name for f in dataclasses.fields(RunConfigBase)}
    if taken:
        raise ValueError(f"algorithm(s) {sorted(taken)} take the name of a `mogrpo run` key; "
                         "rename them in the registry")
    names = [a.section for a in algos]
    which = ("algorithms", list[str], field(default_factory=lambda: list(DEFAULT_ALGORITHMS),
                                            help=f"which of {', '.join(names)} to train"))
    sections = [(a.section, dict[str, Any], field(default_factory=dict, help=f"{a.config} keys"))
                for a in algos]
    return dataclasses.make_dataclass(
        "RunConfig", [which, *sections], bases=(RunConfigBase,),
        namespace={"__module__": __name__, "__doc__": RunConfigBase.__doc__,
                   "SECTIONS": tuple(names)})


RunConfig = run_config_class()


def _check_tune(tune: Any, algorithms: list[str]) -> dict[str, dict[str, list]]:
    """`tune` as {algorithm: {key: [values]}} with lists of one length per algorithm and the
    same number of settings for every algorithm of the run (one budget for all)."""
    if not tune:
        return {}
    if not isinstance(tune, dict):
        raise ConfigError("tune must map algorithms to {key: [values]}, e.g. "
                          f"tune={{grpo: {{lr: [2e-4, 4e-4]}}}}; got {tune!r}")
    sizes = {}
    for algo, grid in tune.items():
        if algo not in algorithms:
            raise ConfigError(f"tune names {algo!r}, which is not among algorithms {algorithms}")
        if not isinstance(grid, dict) or not grid or \
                not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError(f"tune.{algo} must map config keys to non-empty lists, e.g. "
                              f"{{lr: [2e-4, 4e-4]}}; got {grid!r}")
        lengths = {len(v) for v in grid.values()}
        if len(lengths) != 1:
            raise ConfigError(f"tune.{algo}: every list must have the same length (setting i "
                              f"takes the i-th value of each); got lengths {sorted(lengths)}")
        sizes[algo] = lengths.pop()
    if set(sizes) != set(algorithms) or len(set(sizes.values())) != 1:
        raise ConfigError("tune must give every algorithm of the run the same number of settings "
                          f"(the same budget): got {sizes} for algorithms {algorithms}")
    return tune


def tune_settings(tune: dict, algo: str) -> list[dict]:
    """The settings of `algo` in order: [{key: value_i, ...}] (one empty setting if untuned)."""
    grid = tune.get(algo)
    if not grid:
        return [{}]
    n = len(next(iter(grid.values())))
    return [{k: v[i] for k, v in grid.items()} for i in range(n)]


def _check_seeds(seeds: Any) -> list[int]:
    """`seeds` as a list of distinct ints (a single int, or int strings from `seeds=0,1,2`, are
    accepted)."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ConfigError("seeds must be a non-empty list of integers, e.g. seeds=[0,1,2]; "
                          f"got {seeds!r}")
    out = []
    for s in seeds:
        if isinstance(s, str) and s.strip().lstrip("-").isdigit():
            s = int(s)
        if not isinstance(s, int) or isinstance(s, bool):
            raise ConfigError("seeds must be a non-empty list of integers, e.g. seeds=[0,1,2]; "
                              f"{s!r} is not one")
        out.append(s)
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds must be distinct; {out} repeats "
                          f"{sorted({s for s in out if out.count(s) > 1})}")
    return out


def _seed_keys(cls, section: dict) -> list[str]:
    """The keys of `section` that set `seed` (the field, or one of the class's aliases of it)."""
    aliases = getattr(cls, "ALIASES", {})
    targets = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in aliases.items()}
    return [k for k in section if k == "seed" or "seed" in targets.get(k, ())]


def build_stages(cfg: RunConfigBase, out: Path) -> list[Stage]:
    """The stage list with fully resolved configs (pure: reads no model): the reward models and
    the base evaluation once, then per algorithm and seed its training (`seed` = that seed) and
    its evaluation, named by `algo_stage`. A `seed` under `common` or an algorithm section is a
    ConfigError unless `seeds` is exactly that one seed."""
    from mogrpo.eval.harness import EvalConfig
    from mogrpo.reward.train import RewardTrainConfig

    stages: list[Stage] = []
    rm_cfg = _section(RewardTrainConfig, {"cache_dir": cfg.cache_dir, **cfg.reward}, "reward")
    stages.append(reward_stage("reward", rm_cfg))
    rm_path = str(out / "reward" / "model")
    ev_path = None
    if cfg.evaluator_reward is not None:
        ev_cfg = _section(RewardTrainConfig, {"cache_dir": cfg.cache_dir, **cfg.evaluator_reward},
                          "evaluator_reward")
        if ev_cfg.partition == "all" or ev_cfg.partition == rm_cfg.partition:
            raise ConfigError("evaluator_reward must train on the other half: partition a for "
                              f"one, b for the other (got {rm_cfg.partition!r} and "
                              f"{ev_cfg.partition!r})")
        stages.append(reward_stage("evaluator_reward", ev_cfg))
        ev_path = str(out / "evaluator_reward" / "model")

    algo_cfgs = {}  # stage name -> (algorithm, its configs (one per setting), the settings)
    for algo in cfg.algorithms:
        cls = algorithm(algo).config_class()
        plain = _without_seeds(cls, cfg, {"common": cfg.common, algo: cfg.section(algo)})
        settings = tune_settings(cfg.tune, algo)
        if _seed_keys(cls, cfg.tune.get(algo, {})):
            raise ConfigError(f"tune.{algo} sets a seed: `mogrpo run` sets seeds from `seeds`; "
                              "tune other keys")
        for seed in cfg.seeds:
            name = algo_stage(algo, seed, cfg.seeds)
            cfgs = [_section(cls, {"cache_dir": cfg.cache_dir, "eval_prompts": "none",
                                   **plain["common"], **plain[algo], **setting, "seed": seed,
                                   "reward_model": rm_path}, f"{algo} (tune: {setting})")
                    for setting in settings]
            if len(settings) > 1 and any(c.validation_prompts == "none" for c in cfgs):
                raise ConfigError(f"tune.{algo} needs validation (validation_prompts is 'none'): "
                                  "the validation split chooses the setting")
            algo_cfgs[name] = (algo, cfgs, settings)
    first = next(iter(algo_cfgs.values()))[1][0]
    ev_data = {"cache_dir": cfg.cache_dir, "weights": first.weights,
               "not_applicable": first.not_applicable, "max_new_tokens": first.max_new_tokens,
               **cfg.eval, "reward_model": rm_path, "evaluator_model": ev_path}
    eval_cfg = _section(EvalConfig, ev_data, "eval")
    rm_inputs = ["reward"] + (["evaluator_reward"] if ev_path else [])
    stages.append(eval_stage("eval/base", first.policy, eval_cfg, rm_inputs))
    for name, (algo, cfgs, settings) in algo_cfgs.items():
        if len(cfgs) == 1:
            stages.append(train_stage(name, algo, cfgs[0], ["reward"]))
        else:
            tries = [f"{name}-t{i}" for i in range(len(cfgs))]
            stages += [train_stage(t, algo, c, ["reward"])
                       for t, c in zip(tries, cfgs, strict=True)]
            stages.append(Stage(name, {"settings": settings, "rule": TUNING_CRITERION}, tries,
                                _select_runner(out, tries, settings), 1.0))
        stages.append(eval_stage(f"eval/{name}", name, eval_cfg, rm_inputs + [name],
                                 path=str(out / name)))
    return stages


def _section(cls, data: dict, what: str):
    """Config `cls` from one section of the run's config; its errors name the section."""
    try:
        return from_dict(cls, data)
    except (ConfigError, ValueError, TypeError) as exc:
        raise ConfigError(f"section '{what}': {exc}") from exc


def _without_seeds(cls, cfg: RunConfigBase, sections: dict[str, dict]) -> dict[str, dict]:
    """`sections` without their seed keys, which must agree with `seeds` (a ConfigError)."""
    for where, section in sections.items():
        for key in _seed_keys(cls, section):
            if cfg.seeds != [section[key]]:
                raise ConfigError(
                    f"section '{where}' sets {key}: {section[key]!r} but seeds is {cfg.seeds}: "
                    f"`mogrpo run` sets each algorithm's seed from `seeds`; remove {key} from "
                    f"'{where}' and list the seeds in `seeds` (e.g. seeds=[{section[key]}])")
    return {w: {k: v for k, v in sec.items() if k not in _seed_keys(cls, sec)}
            for w, sec in sections.items()}


def _config_class(algo: str):
    return algorithm(algo).config_class()


def run_pipeline(cfg: RunConfigBase, output: str | os.PathLike, *, log=print,
                 only_report: bool = False) -> dict:
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


def _run(cfg: RunConfigBase, out: Path, stages: list[Stage], t0: float, *, log,
         only_report: bool) -> dict:
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
    report = write_report(out, cfg.algorithms, seeds=cfg.seeds, stages=summary,
                          pipeline_seconds=wall)
    log(f"done in {_fmt(wall)}: {out / 'report.md'}")
    return report


def main_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
