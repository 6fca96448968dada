"""The trainers by name, below the CLI and the pipeline (both look algorithms up here).

Adding an algorithm: write mogrpo/rl/<name>.py with a config dataclass (subclass of
engine.PolicyRunConfig or OnlineConfig) and `train_<name>(cfg, output, *, resume,
show_progress)` built on engine.Run, then add one line below. The CLI (`mogrpo train
<name>`), `mogrpo run` (`algorithms: [..., <name>]`), the report and the Python API
(`mogrpo.train`) pick it up from here.
"""

from __future__ import annotations

import importlib

TRAINERS = {  # name -> (module, config class, train function, one-line description)
    "grpo": ("mogrpo.rl.grpo", "GRPOConfig", "train_grpo", "multi-objective GRPO (no critic)"),
    "ppo": ("mogrpo.rl.ppo", "PPOConfig", "train_ppo", "PPO-RLHF baseline (actor + critic)"),
    "dpo": ("mogrpo.rl.dpo", "DPOConfig", "train_dpo", "DPO baseline on reward-model pairs"),
    "rloo": ("mogrpo.rl.rloo", "RLOOConfig", "train_rloo", "RLOO: REINFORCE, leave-one-out baseline (no critic)"),
}


def trainer(name: str):
    """(config class, train function) of an algorithm."""
    if name not in TRAINERS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(TRAINERS)}")
    module, cfg_name, fn_name, _ = TRAINERS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, fn_name)


def algorithm_of(cfg) -> str:
    """The algorithm whose config `cfg` is (for `mogrpo.train(cfg, ...)`)."""
    for name, (module, cfg_name, _, _) in TRAINERS.items():
        if type(cfg).__name__ == cfg_name and type(cfg).__module__ == module:
            return name
    raise TypeError(f"{type(cfg).__name__} is not the config of a known algorithm ({', '.join(TRAINERS)})")


# Keys a resumed run takes from the new command: how long, how often to save/log/evaluate,
# threads. Any other changed key keeps the run's own value (config.reconcile_resume).
RESUME_MAY_CHANGE = {"steps", "save_every", "keep_checkpoints", "report_to", "sample_every", "log_entropy",
                     "num_threads", "cache_dir", "eval_prompts", "eval_max_prompts", "eval_max_new_tokens"}


def train(cfg, output, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Train the algorithm `cfg` configures (a GRPOConfig, PPOConfig, DPOConfig or RLOOConfig)
    into the run folder `output`; returns {eval_before, eval_after, cost}. The CLI's
    `mogrpo train <algo>` calls this. With `resume`, keys changed since the run started are
    reported, and only those in RESUME_MAY_CHANGE take the new value."""
    import os
    import sys
    from pathlib import Path

    from mogrpo.config import reconcile_resume
    from mogrpo.runfolder import release_all

    saved = Path(output) / "config.yaml"
    if resume and saved.is_file() and (Path(output) / "checkpoints" / "latest").is_file():
        cfg, notes = reconcile_resume(cfg, saved, RESUME_MAY_CHANGE)
        if notes and os.environ.get("RANK", "0") == "0":
            print("resume: the config differs from the run's config.yaml:\n  " + "\n  ".join(notes), file=sys.stderr)
    try:
        return trainer(algorithm_of(cfg))[1](cfg, output, resume=resume, show_progress=show_progress)
    finally:
        release_all()
