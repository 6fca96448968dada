"""The one checkpoint format of every trainer (the policy algorithms and the reward model),
and the selection of the best checkpoint.

Layout of a run folder (Hugging Face's checkpoint-N names, N the step, not zero-padded):
    checkpoints/checkpoint-N/trainer_state.pt  {step, trainable, optimizer, scheduler, rng,
                                                algorithm, ...}: everything a resume needs
    checkpoints/checkpoint-N/...                the model in its own format (optional)
    checkpoints/checkpoint-N/best/              the selected weights so far (optional)
    checkpoints/latest                          the newest checkpoint's folder name
A checkpoint folder appears whole or not at all (written aside, then renamed), and `latest`
moves only after it; the newest `keep` are kept. Runs made before the rename hold
checkpoints/step-NNNNNN/ (same contents): they are still read, resumed and pruned, ordered
with the new names by step (checkpoint_folders). `trainable` holds the tensors that train
(LoRA adapters, or every weight); `algorithm` the trainer's own state (GRPO's multipliers,
the reward trainer's early-stopping record, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from mogrpo.config import atomic_folder, atomic_write_text
from mogrpo.runfolder import CheckpointError, OutputError, first_line, load_newest

REQUIRED = ("step", "trainable", "optimizer", "scheduler", "rng", "algorithm")
STATE_FILE = "trainer_state.pt"
# checkpoint-N; step-NNNNNN is the name runs made before the rename hold (still read)
_FOLDER = re.compile(r"^(?:checkpoint-(\d+)|step-(\d{6,}))$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of `step`: checkpoint-N (Hugging Face's)."""
    return f"checkpoint-{step}"


def checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoint folders under `root`, oldest first by step (checkpoint-N, and the
    step-NNNNNN of runs made before the rename; of two with the same step, checkpoint-N is
    the newer)."""
    found = []
    for p in Path(root).iterdir() if Path(root).is_dir() else []:
        m = _FOLDER.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1) or m.group(2)), m.group(1) is not None, p))
    return [p for *_, p in sorted(found)]


@contextlib.contextmanager
def writing(what: Path):
    """Turn a failed write (a full disk, a file-size limit, an I/O error: OSError, or the
    RuntimeError / SafetensorError that torch and safetensors raise for it) into one line. The
    atomic writers have removed their temp files by then and left the previous version."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
            raise
        raise OSError(f"writing {what} failed ({first_line(exc)}); the previous version is "
                      f"intact and nothing half-written was kept: free disk space, then run "
                      f"again with --resume") from None


def checkpoint_root(run: Path) -> Path:
    return Path(run) / "checkpoints"


def latest_checkpoint(run: Path) -> Path | None:
    """The newest checkpoint folder of a run (named by checkpoints/latest), or None."""
    latest = checkpoint_root(run) / "latest"
    if not latest.is_file():
        return None
    folder = latest.parent / latest.read_text().strip()
    return folder if folder.is_dir() else None


def held_run(run: Path) -> list[str]:
    """What of an earlier run `run` holds that a new run would mix with: checkpoints, final/,
    best/, a reward model's model/ (empty when none)."""
    run = Path(run)
    held = ["checkpoints/"] if checkpoint_folders(checkpoint_root(run)) else []
    return held + [f"{n}/" for n in ("final", "best", "model") if (run / n).exists()]


def refuse_mixing(run: Path, resume: bool) -> None:
    """A fresh run (no --resume) into a folder that holds another run is refused: its
    checkpoints would be pruned or resumed as this run's, its final/ silently replaced."""
    held = held_run(run)
    if held and not resume:
        raise OutputError(f"{run} holds an earlier run ({', '.join(held)}): continue it with "
                          f"--resume, move it aside with --overwrite, or choose another --output")


def move_run_aside(run: Path, command: str) -> Path | None:
    """--overwrite: rename a folder that holds a run to `<name>.previous-<time>` beside it
    (under its lock, so a run in progress is never moved; `command` is the run's kind, as
    claim_output checks it); None when there is nothing to move."""
    import time

    from mogrpo.runfolder import claim_output

    run = Path(run)
    if not held_run(run):
        return None
    lock = claim_output(run, command)
    try:
        aside = run.with_name(f"{run.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run, aside)
    finally:
        lock.release()
    return aside


def trainable_state(model: torch.nn.Module, full: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors that train (LoRA adapters, or every weight), on the CPU, for a checkpoint;
    taken from `full` (a gathered state dict) when the weights are sharded."""
    return {n: (full[n] if full is not None else p.detach()).cpu() for n,
            p in model.named_parameters()
            if p.requires_grad}


def copy_linked(src: Path, dst: Path) -> None:
    """Folder dst (made if missing) with src's files as hard links (no extra disk; the files
    are only ever replaced, never changed in place), or copies where the file system has no
    links."""
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 = all)."""
    if keep > 0:
        for old in checkpoint_folders(root)[:-keep]:
            shutil.rmtree(old)


def save_checkpoint(root: Path, state: dict, *, keep: int,
                    write_model: Callable[[Path], None] | None = None,
                    best: Path | None = None) -> Path:
    """checkpoints/checkpoint-<state["step"]>/ atomically, then `latest`, then prune to `keep`
    (a step-NNNNNN of the same step, from before a resume, is superseded and removed).
    `write_model(folder)` adds the model in its own format; `best` (a save_best folder) is
    kept as best/ so that a resume restores the selection that goes with the state."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"a checkpoint state needs {missing}")
    folder = root / checkpoint_name(state["step"])
    with writing(folder), atomic_folder(folder) as tmp:
        if write_model is not None:
            write_model(tmp)
        torch.save(state, tmp / STATE_FILE)
        if best is not None:
            copy_linked(best, tmp / "best")
    with writing(root / "latest"):
        atomic_write_text(root / "latest", folder.name)
    shutil.rmtree(root / f"step-{state['step']:06d}", ignore_errors=True)
    prune(root, keep)
    return folder


def load_checkpoint(root: Path, restore: Callable[[dict], None], *, warn=None) -> dict | None:
    """The newest checkpoint under `root` that loads (weights_only) and that `restore(state)`
    accepts; a newer one that does not (a kill, a full disk, a damaged file) is skipped with
    a warning; when none loads, the error names them all. Returns the state with "folder"
    added, or None when there is no checkpoint."""
    # Newest first by step: a folder appears whole (atomic rename) before `latest` moves to it,
    # so the newest folder is the newest complete checkpoint.
    files = [f / STATE_FILE for f in reversed(checkpoint_folders(root))]

    def check_and_restore(state: dict) -> None:
        for key in REQUIRED:
            if key not in state:
                raise CheckpointError(f"{STATE_FILE} has no {key!r} (written by another mogrpo "
                                      f"version or program)")
        restore(state)

    found = load_newest(files, "the trainer state", check_and_restore,
                        where=f"checkpoint under {root}",
                        label=lambda p: f"checkpoint {p.parent.name}", warn=warn)
    if found is None:
        return None
    path, state = found
    state["folder"] = path.parent
    return state


def write_jsonl_rows(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- the best checkpoint


def save_best(folder: Path, trainable: dict[str, torch.Tensor], record: dict) -> None:
    """The selected step's trainable tensors (trainable.safetensors) and its validation
    record (selection.json) in `folder`, atomically."""
    from safetensors.torch import save_file

    with writing(folder), atomic_folder(folder) as tmp:
        save_file({k: v.contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        (tmp / "selection.json").write_text(json.dumps(record), encoding="utf-8")


def load_best(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors save_best wrote, checked to be exactly the trainable `names`."""
    from safetensors.torch import load_file

    path = folder / "trainable.safetensors"
    try:
        state = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the selected weights do not load ({first_line(exc)}); "
                              f"rerun with "
                              f"--resume from a checkpoint, or start again") from None
    if set(state) != names:
        raise CheckpointError(f"{path} does not hold this run's trainable weights (e.g. "
                              f"{sorted(set(state) ^ names)[:3]}); start the run again in a new "
                              f"folder")
    return state


class Selection:
    """The validation records of a run (step 0 = the base) and the one a fixed criterion
    selects: `choose(history) -> (step, reason)`, e.g. mogrpo/rl/selection.py's select_step
    with the base setting its limits, so each new record either wins or not. The selected weights
    live in OUT/best/, the records in
    OUT/validation.jsonl; `state` goes into every checkpoint."""

    def __init__(self, out: Path, choose: Callable[[list[dict]], tuple[int, str]], *, main: bool,
                 wait: Callable[[], None] = lambda: None):
        self.out, self.choose, self.main, self.wait = out, choose, main, wait
        self.history: list[dict] = []
        self.best: dict | None = None

    @property
    def state(self) -> dict:
        return {"history": self.history, "best": self.best}

    def restore(self, state: dict, checkpoint: Path) -> None:
        """Take a checkpoint's records and its best/ (best/ and validation.jsonl may hold
        steps after the checkpoint: they run again)."""
        if not (checkpoint / "best" / "trainable.safetensors").is_file():
            raise CheckpointError(f"checkpoint {checkpoint} has no best/ (the weights of the step "
                                  f"selected so "
                                  f"far); move it away to resume from an older one, or start again")
        self.history, self.best = state["history"], state["best"]
        if self.main:
            with atomic_folder(self.out / "best") as tmp:
                copy_linked(checkpoint / "best", tmp)
            write_jsonl_rows(self.out / "validation.jsonl", self.history)

    def add(self, rec: dict, weights: Callable[[], dict[str, torch.Tensor] | None]) -> dict:
        """Add a validation record {step, compliance, over_refusal, degenerate}; when the
        criterion selects it, `weights()` (called on every process: it may be a collective;
        the main process's result is saved) go to best/. Returns the metrics to log."""
        self.history = [*self.history, rec]
        chosen, reason = self.choose(self.history)
        if chosen == rec["step"]:
            trainable = weights()
            if self.main:
                save_best(self.out / "best", trainable, rec)
            self.best = dict(rec)
            self.wait()
        self.best["reason"] = reason
        rec["selected_step"] = chosen
        if self.main:
            write_jsonl_rows(self.out / "validation.jsonl", self.history)
        return {"validation/compliance": rec["compliance"],
                "validation/over_refusal": rec["over_refusal"],
                "validation/degenerate": rec["degenerate"], "validation/selected_step": chosen}
