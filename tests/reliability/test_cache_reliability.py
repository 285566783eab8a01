"""ArtifactCache under concurrent builders, corruption, crashed builders and unwritable roots."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import warnings
from pathlib import Path

import pytest

from _cache_workers import PAYLOAD, build_in_process, crash_mid_build, write_payload
from distpp import CacheError
from distpp.cache import MANIFEST, ArtifactCache, cache_key

KEY = cache_key(model="tiny", shape=[1, 4, 8, 8], dtype="float32")


def builds(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def assert_valid(folder: Path) -> None:
    assert (folder / "blob.bin").read_bytes() == PAYLOAD
    assert (folder / "meta.txt").read_text() == "ok"
    ArtifactCache(folder.parent.parent).validate(folder)


def leftovers(root: Path) -> list[str]:
    """Anything in the kind folder besides the artifact folders and lock files (temp folders)."""
    return sorted(p.name for p in (root / "blob").iterdir() if p.name.startswith(".tmp-"))


def test_concurrent_builders_in_processes(tmp_path):
    ctx = mp.get_context("spawn")
    n = 3  # each spawned process imports torch (seconds on 2 cores); 3 racers already contend for the lock
    log = tmp_path / "builds.log"
    barrier = ctx.Barrier(n)
    outs = [tmp_path / f"out{i}" for i in range(n)]
    procs = [ctx.Process(target=build_in_process, args=(str(tmp_path / "c"), KEY, str(log), barrier, str(o)))
             for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n
    assert builds(log) == 1, "the key's lock should let exactly one process build"
    folders = {o.read_text() for o in outs}
    assert len(folders) == 1
    assert_valid(Path(folders.pop()))
    assert leftovers(tmp_path / "c") == []


def test_concurrent_builders_in_threads(tmp_path):
    cache, log = ArtifactCache(tmp_path), tmp_path / "builds.log"
    other = cache_key(model="tiny", shape=[2, 4, 8, 8], dtype="float32")
    start = threading.Barrier(8)
    got, errors = [], []

    def worker(i):
        try:
            start.wait()
            key = KEY if i % 2 == 0 else other
            got.append((key, cache.get_or_build("blob", key, lambda d: write_payload(d, str(log), 0.2))))
        except BaseException as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert builds(log) == 2, "one build per key"
    for key in (KEY, other):
        folders = {f for k, f in got if k == key}
        assert folders == {cache.path("blob", key)}
        assert_valid(cache.path("blob", key))


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "delete", "manifest", "files_as_list", "files_empty",
                                    "size_not_a_dict", "sha_missing"])
def test_damaged_artifact_is_rebuilt_with_a_warning(tmp_path, damage):
    cache, log = ArtifactCache(tmp_path), tmp_path / "builds.log"
    folder = cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0))
    blob = folder / "blob.bin"
    if damage == "bitflip":
        data = bytearray(blob.read_bytes())
        data[len(data) // 3] ^= 0x10  # same size: only the sha256 catches it
        blob.write_bytes(bytes(data))
    elif damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:-100])
    elif damage == "delete":
        blob.unlink()
    elif damage == "manifest":
        (folder / MANIFEST).write_text("{not json")
    else:  # readable JSON of the wrong shape
        manifest = json.loads((folder / MANIFEST).read_text())
        size = blob.stat().st_size
        manifest["files"] = {"files_as_list": ["blob.bin"], "files_empty": {}, "size_not_a_dict": {"blob.bin": size},
                             "sha_missing": {"blob.bin": {"size": size}}}[damage]
        (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="rebuilding"):
        again = cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0))
    assert again == folder and builds(log) == 2
    assert_valid(again)


def test_size_only_verification_misses_a_bitflip_but_catches_truncation(tmp_path):
    """verify='size' trades the hash for speed: documented, and pinned here so a change is noticed."""
    cache, log = ArtifactCache(tmp_path, verify="size"), tmp_path / "builds.log"
    folder = cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0))
    blob = folder / "blob.bin"
    data = bytearray(blob.read_bytes())
    data[5] ^= 1
    blob.write_bytes(bytes(data))
    cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0))
    assert builds(log) == 1
    blob.write_bytes(bytes(data[:-1]))
    with pytest.warns(UserWarning, match="truncated"):
        cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0))
    assert builds(log) == 2


def test_validate_callback_rejection_triggers_one_rebuild(tmp_path):
    cache, log = ArtifactCache(tmp_path), tmp_path / "builds.log"
    cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0))
    seen = []

    def validate(folder):
        seen.append(folder)
        if len(seen) == 1:
            raise ValueError("engine built for another GPU")

    with pytest.warns(UserWarning, match="failed validation"):
        folder = cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0), validate=validate)
    assert builds(log) == 2 and len(seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0), validate=validate) == folder
    assert builds(log) == 2 and len(seen) == 2
    assert_valid(folder)


def test_crashed_builder_leaves_no_lasting_trace(tmp_path):
    """A builder killed mid-build (SIGKILL) holds no lock afterwards; its half-written temp folder is
    never taken for the artifact and is removed by the next build of that key."""
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    root = tmp_path / "c"
    p = ctx.Process(target=crash_mid_build, args=(str(root), KEY, started))
    p.start()
    assert started.wait(timeout=120)
    p.kill()
    p.join(timeout=30)
    assert len(leftovers(root)) == 1 and not ArtifactCache(root).path("blob", KEY).exists()
    cache, log = ArtifactCache(root), tmp_path / "builds.log"
    folder = cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0))
    assert builds(log) == 1
    assert_valid(folder)
    assert leftovers(root) == []


def test_stale_temp_folder_of_another_key_is_kept(tmp_path):
    """Cleanup matches the exact key: a key that merely starts with this key is another artifact."""
    cache, log = ArtifactCache(tmp_path), tmp_path / "builds.log"
    (tmp_path / "blob").mkdir()
    theirs = tmp_path / "blob" / ".tmp-model-v1-fp16-abcdefgh"
    theirs.mkdir()
    cache.get_or_build("blob", "model-v1", lambda d: write_payload(d, str(log), 0))
    assert theirs.exists()


def test_failing_build_leaves_nothing_and_is_retried(tmp_path):
    cache, log = ArtifactCache(tmp_path), tmp_path / "builds.log"

    def broken(folder):
        (folder / "blob.bin").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.get_or_build("blob", KEY, broken)
    assert not cache.path("blob", KEY).exists() and leftovers(tmp_path) == []
    with pytest.raises(CacheError, match="wrote no files"):
        cache.get_or_build("blob", KEY, lambda d: None)
    assert_valid(cache.get_or_build("blob", KEY, lambda d: write_payload(d, str(log), 0)))


@pytest.mark.parametrize("where", ["file_as_root", "file_as_kind"])
def test_unwritable_root_raises_cache_error(tmp_path, where):
    """Runs as root here, so permissions cannot make a folder unwritable: a regular file where the
    cache needs a folder gives the same OSError family (NotADirectory / FileExists)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    root = blocker / "cache" if where == "file_as_root" else tmp_path
    if where == "file_as_kind":
        (tmp_path / "blob").write_text("x")
    with pytest.raises(CacheError, match="cannot write the distpp cache.*DISTPP_CACHE"):
        ArtifactCache(root).get_or_build("blob", KEY, lambda d: write_payload(d, str(tmp_path / "l"), 0))


def test_bad_verify_mode_is_a_cache_error():
    with pytest.raises(CacheError, match="verify must be 'hash' or 'size'"):
        ArtifactCache("/nonexistent", verify="md5")
