"""What a training run reports, for every trainer (the policy algorithms and the reward model):
metrics.jsonl always, TensorBoard and/or Weights & Biases as `report_to` asks, a progress
bar, seconds per phase and peak memory. Only the main process writes."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import torch

from mogrpo.config import atomic_write_text, to_dict
from mogrpo.runfolder import trim_jsonl

REPORT_TO = ("tensorboard", "wandb")


class DivergedError(ValueError):
    """A run's numbers stopped being finite (a loss, a gradient norm, a reward, the logits); the
    message names the step and what was not finite."""


FINITE_KEYS = ("loss", "policy_loss", "value_loss", "kl", "grad_norm", "reward/combined/mean")


def check_finite(rec: dict, step: int, keys=FINITE_KEYS) -> None:
    """Raise DivergedError naming `step` when one of `keys` of a step's record (or a reward
    column's mean) is a float that is not finite; None (not measured) passes."""
    watched = [k for k in rec if k in keys or (k.startswith(("reward/", "rewards/"))
                                                    and k.endswith("/mean"))]
    bad = {k: rec[k] for k in watched if isinstance(rec[k], float) and not math.isfinite(rec[k])}
    if bad:
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise DivergedError(f"step {step}: {what} is not finite; nothing of this step was saved")


class PhaseTimer:
    """Seconds per named phase (generation, scoring, reference, ...), summed over a run."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t

        return _T()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def check_report_to(report_to: list[str]) -> None:
    bad = sorted(set(report_to) - set(REPORT_TO))
    if bad:
        raise ValueError(f"report_to names {bad}; choose from {list(REPORT_TO)} (metrics.jsonl is "
                         f"always written)")


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics row, nested dicts flattened to 'a/b' keys (pure)."""
    out = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalars(v, key + "/"))
        elif (key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)):
            out[key] = v
    return out


class Tracker:
    """metrics.jsonl (+ `per_step` files trimmed with it, e.g. samples.jsonl), TensorBoard and
    W&B. Built with the run; `start(resume_step)` opens the files: a fresh run empties them, a
    resumed run keeps the rows up to its checkpoint's step and drops any written after it (they
    are logged again), so a file never holds a step twice."""

    def __init__(self, out: Path, cfg, *, main: bool, per_step: tuple[str, ...] = (),
                 callbacks: list | None = None):
        """`callbacks` get every logged row on the main process: a function `f(metrics)` or an
        object with a transformers-style `on_log(args, state, control, logs=metrics)`."""
        self.out, self.cfg, self.main, self.per_step = out, cfg, main, per_step
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not (callable(cb) or hasattr(cb, "on_log")):
                raise TypeError(f"a callback must be a function of the metrics or have on_log(), "
                                f"got {type(cb).__name__}")
        self.path = out / "metrics.jsonl"
        self.tb = self.wandb = None
        check_report_to(cfg.report_to)

    def start(self, resume_step: int | None) -> None:
        if not self.main:
            return
        for path in (self.path, *(self.out / f for f in self.per_step)):
            if resume_step is None:
                path.write_text("")
            else:
                trim_jsonl(path, "step", resume_step)
        if "tensorboard" in self.cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events a killed run wrote after the checkpoint
            self.tb = SummaryWriter(log_dir=str(self.out / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in self.cfg.report_to:
            try:
                import wandb
            except ImportError:
                raise ValueError("report_to names wandb, which is not installed: pip install wandb "
                                 "(or drop it from report_to)") from None
            id_file = self.out / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            atomic_write_text(id_file, run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mogrpo"),
                                    name=self.out.name,
                                    id=run_id, resume="allow", dir=str(self.out),
                                    config=to_dict(self.cfg))

    def log(self, rec: dict) -> None:
        """One row (with its "step") to metrics.jsonl; its finite numbers to TensorBoard/W&B."""
        if not self.main:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        finite = scalars(rec)
        if self.tb is not None:
            for key, v in finite.items():
                self.tb.add_scalar(key, v, rec["step"])
        if self.wandb is not None:
            self.wandb.log(finite, step=rec["step"])
        for cb in self.callbacks:
            if hasattr(cb, "on_log"):
                cb.on_log(self.cfg, None, None, logs=dict(rec))
            else:
                cb(dict(rec))

    def append(self, name: str, rec: dict) -> None:
        """One row to a per-step file (e.g. samples.jsonl)."""
        if self.main:
            with (self.out / name).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def progress(self, iterable, *, desc: str, show: bool, **kw):
        """A tqdm bar on the main process (hidden elsewhere or when not `show`)."""
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, disable=not (show and self.main), **kw)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
