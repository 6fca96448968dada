"""`mogrpo eval --model RUN` evaluates as the run's own trainer did: every setting the user
leaves out (reward model or reward sources, weights, masks, completion length, prompts,
their count and seed) is read from the run's config.yaml, so the figures reproduce the
trainer's after-evaluation (eval_after.json) on the same prompts. A model that is not a run
folder gets the training defaults."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mogrpo.reward.sources import DEFAULT_REWARD_MODEL, config_specs


def read_run_config(model_ref: str) -> dict:
    """The run's config.yaml as a dict ({} when `model_ref` is not a run folder)."""
    import yaml

    path = Path(model_ref) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: the run's config does not read ({exc}); give the evaluation "
                         f"settings explicitly (prompts=, max_new_tokens=, reward_model=, "
                         f"weights=)") from None


def with_run_settings(cfg, run_cfg: dict):
    """A copy of EvalConfig `cfg` with every setting left unset (None) taken from the run's
    config (`run_cfg`), else the defaults (max_prompt_length: no limit)."""
    prompts = run_cfg.get("eval_prompts")
    filled = {
        "prompts": prompts if prompts not in (None, "none") else "default",
        "max_prompts": run_cfg.get("eval_max_prompts", 0),
        "max_new_tokens": run_cfg.get("eval_max_new_tokens", 48),
        "seed": run_cfg.get("seed", 0),
        "precision": run_cfg.get("precision", "auto"),
        "max_prompt_length": run_cfg.get("max_prompt_length"),
    }
    return dataclasses.replace(cfg, **{k: v for k, v in filled.items()
                                       if getattr(cfg, k) is None})


def reward_specs(cfg, run_cfg: dict) -> list[dict] | None:
    """The reward sources that score the evaluation ('training_rm'): reward_model= when
    given ('none' = none), else the run's (its `rewards`, or its reward model, plus its extra
    reward columns), else the default reward model. A reward the run was given as a Python
    object with no importable name cannot be rebuilt: it is left out, with a warning."""
    if cfg.reward_model is not None:
        return None if cfg.reward_model == "none" else [
            {"type": "multi_aspect", "path": cfg.reward_model}]
    if not run_cfg:
        return [{"type": "multi_aspect", "path": DEFAULT_REWARD_MODEL}]
    specs = config_specs(run_cfg.get("rewards"),
                         run_cfg.get("reward_model", DEFAULT_REWARD_MODEL),
                         run_cfg.get("extra_rewards") or ())
    kept = [s for s in specs if not (s.get("type") == "python" and not s.get("ref"))]
    for s in specs:
        if s not in kept:
            print(f"warning: the run's reward {s.get('name')!r} was a Python object without an "
                  f"importable name; the evaluation leaves it out (give the run a reward "
                  f"function defined in a module to score it here)", file=sys.stderr)
    return kept or None


def training_scorer(cfg, run_cfg: dict, device, amp):
    """The scorer of the evaluation's reward columns (reward/scoring.Scorer over the sources
    of `reward_specs`), or None."""
    specs = reward_specs(cfg, run_cfg)
    return scorer_of(specs, device, amp, cfg.cache_dir) if specs else None


def scorer_of(specs: list[dict], device, amp, cache_dir=None):
    """The reward sources `specs` name (reward/sources.py) as one Scorer on `device`, as the
    evaluation's judges read them (the training reward and the evaluator reward model)."""
    from mogrpo.reward.scoring import Scorer
    from mogrpo.reward.sources import build_sources, place_sources

    return Scorer(place_sources(build_sources(specs, cache_dir=cache_dir, device=device),
                                device, amp))
