"""Configs: dataclasses filled from a YAML file plus `key=value` command-line overrides.

Every algorithm owns one dataclass (fields documented with `metadata={"help": ...}`);
this module only knows how to fill any of them, validate the keys, and write the
resolved result next to a run so it can be reproduced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message says what to change."""


def field(default: Any = dataclasses.MISSING, *, help: str,
          default_factory: Any = dataclasses.MISSING):
    """A dataclass field that carries its help text."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["a=1", "b.c=[x, y]"] into {"a": 1, "b.c": ["x", "y"]} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lr=1e-4)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def _coerce(cls_name: str, name: str, tp: Any, value: Any) -> Any:
    """Light type coercion so that YAML `1e-4` (a string in YAML 1.1) becomes a float, etc."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(cls_name, name, non_none[0], value)
        return value
    try:
        if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
        if tp is bool and isinstance(value, str):
            if value.lower() in ("true", "yes", "1"):
                return True
            if value.lower() in ("false", "no", "0"):
                return False
            raise ValueError(value)
    except ValueError as exc:
        raise ConfigError(f"{cls_name}.{name}: {value!r} is not a valid {tp.__name__}") from exc
    if origin in (list, tuple) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys with the list of valid
    ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    data = resolve_aliases(cls, data, set(fields))  # unknown keys are errors there
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = from_dict(tp, value)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(cls.__name__, name, tp, value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def resolve_aliases(cls: type, data: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The keyword arguments `data` as field names of config class `cls` (whose fields are
    `names`): the one resolution that both the YAML loader (`from_dict`) and `cls(**kw)` (through
    `ConfigMeta`) apply.

    1. Alias keys (the class's `ALIASES`, e.g. TRL's `learning_rate` for `lr`) are renamed; an
       alias may set several fields (`cliprange` -> eps_low and eps_high). A field and one of
       its aliases both is an error.
    2. The class's `translate_names(data)` (optional) turns names whose meaning is more than a
       rename into fields (TRL's `epsilon`, `warmup_ratio`, `bf16`, ...: rl/trl_names.py).
    3. A name in the class's `REFUSED` ({name: (reason, accepted values)}) is an error giving
       the reason, unless its value is one of the accepted ones (what the class does anyway),
       which is dropped.
    4. Any other unknown key is an error naming the nearest field."""
    aliases = getattr(cls, "ALIASES", {})
    out = {k: v for k, v in data.items() if k not in aliases or k in names}
    for key, value in data.items():
        if key in names or key not in aliases:
            continue
        targets = (aliases[key],) if isinstance(aliases[key], str) else aliases[key]
        for target in targets:
            if target in out:
                raise ConfigError(f"{cls.__name__}: {key!r} is another name for {target!r}; give "
                                  f"only one of them")
            out[target] = value
    translate = getattr(cls, "translate_names", None)
    if translate is not None:
        out = translate(dict(out))
    refused = getattr(cls, "REFUSED", {})
    for key in [k for k in out if k not in names and k in refused]:
        reason, accepted = refused[key]
        if not any(_same(out[key], a) for a in accepted):
            raise ConfigError(f"{cls.__name__}: {key!r} is not supported: {reason}")
        del out[key]
    unknown = sorted(set(out) - names)
    if unknown:
        hints = "; ".join(f"the nearest field to {k!r} is {_nearest(k, names, aliases)!r}"
                          for k in unknown)
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys are: "
                          f"{', '.join(sorted(names))}; {hints}")
    return out


def _same(value: Any, accepted: Any) -> bool:
    """`value == accepted`, with a bool never equal to a number (True is not 1 here) and YAML's
    `1e-8` (a string in YAML 1.1) equal to the float."""
    if isinstance(accepted, float) and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return isinstance(value, bool) == isinstance(accepted, bool) and value == accepted


def _nearest(key: str, names: set[str], aliases: dict[str, Any]) -> str:
    """The field whose name (or one of whose aliases) is closest to `key`."""
    import difflib

    def field_of(name: str) -> str:
        target = aliases.get(name, name)
        return target if isinstance(target, str) else target[0]

    candidates = sorted(names | {a for a in aliases if all(
        t in names for t in ((aliases[a],) if isinstance(aliases[a], str) else aliases[a]))})
    if not candidates:
        return ""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return field_of(close[0]) if close else candidates[0]


class ConfigMeta(type):
    """Metaclass of a config dataclass whose keyword arguments go through `resolve_aliases`,
    so that `Config(**kw)` accepts exactly what the YAML loader accepts (aliases, TRL's names),
    with the same errors (a dataclass's own `__init__` knows only the field names)."""

    def __call__(cls, *args, **kwargs):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return super().__call__(*args, **resolve_aliases(cls, kwargs, names))


def load_config(cls: type[T], path: str | os.PathLike | None,
                overrides: list[str] | None = None) -> T:
    """Read YAML at `path` (may be None for the defaults), apply overrides, build `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of key: value")
        data = loaded
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never half of one.
    Its mode follows the umask (0644 under the usual 022), as a plain open() would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # runfolder cleans stale ones
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


ASIDE = re.compile(r"^\.(?P<name>.+)\.old-[A-Za-z0-9_]+$")  # an old folder being replaced


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a temp folder beside `path`; on success it replaces `path`.

    Replace, then delete: the old folder is renamed aside, the new one renamed in, and only
    then is the old one deleted. A process killed between the two renames leaves the old
    folder aside, and `recover_folders` (run with every run folder's stale-temp cleanup)
    renames it back, so `path` is never lost. On an error the temp folder is removed and
    `path` is left as it was. The folder's mode follows the umask (0755 under 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # runfolder cleans stale ones
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, aside)  # a directory onto an empty directory: one rename
            os.replace(tmp, path)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def recover_folders(parent: str | os.PathLike) -> list[str]:
    """Finish what a killed `atomic_folder` left in `parent`: an old folder set aside whose
    replacement never arrived is renamed back; one whose replacement is in place is deleted.
    Returns what it did, one line each."""
    parent, done = Path(parent), []
    if not parent.is_dir():
        return done
    for p in sorted(parent.iterdir()):
        m = ASIDE.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        target = parent / m.group("name")
        if target.exists():
            shutil.rmtree(p)
            done.append(f"removed {p.name} (replaced by {target.name})")
        else:
            os.replace(p, target)
            done.append(f"restored {target.name} from {p.name} (its replacement never finished)")
    return done


def reconcile_resume(cfg: T, saved_path: str | os.PathLike,
                     may_change: set[str]) -> tuple[T, list[str]]:
    """The config a resumed run continues with, and one line per key that differs from the
    run's saved config.yaml (`saved_path`): keys in `may_change` (how long, how often to save
    or log, threads, ...) take the new value; every other key keeps the run's own value, since
    the checkpoint's optimiser, weights and data order were made with it. The result is what
    the run really uses, so the config.yaml written from it never lies."""
    try:
        saved = yaml.safe_load(Path(saved_path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{saved_path}: the run's saved config is unreadable ({exc}); resume "
                          f"needs it "
                          f"(or start a new run in another folder)") from None
    new, merged, notes = to_dict(cfg), {}, []
    for key, value in new.items():
        if key not in saved or saved[key] == value:
            merged[key] = value
        elif key in may_change:
            merged[key] = value
            notes.append(f"{key}: {saved[key]!r} -> {value!r} (the new value is used)")
        else:
            merged[key] = saved[key]
            notes.append(f"{key}: the run was started with {saved[key]!r}; {value!r} is ignored "
                         f"and the run keeps "
                         f"{saved[key]!r} (its checkpoint was made with it; start a new run in "
                         f"another folder "
                         f"to change it)")
    return (from_dict(type(cfg), merged) if notes else cfg), notes


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type) -> str:
    """Help text for every field of a config dataclass (used by `--help`), with its aliases."""
    names: dict[str, list[str]] = {}
    for alias, targets in getattr(cls, "ALIASES", {}).items():
        for t in ((targets,) if isinstance(targets, str) else targets):
            names.setdefault(t, []).append(alias)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        also = f" [also: {', '.join(names[f.name])}]" if f.name in names else ""
        lines.append(f"  {f.name}{also} (default {default!r}): {f.metadata.get('help', '')}")
    if getattr(cls, "translate_names", None) is not None:
        lines.append("  TRL's field names are accepted with TRL's meaning (docs/trl.md).")
    return "\n".join(lines)
