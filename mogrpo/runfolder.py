"""Output folders and the files mogrpo reads back: nothing a user does wrong loses a file,
runs code from a file, or ends in a traceback.

- `claim_output(folder, command)`: before any work, check that --output is a folder (or
  can become one) that this user can write; refuse a non-empty folder that mogrpo did not
  create (no `.mogrpo` marker), and one whose marker names another kind of run (a `reward
  train` into a `train grpo` folder would replace its files); take the folder's lock (one
  run per folder; the lock of a killed process is released with it, so a stale lock file is
  simply taken over); remove the temp files and folders a killed write left behind. The
  lock and the marker are opened with O_NOFOLLOW: a symbolic link planted in their place is
  an error naming it, never a way to make mogrpo write the file it points to.
- `check_output_file(path)`: the same for a command that writes one file.
- `load_state(path, what)`: `torch.load(weights_only=True)`: tensors, numbers, strings and
  containers only, never code; a truncated or foreign file is a clear error.
- `looks_local(ref)`: whether a model reference is meant as a path (so a missing one is
  "no such folder", not a hub error).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

MARKER = ".mogrpo"  # written into every folder mogrpo creates as an output
LOCK = ".mogrpo.lock"
# Temp names of config.atomic_write_text / atomic_folder (".NAME.tmp-XXXX") and the legacy ones.
_TEMP = re.compile(r"^\..+(\.tmp-[A-Za-z0-9_]+|\.tmp)$")


class OutputError(ValueError):
    """An output path cannot be used; the message says why and what to do."""


class CheckpointError(ValueError):
    """A checkpoint or state file cannot be read; the message names it and the fix."""


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(path: Path, what: str) -> None:
    """`path` (a folder that exists or will be created) can be written by this user."""
    base = _first_existing(path)
    if base.exists() and not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot write in {base} (permission denied); choose a "
                          f"folder you "
                          f"can write, e.g. under your home")


def _plain_file(path: Path) -> bool:
    """A regular file itself, not a symbolic link to one."""
    return path.is_file() and not path.is_symlink()


def open_own(path: Path, flags: int, mode: int = 0o666) -> int:
    """A file descriptor for a file of a run folder (O_NOFOLLOW, O_CLOEXEC): a symbolic link in
    its place (one planted there would make mogrpo write or read the file it points to), a
    folder or a device, and for writing a file with other hard links (names elsewhere whose
    content a write would change), is an OutputError naming it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}): mogrpo never "
                              f"follows links in its output folders; remove the link, or choose "
                              f"another --output") from None
        raise OutputError(f"{path}: cannot open ({exc.strerror}); remove it, or choose another "
                          f"--output") from None
    info = os.fstat(fd)
    linked = info.st_nlink > 1 and flags & (os.O_WRONLY | os.O_RDWR)
    if not stat.S_ISREG(info.st_mode) or linked:
        os.close(fd)
        why = "is not a regular file" if not stat.S_ISREG(info.st_mode) else \
            f"has {info.st_nlink} hard links (other names, elsewhere, that a write would change)"
        raise OutputError(f"{path} {why}: mogrpo writes only files of its own there; remove it, "
                          f"or choose another --output")
    return fd


def read_marker(folder: Path) -> dict | None:
    """The JSON of `folder`'s `.mogrpo` marker (read without following a link): None when there
    is none, {} when it is not JSON (an empty marker a user made with `touch`)."""
    path = folder / MARKER
    if not (path.exists() or path.is_symlink()):
        return None
    with os.fdopen(open_own(path, os.O_RDONLY), "rb") as fh:
        raw = fh.read(1 << 16)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def marker_kind(marker: dict | None) -> str | None:
    """The kind of run a marker names (`kind`; markers of versions before it have the same
    string as `command`); None when it names none."""
    if not marker:
        return None
    kind = marker.get("kind", marker.get("command"))
    return kind if isinstance(kind, str) and kind else None


def _check_kind(folder: Path, command: str, what: str) -> None:
    """Refuse a folder whose marker names another kind of run than `command`."""
    kind = marker_kind(read_marker(folder))
    if kind is not None and kind != command:
        raise OutputError(f"{what} {folder} holds a `mogrpo {kind}` run ({MARKER} says so), not "
                          f"a `mogrpo {command}` one, and its files would be replaced: choose "
                          f"another {what}")


def _write_marker(folder: Path, command: str) -> None:
    from mogrpo._version import __version__

    text = json.dumps({"kind": command, "command": command, "mogrpo": __version__,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
    try:  # O_EXCL: never through a link, never over a file that appeared meanwhile
        fd = open_own(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except OutputError:
        if (folder / MARKER).is_symlink() or not (folder / MARKER).exists():
            raise
        return  # written meanwhile (by a version that does not lock): checked by the caller
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def made_by_mogrpo(folder: Path) -> bool:
    """True when `folder` carries mogrpo's marker (or is a `mogrpo run` stage or run folder of a
    version before the marker: `.stage-hash`, or run_config.yaml beside such stages). A link in
    place of any of these does not count."""
    if _plain_file(folder / MARKER) or _plain_file(folder / ".stage-hash"):
        return True
    return _plain_file(folder / "run_config.yaml") and any(
        _plain_file(c / ".stage-hash") for c in folder.iterdir()
        if c.is_dir() and not c.is_symlink())


def claim_output(folder: str | os.PathLike, command: str | None, *,
                 what: str = "--output") -> "FolderLock":
    """Check, create, mark and lock an output folder; return the held lock (see module doc).
    `command` is the kind of run the folder is for ("train grpo", "reward train", "eval",
    "run", ...): recorded in a new folder's marker, and a folder marked for another kind is
    refused. None takes the lock of a folder mogrpo made whatever its kind, and marks nothing
    (--overwrite, which only moves the folder aside)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is an existing file; give a folder path (mogrpo "
                          f"writes several "
                          f"files into it)")
    _check_writable(folder, what)
    for name in (MARKER, LOCK):
        if (folder / name).is_symlink():
            open_own(folder / name, os.O_RDONLY)  # the error that names the link
    if folder.is_dir() and any(folder.iterdir()) and not made_by_mogrpo(folder):
        raise OutputError(f"{what} {folder} is not empty and was not created by mogrpo (no "
                          f"{MARKER} marker): "
                          f"mogrpo never writes into or replaces a folder it did not make. Choose "
                          f"a new or empty "
                          f"folder (if it is a run folder of an older mogrpo, "
                          f"`touch {folder / MARKER}`)")
    if folder.is_dir() and command is not None:
        _check_kind(folder, command, what)
    made, p = [], folder.absolute()
    while not (p.exists() or p.is_symlink()) and p != p.parent:  # the folders mkdir creates
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    held = FolderLock.holds(folder)
    lock = FolderLock.take(folder)
    try:
        if command is not None:
            if read_marker(folder) is None:
                _write_marker(folder, command)
                if not held:  # a command that then writes nothing leaves nothing (release)
                    lock.made = made
            _check_kind(folder, command, what)  # again, with the lock held
        clean_stale_temps(folder)
    except BaseException:
        if not held:
            lock.release()
        raise
    return lock


def check_output_file(path: str | os.PathLike, what: str = "--output") -> Path:
    """A file output: not a folder, and its folder writable (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path, e.g. {path / 'out.jsonl'}")
    _check_writable(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: the file exists and cannot be written (permission "
                          f"denied)")
    return path


def clean_stale_temps(folder: Path) -> list[str]:
    """Remove the temp files/folders of writes that a killed process left in `folder` and its
    checkpoint folders (only ever called with the folder's lock held). Returns their names."""
    from mogrpo.config import recover_folders

    removed = []
    for d in (folder, folder / "checkpoints"):
        if not d.is_dir() or d.is_symlink():  # never into a folder a link points to
            continue
        removed += recover_folders(d)  # a folder whose replacement a kill interrupted comes back
        for p in d.iterdir():
            if _TEMP.match(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(str(p.relative_to(folder)))
    return removed


class FolderLock:
    """An exclusive `flock` on FOLDER/.mogrpo.lock until `release()` (or `release_all()`, which
    the CLI calls when a command ends, however it ends).

    The kernel drops the lock when its process dies, however it dies, so a lock file left
    by a killed run is taken over by the next one; a live holder makes this an error that
    names its pid. A process asking again for a folder it holds gets its own lock back."""

    held: dict[str, "FolderLock"] = {}
    # The folders the claim created, when it also wrote the marker (else None): if nothing else
    # was written when the lock is released (an input error found after the claim), the marker,
    # the lock file and these folders are removed, leaving the path as the command found it.
    made: list[Path] | None = None

    @classmethod
    def holds(cls, folder: Path) -> bool:
        """Whether this process holds `folder`'s lock."""
        lock = cls.held.get(str(folder.resolve()))
        return lock is not None and not lock.fh.closed

    @classmethod
    def take(cls, folder: Path) -> "FolderLock":
        key = str(folder.resolve())
        lock = cls.held.get(key)
        if lock is None or lock.fh.closed:
            lock = cls.held[key] = cls(folder)
        return lock

    def __init__(self, folder: Path):
        import fcntl

        self.path = folder / LOCK
        self.fh = os.fdopen(open_own(self.path, os.O_RDWR | os.O_CREAT), "r+", encoding="utf-8")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "unknown"
            self.fh.close()
            raise OutputError(f"{folder} is in use by another mogrpo process ({holder}); wait for "
                              f"it to finish, "
                              f"or choose another --output") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        self.fh.flush()

    def release(self) -> None:
        if self.fh.closed:
            return
        if self.made is not None:
            self._undo_unused_claim()
        self.fh.close()  # closing drops the flock

    def _undo_unused_claim(self) -> None:
        folder = self.path.parent
        try:
            if {p.name for p in folder.iterdir()} - {MARKER, LOCK}:
                return  # the command wrote something: the folder is its output
            (folder / MARKER).unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
            for d in self.made:  # the deepest first; stops at one that is not empty
                d.rmdir()
        except OSError:
            pass


def release_all() -> None:
    """Drop every folder lock this process holds."""
    for lock in FolderLock.held.values():
        lock.release()
    FolderLock.held.clear()


def load_state(path: str | os.PathLike, what: str):
    """A checkpoint's state (tensors, numbers, strings, containers) without unpickling code."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise CheckpointError(f"{path}: {what} holds objects other than tensors and plain values"
                              f"{f' ({found.group(1)})' if found else ''}, which mogrpo never "
                              f"writes and will not "
                              f"load: a crafted or foreign file? Use the run's own "
                              f"checkpoints") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {what} is unreadable (truncated or corrupt: "
                              f"{first_line(exc)[:160]})") from None


def load_newest(files: list[Path], what: str, restore, *, where: str, label=str,
                warn=print) -> tuple[Path, dict] | None:
    """The first of `files` (newest first) whose state loads (`load_state`) and that
    `restore(state)` accepts (it raises when the state does not fit), as (path, state). One
    that fails is skipped with a warning (`label(path)` names it), so a damaged newest
    checkpoint falls back to the previous one; when every one fails, the CheckpointError
    ("no WHERE loads") lists them all; None when there is none."""
    problems = []
    for path in files:
        try:
            state = load_state(path, what)
            restore(state)
        except (CheckpointError, KeyError, RuntimeError, ValueError) as exc:
            problems.append(f"{label(path)}: {exc}")
            warn(f"warning: skipping {label(path)}: {exc}")
            continue
        return path, state
    if problems:
        raise CheckpointError(f"no {where} loads ({'; '.join(problems)}); move it away to start "
                              f"again, or resume "
                              f"from a copy")
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_local(ref: str) -> bool:
    """True when `ref` can only be meant as a local path: absolute, ./ ../ ~, a Windows-style
    or more-than-one-slash path, a file suffix a hub id never has, or a first component that
    exists here. Hub ids are `name` or `org/name`."""
    if (ref.startswith(("/", "./", "../", "~", ".\\")) or "\\" in ref
            or ref.endswith((".gguf", ".safetensors"))):
        return True
    if not _HUB_ID.match(ref):
        return True
    return "/" in ref and Path(ref.split("/", 1)[0]).is_dir()


def rng_state() -> dict:
    """Every RNG state (torch CPU, Python, NumPy) as tensors and plain values, so that a
    checkpoint holding it loads with weights_only=True."""
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)]}


def restore_rng(state: dict) -> None:
    """Set every RNG from `rng_state()`'s dict."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def trim_jsonl(path: Path, key: str, last: int) -> None:
    """Keep the rows of a JSONL log whose `key` is <= `last` (and drop a half-written last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a kill cut short
        if isinstance(row, dict) and isinstance(row.get(key), (int, float)) and row[key] <= last:
            keep.append(line)
    from mogrpo.config import atomic_write_text

    atomic_write_text(path, "".join(x + "\n" for x in keep))
