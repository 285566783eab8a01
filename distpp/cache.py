"""One atomic, keyed artifact cache for every on-disk artifact (ONNX files, engines, lab checkpoints).

Layout: ``<root>/<kind>/<key>/`` holds the artifact's files and a ``manifest.json`` (written last) with
the key's inputs and each file's size and sha256. A build writes into a private temporary folder in
``<root>/<kind>/`` and renames it into place; concurrent builders of one key serialize on a lock file,
and the loser of a race reuses the winner's folder. Loading validates the manifest (sizes always,
hashes unless ``verify="size"``); a corrupt or truncated artifact is removed and rebuilt with a warning.

Root: ``$DISTPP_CACHE`` or ``~/.cache/distpp``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import CacheError

MANIFEST = "manifest.json"
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def default_root() -> Path:
    return Path(os.environ.get("DISTPP_CACHE") or Path.home() / ".cache" / "distpp")


def cache_key(**parts: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``: every input that changes the artifact."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ArtifactCache:
    """Keyed artifacts under ``root``; see the module docstring."""

    def __init__(self, root: str | os.PathLike | None = None, verify: str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.verify = verify or os.environ.get("DISTPP_CACHE_VERIFY", "hash")
        if self.verify not in ("hash", "size"):
            raise CacheError(f"verify must be 'hash' or 'size', got {self.verify!r}")

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    @contextlib.contextmanager
    def _lock(self, kind: str, key: str):
        d = self.root / kind
        lock_path = str(d / f".{key}.lock")
        with _thread_locks_guard:
            tl = _thread_locks.setdefault(lock_path, threading.Lock())
        try:
            d.mkdir(parents=True, exist_ok=True)
            f = open(lock_path, "a+")
        except OSError as e:
            raise CacheError(f"cannot write the distpp cache at {d} ({e}); set DISTPP_CACHE or pass "
                             "ArtifactCache(root=...) to a writable folder") from e
        with tl, f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def validate(self, folder: Path) -> dict:
        """The manifest of a complete, intact artifact folder; raises CacheError otherwise."""
        mpath = folder / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{folder}: missing or unreadable manifest ({e})") from e
        if not isinstance(files, dict) or not files:
            raise CacheError(f"{folder}: malformed manifest (its 'files' must map each file to its size and sha256)")
        for name, meta in files.items():
            p = folder / name
            try:
                size, sha = int(meta["size"]), str(meta["sha256"])
            except (KeyError, TypeError, ValueError) as e:
                raise CacheError(f"{folder}: malformed manifest entry for {name!r} ({e!r})") from e
            if not p.is_file() or p.stat().st_size != size:
                raise CacheError(f"{p}: missing or truncated (expected {size} bytes)")
            if self.verify == "hash" and file_sha256(p) != sha:
                raise CacheError(f"{p}: content does not match its recorded sha256 (corrupt)")
        return manifest

    def load(self, kind: str, key: str) -> Path | None:
        """The folder of a valid cached artifact, or None (a corrupt one is removed, with a warning)."""
        folder = self.path(kind, key)
        if not folder.exists():
            return None
        try:
            self.validate(folder)
            return folder
        except CacheError as e:
            warnings.warn(f"distpp cache: {e}; rebuilding", stacklevel=2)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], Any], meta: dict | None = None,
                     validate: Callable[[Path], None] | None = None) -> Path:
        """The folder of artifact (kind, key), built by ``build(tmp_folder)`` if absent or corrupt.

        ``build`` writes its files into the folder it is given; ``validate(folder)`` (optional) may raise
        to reject a loaded artifact (it is then rebuilt once).
        """
        with self._lock(kind, key):
            folder = self.load(kind, key)
            if folder is not None and validate is not None:
                try:
                    validate(folder)
                except Exception as e:  # a semantically bad artifact: rebuild
                    warnings.warn(f"distpp cache: {folder} failed validation ({e}); rebuilding", stacklevel=2)
                    shutil.rmtree(folder, ignore_errors=True)
                    folder = None
            if folder is not None:
                return folder
            final = self.path(kind, key)
            # Under the key's lock no live builder owns a temp folder of this key: any left is from a
            # crashed builder (a killed process), and would otherwise stay on disk forever.
            # The full key and mkdtemp's 8-character suffix make the pattern match this key's folders only.
            for stale in final.parent.glob(f".tmp-{key}-" + "?" * 8):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
            try:
                build(tmp)
                files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                         for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
                if not files:
                    raise CacheError(f"building {kind}/{key[:12]} wrote no files")
                manifest = {"kind": kind, "key": key, "meta": meta or {}, "created": time.time(), "files": files}
                with open(tmp / MANIFEST, "w") as f:
                    json.dump(manifest, f, indent=1, default=str)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.rename(tmp, final)
                except OSError:
                    if self.load(kind, key) is None:  # a stale folder in the way: replace it
                        shutil.rmtree(final, ignore_errors=True)
                        os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return final
