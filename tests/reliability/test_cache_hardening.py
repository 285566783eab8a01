"""ArtifactCache against hostile or unlucky disk states (issue 13, items 9-11): links out of the root,
manifests that lie, a full disk, lock-file litter, read-only prebuilt caches and unsafe names."""

from __future__ import annotations

import ctypes
import errno
import json
import multiprocessing as mp
import os
import shutil
import traceback
import warnings
from pathlib import Path

import pytest

from _cache_workers import PAYLOAD, lock_stress, write_payload
from distpp import CacheError
from distpp.cache import MANIFEST, ArtifactCache, cache_key, file_sha256

KEY = cache_key(model="tiny", shape=[1, 4, 8, 8], dtype="float32")
OTHER = cache_key(model="tiny", shape=[2, 4, 8, 8], dtype="float32")


def builds(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def build_with(log: Path):
    return lambda d: write_payload(d, str(log), 0)


def assert_valid(folder: Path) -> None:
    assert not folder.is_symlink() and folder.is_dir()
    assert (folder / "blob.bin").read_bytes() == PAYLOAD
    assert (folder / "meta.txt").read_text() == "ok"
    ArtifactCache(folder.parent.parent).validate(folder)


def never(folder: Path) -> None:
    raise AssertionError("a valid cached artifact must not be rebuilt")


# ---- item 9: symbolic links ------------------------------------------------------------------------
def test_linked_entry_with_a_corrupt_file_is_replaced_not_followed(tmp_path):
    """An entry that is a link to a folder elsewhere (here: a valid artifact of another cache, then
    damaged) is never used, repaired or deleted through the link: the link goes, the target stays."""
    log = tmp_path / "builds.log"
    elsewhere = ArtifactCache(tmp_path / "elsewhere").get_or_build("blob", KEY, build_with(log))
    cache = ArtifactCache(tmp_path / "c")
    (tmp_path / "c" / "blob").mkdir(parents=True)
    os.symlink(elsewhere, cache.path("blob", KEY))
    (elsewhere / "blob.bin").write_bytes(b"corrupt")
    for _ in range(2):  # the old code raised NotADirectoryError here, on every call
        with pytest.warns(UserWarning, match="link"):
            folder = cache.get_or_build("blob", KEY, build_with(log))
        assert_valid(folder)
        assert folder == cache.path("blob", KEY)
        # the next call finds a real, valid folder: no warning, no build
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cache.get_or_build("blob", KEY, never) == folder
        # link it again for the second round
        os.rename(folder, tmp_path / f"moved{_}")
        os.symlink(elsewhere, cache.path("blob", KEY))
    assert (elsewhere / "blob.bin").read_bytes() == b"corrupt", "the link's target outside the root was touched"
    assert builds(log) == 3


def test_kind_folder_linked_out_of_the_root_is_a_cache_error(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "c").mkdir()
    os.symlink(outside, tmp_path / "c" / "blob")
    with pytest.raises(CacheError, match=r"c/blob.*link"):
        ArtifactCache(tmp_path / "c").get_or_build("blob", KEY, build_with(tmp_path / "l"))
    assert list(outside.iterdir()) == []


# ---- item 10: manifests that lie -------------------------------------------------------------------
@pytest.mark.parametrize("lie", ["omits_a_file", "absolute_path", "dotdot_path", "other_key", "other_kind",
                                 "linked_file", "extra_folder"])
def test_manifest_that_lies_is_rejected_and_rebuilt(tmp_path, lie):
    cache, log = ArtifactCache(tmp_path / "c"), tmp_path / "builds.log"
    folder = cache.get_or_build("blob", KEY, build_with(log))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(PAYLOAD)
    manifest = json.loads((folder / MANIFEST).read_text())
    files = manifest["files"]
    entry = {"size": len(PAYLOAD), "sha256": file_sha256(outside)}
    if lie == "omits_a_file":
        del files["meta.txt"]
    elif lie == "absolute_path":
        files[str(outside)] = entry
    elif lie == "dotdot_path":
        files["../../../outside.bin"] = entry
    elif lie == "other_key":
        manifest["key"] = OTHER
    elif lie == "other_kind":
        manifest["kind"] = "onnx"
    elif lie == "linked_file":
        (folder / "blob.bin").unlink()
        os.symlink(outside, folder / "blob.bin")  # same size and sha256: only the link gives it away
    elif lie == "extra_folder":
        (folder / "sub").mkdir()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="rebuilding"):
        again = cache.get_or_build("blob", KEY, build_with(log))
    assert again == folder and builds(log) == 2
    assert_valid(again)
    assert outside.read_bytes() == PAYLOAD


def test_build_that_writes_a_folder_or_link_is_refused(tmp_path):
    cache = ArtifactCache(tmp_path / "c")

    def nested(d):
        (d / "blob.bin").write_bytes(PAYLOAD)
        (d / "sub").mkdir()

    with pytest.raises(CacheError, match="sub.*not a regular file"):
        cache.get_or_build("blob", KEY, nested)
    assert not cache.path("blob", KEY).exists()


# ---- item 11: full disk, lock litter, read-only caches, names -------------------------------------
@pytest.mark.parametrize("where", ["build", "manifest"])
def test_disk_full_is_a_cache_error_naming_the_path(tmp_path, monkeypatch, where):
    cache = ArtifactCache(tmp_path / "c")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "build":
        build = full
    else:
        build = build_with(tmp_path / "l")
        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CacheError, match="No space left on device") as info:
        cache.get_or_build("blob", KEY, build)
    assert str(tmp_path / "c" / "blob") in str(info.value) and isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "c" / "blob").iterdir()] == []  # cleanup, and no lock file either


def test_lock_files_do_not_pile_up(tmp_path):
    cache, log = ArtifactCache(tmp_path / "c"), tmp_path / "builds.log"
    keys = [cache_key(i=i) for i in range(50)]
    for k in keys:
        cache.get_or_build("blob", k, build_with(log))
    for k in keys[::2]:
        shutil.rmtree(cache.path("blob", k))  # deleted by hand (or by a cleanup job)
    names = sorted(p.name for p in (tmp_path / "c" / "blob").iterdir())
    assert names == sorted(keys[1::2]), "only the 25 kept artifacts may remain (no lock or temp files)"


def test_lock_with_file_removal_still_excludes_across_processes(tmp_path):
    """Four forked processes rebuild one key 25 times each (discarding it after each build, so the lock
    file is created and removed all the time); a build that finds another builder inside fails."""
    ctx = mp.get_context("fork")
    root = tmp_path / "c"
    procs = [ctx.Process(target=lock_stress, args=(str(root), KEY, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert sorted(p.name for p in (root / "blob").iterdir()) in ([], [KEY])


def _in_read_only_view(root: Path, fn) -> int:
    """Run ``fn()`` in a forked child that sees ``root`` read-only; its exit status (77: cannot set up).

    Root ignores permission bits, so as root the child gets a private mount namespace with a read-only
    bind mount of ``root`` (the parent's view is unchanged); otherwise plain permissions do it.
    """
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            if os.geteuid() == 0:
                libc = ctypes.CDLL(None, use_errno=True)
                ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 1, 32, 4096, 16384, 1 << 18
                r = str(root).encode()
                if (libc.unshare(0x00020000) != 0  # CLONE_NEWNS
                        or libc.mount(None, b"/", None, ms_rec | ms_private, None) != 0
                        or libc.mount(r, r, None, ms_bind, None) != 0
                        or libc.mount(None, r, None, ms_bind | ms_remount | ms_rdonly, None) != 0):
                    os._exit(77)
            fn()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    if os.geteuid() != 0:
        for p, mode in modes.items():
            p.chmod(mode)
    return os.waitstatus_to_exitcode(status)


def test_read_only_prebuilt_cache_serves_valid_entries(tmp_path):
    root = tmp_path / "c"
    folder = ArtifactCache(root).get_or_build("blob", KEY, build_with(tmp_path / "l"))

    def use():
        cache = ArtifactCache(root)
        assert cache.get_or_build("blob", KEY, never) == folder
        assert cache.load("blob", KEY) == folder
        try:
            (root / "probe").write_text("x")
        except OSError:
            pass
        else:
            raise AssertionError("the view is not read-only")
        with pytest.raises(CacheError, match="cannot write"):
            cache.get_or_build("blob", OTHER, build_with(tmp_path / "l"))

    code = _in_read_only_view(root, use)
    if code == 77:
        pytest.skip("cannot make a read-only view here (no mount namespace)")
    assert code == 0


def test_corrupt_entry_is_moved_aside_before_it_is_deleted(tmp_path, monkeypatch):
    """A lock-free reader must never see a half-deleted entry: removal happens on a renamed copy."""
    cache, log = ArtifactCache(tmp_path / "c"), tmp_path / "builds.log"
    folder = cache.get_or_build("blob", KEY, build_with(log))
    (folder / "blob.bin").write_bytes(b"corrupt")
    removed = []
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        removed.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.warns(UserWarning, match="rebuilding"):
        cache.get_or_build("blob", KEY, build_with(log))
    assert removed and folder not in removed, removed
    assert_valid(folder)


@pytest.mark.parametrize("kind,key", [("../../x", KEY), ("blob/sub", KEY), ("blob", "*"), ("blob", "a?b"),
                                      ("blob", "[ab]"), ("blob", ".hidden"), ("blob", ""), ("", KEY),
                                      ("blob", "/abs"), ("blob", "x" * 300)],
                         ids=["dotdot-kind", "slash-kind", "star", "question", "brackets", "hidden", "empty-key",
                              "empty-kind", "absolute", "too-long"])
def test_unsafe_kind_or_key_names_are_refused(tmp_path, kind, key):
    root = tmp_path / "root" / "c"
    root.mkdir(parents=True)
    theirs = root / "blob" / f".tmp-{OTHER}-abcdefgh"  # another builder's temp folder, in progress
    theirs.mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cache = ArtifactCache(root)
    with pytest.raises(CacheError, match="name"):
        cache.get_or_build(kind, key, build_with(tmp_path / "l"))
    with pytest.raises(CacheError, match="name"):
        cache.load(kind, key)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
