"""Top-level functions the cache tests run in spawned processes (spawn pickles them by reference)."""

from __future__ import annotations

import os
import time
from pathlib import Path

PAYLOAD = bytes(range(256)) * 64  # 16 KiB, every byte value: a flipped bit anywhere changes the sha256


def write_payload(folder: Path, log: str, delay: float) -> None:
    """A build: log one line per build (O_APPEND: atomic across processes), then write the artifact."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(delay)  # long enough that every other builder reaches the lock while this one holds it
    (folder / "blob.bin").write_bytes(PAYLOAD)
    (folder / "meta.txt").write_text("ok")


def build_in_process(root: str, key: str, log: str, barrier, out: str) -> None:
    """Spawned builder: wait for the others, then get_or_build; write the folder it got to ``out``."""
    from distpp.cache import ArtifactCache

    barrier.wait(timeout=120)
    folder = ArtifactCache(root).get_or_build("blob", key, lambda d: write_payload(d, log, 0.5))
    Path(out).write_text(str(folder))


def crash_mid_build(root: str, key: str, started) -> None:
    """Spawned builder that writes half its artifact, signals, and hangs until it is killed."""
    from distpp.cache import ArtifactCache

    def build(folder: Path) -> None:
        (folder / "blob.bin").write_bytes(PAYLOAD[: len(PAYLOAD) // 2])
        started.set()
        time.sleep(600)

    ArtifactCache(root).get_or_build("blob", key, build)


def lock_stress(root: str, key: str, rounds: int) -> None:
    """Forked racer: build the key (failing if another builder is inside the build), discard it, repeat."""
    from distpp.cache import ArtifactCache

    cache, marker = ArtifactCache(root), Path(root) / "inside"

    def build(folder: Path) -> None:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError: two builders at once
        try:
            time.sleep(0.002)
            (folder / "blob.bin").write_bytes(PAYLOAD)
        finally:
            os.close(fd)
            os.unlink(marker)

    for _ in range(rounds):
        cache.get_or_build("blob", key, build)
        cache.discard("blob", key)
