"""The algorithms by name, below the CLI and the pipeline: each entry carries its facts.

Adding an algorithm: write mogrpo/rl/<name>.py with a config dataclass (subclass of
rl/config.py's PolicyRunConfig or OnlineConfig) and `train_<name>(cfg, output, *, resume,
show_progress)` built on engine.Run, then add its `Algorithm` to ALGORITHMS below (with its
time estimate). Nothing else changes: the CLI (`mogrpo train <name>`), `mogrpo run`
(`algorithms: [..., <name>]` and a `<name>:` section of its config keys), the report and the
Python API (`mogrpo.train`) read it from here.

Entries name their module, config class and train function as strings, so listing the
algorithms (`mogrpo --help`) imports none of them (nor torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# What a finished policy run folder holds (engine.Run writes them); an algorithm may add its own.
POLICY_RUN_OUTPUTS = ("metrics.jsonl", "final/", "config.yaml", "cost.json", "eval_before.json",
                      "eval_after.json")


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's facts."""

    name: str  # `mogrpo train <name>`, and its section of `mogrpo run`'s config
    module: str  # where its config class and train function live, e.g. "mogrpo.rl.grpo"
    config: str  # its config dataclass in `module`, e.g. "GRPOConfig"
    train: str  # its train function in `module`: train(cfg, output, *, resume, show_progress)
    description: str  # one line, for --help
    estimate: Callable[[Any], float]  # expected seconds on 2 CPU cores from its config
    outputs: tuple[str, ...] = POLICY_RUN_OUTPUTS  # what a finished run folder holds

    @property
    def section(self) -> str:
        """The key of its section in `mogrpo run`'s config (its name)."""
        return self.name

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def train_function(self) -> Callable[..., dict]:
        return getattr(importlib.import_module(self.module), self.train)


# Rough seconds on 2 CPU cores, measured on the default configs; only for the time-left display.
def seconds_per_step(per_16_sequences: float) -> Callable[[Any], float]:
    """The estimate of an online algorithm that takes `per_16_sequences` seconds for a step of
    16 sequences of 48 tokens."""
    return lambda c: per_16_sequences * c.steps * c.batch_size / 16 * (c.max_new_tokens / 48)


def dpo_seconds(c) -> float:
    """DPO's estimate: sampling and scoring its pairs dominates (3.5 s per prompt of 4 samples
    of 48 tokens)."""
    return 3.5 * c.pair_prompts * c.group_size / 4 * (c.max_new_tokens / 48)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("grpo", "mogrpo.rl.grpo", "GRPOConfig", "train_grpo",
              "multi-objective GRPO (no critic)", seconds_per_step(15.0)),
    Algorithm("ppo", "mogrpo.rl.ppo", "PPOConfig", "train_ppo",
              "PPO-RLHF baseline (actor + critic)", seconds_per_step(31.0)),
    Algorithm("dpo", "mogrpo.rl.dpo", "DPOConfig", "train_dpo",
              "DPO baseline on reward-model pairs", dpo_seconds,
              outputs=POLICY_RUN_OUTPUTS + ("pairs.jsonl",)),
    Algorithm("rloo", "mogrpo.rl.rloo", "RLOOConfig", "train_rloo",
              "RLOO: REINFORCE, leave-one-out baseline (no critic)", seconds_per_step(17.0)),
)}
TRAINERS = ALGORITHMS  # its former name (the same dict)


def algorithm(name: str) -> Algorithm:
    """The entry of algorithm `name` (a ValueError naming the known ones if there is none)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def trainer(name: str):
    """(config class, train function) of an algorithm."""
    a = algorithm(name)
    return a.config_class(), a.train_function()


def algorithm_of(cfg) -> str:
    """The algorithm whose config `cfg` is (for `mogrpo.train(cfg, ...)`)."""
    for a in ALGORITHMS.values():
        if type(cfg).__name__ == a.config and type(cfg).__module__ == a.module:
            return a.name
    raise TypeError(f"{type(cfg).__name__} is not the config of a known algorithm "
                    f"({', '.join(ALGORITHMS)})")


# Keys a resumed run takes from the new command: how long, how often to save/log/evaluate,
# threads. Any other changed key keeps the run's own value (config.reconcile_resume).
RESUME_MAY_CHANGE = {"steps", "save_every", "keep_checkpoints", "report_to", "sample_every",
                     "log_entropy", "num_threads", "cache_dir", "eval_prompts", "eval_max_prompts",
                     "eval_max_new_tokens"}


def check_schedule_horizon(cfg, saved) -> None:
    """A resumed run may change `steps` only under a constant schedule: a linear or cosine
    decay is laid out over the run's steps, so a new horizon would make the learning rate
    jump at the resume."""
    import yaml

    before = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("steps")
    now = getattr(cfg, "steps", None)
    if before is not None and now is not None and before != now and \
            getattr(cfg, "lr_schedule", "") in ("linear", "cosine"):
        raise ValueError(f"steps changed since the run started ({before} -> {now}) under "
                         f"lr_schedule={cfg.lr_schedule}: the learning rate would jump at the "
                         f"resume; resume with steps={before}, or start again (--overwrite)")


def train(cfg, output=None, *, resume: bool = False, show_progress: bool = True,
          overwrite: bool = False) -> dict:
    """Train the algorithm `cfg` configures (a GRPOConfig, PPOConfig, DPOConfig, RLOOConfig or
    any registered algorithm's config) into the run folder `output`; returns {eval_before,
    eval_after, cost}. The CLI's `mogrpo train <algo>` calls this. With `resume`, keys changed
    since the run started are reported, and only those in RESUME_MAY_CHANGE take the new
    value. `overwrite` (without `resume`): an earlier run in `output` is moved aside first
    (checkpointing.move_run_aside); else a folder holding one is refused. `output` defaults
    to the config's `output_dir` (TRL's name)."""
    import os
    import sys
    from pathlib import Path

    from mogrpo.config import reconcile_resume
    from mogrpo.runfolder import release_all

    output = output if output is not None else getattr(cfg, "output_dir", None)
    if output is None:
        raise ValueError("give the run folder: --output DIR / train(cfg, DIR), or output_dir")

    main = os.environ.get("RANK", "0") == "0"
    if overwrite and not resume and main:  # the earlier run is renamed, never deleted
        from mogrpo.checkpointing import move_run_aside

        aside = move_run_aside(Path(output), f"train {algorithm_of(cfg)}")
        if aside is not None:
            print(f"moved the earlier run in {output} to {aside}", file=sys.stderr)
    saved = Path(output) / "config.yaml"
    if resume and saved.is_file() and (Path(output) / "checkpoints" / "latest").is_file():
        cfg, notes = reconcile_resume(cfg, saved, RESUME_MAY_CHANGE)
        check_schedule_horizon(cfg, saved)
        if notes and main:
            print("resume: the config differs from the run's config.yaml:\n  " + "\n  ".join(notes),
                  file=sys.stderr)
    try:
        return trainer(algorithm_of(cfg))[1](cfg, output, resume=resume,
                                             show_progress=show_progress)
    finally:
        release_all()
