"""A policy run's files: its checkpoints (checkpointing.py's format, with the policy saved in
its own format beside the state), resuming from the newest one, and what a finished run
leaves (final/, eval_before.json, eval_after.json, cost.json). Functions of an engine.Run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mogrpo import packing
from mogrpo.checkpointing import (
    checkpoint_root,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
    writing,
)
from mogrpo.config import atomic_folder, atomic_write_text
from mogrpo.runfolder import CheckpointError, restore_rng, rng_state
from mogrpo.tracking import FINITE_KEYS, DivergedError, check_finite, peak_memory_mb


def checked_step(run, step_fn: Callable[[int], dict], step: int) -> dict:
    """step_fn(step)'s record, refused (DivergedError naming step + 1, before anything of the
    step is logged or saved) when a loss, gradient norm, KL or reward is not finite. Under
    DeepSpeed the gradient norm is NaN by design (it clips inside its step): not checked."""
    from mogrpo.checkpointing import latest_checkpoint

    deepspeed = run.runtime.sharding == "deepspeed"
    keys = [k for k in FINITE_KEYS if not (k == "grad_norm" and deepspeed)]
    try:
        rec = step_fn(step)
        check_finite(rec, step + 1, keys)
    except DivergedError as exc:  # only now: no file is read on the steps that go well
        latest = latest_checkpoint(run.out)
        keep = (f"the last checkpoint, {latest}, is intact" if latest
                else "no checkpoint was written")
        advice = f"; {keep}: lower lr (or check the rewards), then --resume"
        where = "" if str(exc).startswith("step ") else f"step {step + 1}: "
        raise DivergedError(f"{where}{exc}{advice}") from None
    return rec


def state_root(run) -> torch.nn.Module:
    return torch.nn.ModuleList([run.model, *run.modules]) if run.modules else run.model

def save_run_checkpoint(run, step: int, eval_before: dict, algorithm: dict,
                        selecting: bool) -> None:
    """checkpointing.save_checkpoint of everything a resume needs (collectives when sharded)."""
    rt = run.runtime
    rt.wait()
    full, optim = rt.gathered_state(run.model), rt.optimizer_state(run.opt, state_root(run))
    if run.main:
        def write_model(tmp: Path) -> None:
            run.policy.save_pretrained(tmp, state_dict=full)
            run.tok.save_pretrained(tmp)

        save_checkpoint(checkpoint_root(run.out), {
            "step": step, "trainable": trainable_state(run.policy, full), "optimizer": optim,
            "scheduler": run.sched.state_dict(), "rng": rng_state(),
            "cost_seconds": dict(run.timer.seconds),
            "tokens_generated": run.tokens_generated, "eval_before": eval_before,
            "algorithm": algorithm,
            **({"selection": run.selection.state} if selecting else {})},
            keep=run.cfg.keep_checkpoints,
            write_model=write_model, best=run.out / "best" if selecting else None)
    rt.wait()

def resume_run(run, load_state: Callable[[dict], None]) -> dict | None:
    """The newest checkpoint that loads, with weights, optimiser, schedule, RNG, cost and
    the algorithm's state restored; None (and a note) when there is none."""
    rt, root = run.runtime, checkpoint_root(run.out)

    def restore(state: dict) -> None:
        unexpected = sorted(set(state["trainable"]) - {n for n, _ in run.policy.named_parameters()})
        if unexpected:
            raise CheckpointError(f"checkpoint does not fit this model ({unexpected[:3]} ...)")
        rt.load_module_state(run.model, state["trainable"], strict=False)
        rt.load_optimizer_state(run.opt, state_root(run), state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])

    saved = load_checkpoint(root, restore,
                            warn=lambda m: print(m, file=sys.stderr) if run.main else None)
    if saved is None:
        if run.main:
            print(f"no checkpoint under {root}; starting from scratch", file=sys.stderr)
        return None
    run.timer.seconds, run.tokens_generated = saved["cost_seconds"], saved["tokens_generated"]
    restore_rng(saved["rng"])
    load_state(saved["algorithm"])
    if run.main:
        print(f"resumed from {saved['folder']} at step {saved['step']}", file=sys.stderr)
    return saved

def finish_run(run, result: dict, full: dict | None, **extra) -> dict:
    """final/ (the policy's adapter or model as it is now, i.e. the selected step's when
    selecting, + tokenizer; `full`: the gathered weights when sharded), eval_before.json and
    eval_after.json (`mogrpo eval`'s schema), cost.json (wall and phase seconds, peak memory,
    tokens, processes, + `extra`). Returns `result` with the cost added."""
    with writing(run.out / "final"), atomic_folder(run.out / "final") as tmp:
        run.policy.save_pretrained(tmp, state_dict=full)
        run.tok.save_pretrained(tmp)
    for tag in ("before", "after"):
        atomic_write_text(run.out / f"eval_{tag}.json", json.dumps(result[f"eval_{tag}"], indent=2))
    cost = {"wall_seconds": round(time.time() - run.t_start, 1),
            "phase_seconds": {k: round(v, 2) for k, v in run.timer.seconds.items()},
            "peak_memory_mb": round(peak_memory_mb(run.device), 1),
            "peak_memory_of": ("torch.cuda.max_memory_allocated" if run.device.type == "cuda"
                               else "process max RSS"),
            "tokens_generated": run.tokens_generated,
            **extra, "processes": run.world, "sharding": run.runtime.sharding or "none",
            "device": str(run.device), "precision": str(run.amp or "fp32"),
            "weights_dtype": str(run.policy_dtype).replace("torch.", ""),
            "rollout_engine": run.rollout_engine,
            **packing.forward_path(run.policy, run.cfg.shared_prefix)}
    atomic_write_text(run.out / "cost.json", json.dumps(cost, indent=2))
    return {**result, "cost": cost}
