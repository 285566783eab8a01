"""One atomic, keyed artifact cache for every on-disk artifact (ONNX files, engines, lab checkpoints).

Layout: ``<root>/<kind>/<key>/`` holds the artifact's files (a flat folder of regular files) and a
``manifest.json`` (written last) with the kind, the key, the key's inputs and each file's size and
sha256. ``kind`` and ``key`` are plain names (letters, digits, ``.``, ``_``, ``-``; no path or glob
characters), so nothing is ever created or matched outside ``<root>/<kind>/``.

Reads take no lock: a valid entry is used as it is (a read-only, prebuilt cache works). A build takes
the key's lock (flock on ``.<key>.lock``, removed again on release), writes into a private temporary
folder in ``<root>/<kind>/`` and renames it into place; the loser of a race reuses the winner's folder.
Validation checks the manifest against the folder (every file listed and nothing else, names inside
the entry, this kind and key, sizes always, hashes unless ``verify="size"``). A bad entry is removed
under the lock by renaming it aside first (readers see the whole entry or none) and rebuilt with a
warning. Links are never followed out of the root: an entry, or a file in one, that is a symbolic link
is a bad entry; a ``<kind>`` folder that is a link is a CacheError.

Root: ``$DISTPP_CACHE`` or ``~/.cache/distpp``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import CacheError

MANIFEST = "manifest.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def default_root() -> Path:
    return Path(os.environ.get("DISTPP_CACHE") or Path.home() / ".cache" / "distpp")


def cache_key(**parts: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``: every input that changes the artifact."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22, follow_symlinks: bool = True) -> str:
    """sha256 (hex) of a file's bytes, read in chunks; OSError for a link when ``follow_symlinks`` is False."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW))
    with os.fdopen(fd, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_name(what: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CacheError(f"cache {what} {name!r} is not a valid name: pass 1 to 128 letters, digits, '.', '_' or "
                         "'-', starting with a letter or digit (no '/', '..' or glob characters)")
    return name


def _write_error(path: Path, e: OSError) -> CacheError:
    hint = "free disk space or point" if e.errno in _DISK_FULL else "point"
    return CacheError(f"cannot write the distpp cache at {path}: {e.strerror or e}; {hint} DISTPP_CACHE or "
                      "ArtifactCache(root=...) at a writable folder with room for the artifact")


class ArtifactCache:
    """Keyed artifacts under ``root``; see the module docstring."""

    def __init__(self, root: str | os.PathLike | None = None, verify: str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.verify = verify or os.environ.get("DISTPP_CACHE_VERIFY", "hash")
        if self.verify not in ("hash", "size"):
            raise CacheError(f"verify must be 'hash' or 'size', got {self.verify!r}")

    def path(self, kind: str, key: str) -> Path:
        return self.root / _check_name("kind", kind) / _check_name("key", key)

    def _kind_dir(self, kind: str) -> Path:
        d = self.root / _check_name("kind", kind)
        if d.is_symlink():
            raise CacheError(f"{d} is a symbolic link (to {os.readlink(d)}); distpp keeps artifacts in real folders "
                             f"under its root and does not follow links out of it: remove the link, or set "
                             "DISTPP_CACHE to the folder it points to")
        return d

    # ---- locking -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, kind: str, key: str):
        """The key's lock: a thread lock, then flock on ``<root>/<kind>/.<key>.lock``.

        The lock file is removed on release, while still locked. A process that was waiting on the
        removed file then finds the path gone (or holding another inode) and retries on the current
        file, so two holders never coexist, and no lock file outlives its use.
        """
        d = self._kind_dir(kind)
        lock_path = d / f".{_check_name('key', key)}.lock"
        with _thread_locks_guard:
            tl = _thread_locks.setdefault(str(lock_path), threading.Lock())
        with tl:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise _write_error(d, e) from e
            fd = self._acquire(lock_path)
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
                os.close(fd)  # releases the flock

    @staticmethod
    def _acquire(lock_path: Path) -> int:
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise _write_error(lock_path.parent, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = os.fstat(fd)
                try:
                    current = os.stat(lock_path)
                except FileNotFoundError:
                    current = None
            except BaseException:
                os.close(fd)
                raise
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # the holder before us removed this file: lock the one now at the path

    # ---- validation ----------------------------------------------------------------------------------
    def validate(self, folder: Path) -> dict:
        """The manifest of a complete, intact artifact folder ``<root>/<kind>/<key>``; CacheError otherwise."""
        folder = Path(folder)
        return self._check(folder, folder.parent.name, folder.name, self._manifest_bytes(folder))

    @staticmethod
    def _manifest_bytes(folder: Path) -> bytes | None:
        """The manifest's bytes, or None (no entry, an entry that is a link, or no readable manifest)."""
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return None
            fd = os.open(folder / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except OSError:
            return None

    def _check(self, folder: Path, kind: str, key: str, raw: bytes | None) -> dict:
        if folder.is_symlink():
            raise CacheError(f"{folder} is a symbolic link (to {os.readlink(folder)}); distpp does not follow links "
                             "out of its cache root")
        if raw is None:
            raise CacheError(f"{folder}: missing or unreadable manifest")
        try:
            manifest = json.loads(raw)
            files = manifest["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{folder}: unreadable manifest ({e})") from e
        if not isinstance(files, dict) or not files:
            raise CacheError(f"{folder}: malformed manifest (its 'files' must map each file to its size and sha256)")
        if (manifest.get("kind"), manifest.get("key")) != (kind, key):
            raise CacheError(f"{folder}: the manifest belongs to {manifest.get('kind')!r}/{manifest.get('key')!r}, "
                             f"not to {kind!r}/{key!r}")
        bad = [n for n in files if n in (".", "..", MANIFEST) or os.path.basename(n) != n or "\0" in n]
        if bad:
            raise CacheError(f"{folder}: the manifest lists {bad[0]!r}, which is not a file name inside the entry")
        present = set(os.listdir(folder)) - {MANIFEST}
        if present != set(files):
            raise CacheError(f"{folder}: the manifest lists {sorted(files)} but the folder holds {sorted(present)}")
        for name, meta in files.items():
            p = folder / name
            try:
                size, sha = int(meta["size"]), str(meta["sha256"])
            except (KeyError, TypeError, ValueError) as e:
                raise CacheError(f"{folder}: malformed manifest entry for {name!r} ({e!r})") from e
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                raise CacheError(f"{p}: not a regular file (a link or folder); an entry holds only its own files")
            if st.st_size != size:
                raise CacheError(f"{p}: missing or truncated (expected {size} bytes, found {st.st_size})")
            if self.verify == "hash" and file_sha256(p, follow_symlinks=False) != sha:
                raise CacheError(f"{p}: content does not match its recorded sha256 (corrupt)")
        return manifest

    def _verdict(self, folder: Path, validate: Callable[[Path], None] | None) -> tuple[str | None, bytes | None]:
        """Look at an entry without the lock: (None, manifest) when valid, ("", None) when there is
        none, (reason, manifest or None) when it is there but bad."""
        try:
            os.lstat(folder)
        except OSError:  # ENOENT, or ENOTDIR when the kind folder is a file
            return "", None
        raw = self._manifest_bytes(folder)
        try:
            self._check(folder, folder.parent.name, folder.name, raw)
        except (CacheError, OSError) as e:
            return f"{e}", raw
        if validate is not None:
            try:
                validate(folder)
            except Exception as e:  # a semantically bad artifact: rebuild
                return f"{folder} failed validation ({e})", raw
        return None, raw

    def _lookup_locked(self, folder: Path, validate, seen: tuple[str | None, bytes | None]) -> Path | None:
        """Under the key's lock: the valid entry, or None after moving a bad one aside (with a warning).

        ``seen`` is the lock-free verdict; it stands while the manifest is unchanged (so the validate
        callback runs once per call), otherwise the entry is looked at again.
        """
        reason, raw = seen
        if self._manifest_bytes(folder) != raw:  # replaced since: another process built or removed it
            reason, raw = self._verdict(folder, validate)
        if reason is None:
            return folder
        if reason:
            warnings.warn(f"distpp cache: {reason}; rebuilding", stacklevel=3)
            self._discard_locked(folder)
        return None

    # ---- removal -------------------------------------------------------------------------------------
    @staticmethod
    def _discard_locked(folder: Path) -> bool:
        """Rename the entry aside (one atomic step), then delete the renamed copy."""
        trash = folder.parent / f".trash-{folder.name}-{secrets.token_hex(4)}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise CacheError(f"cannot remove the cache entry {folder} ({e}); delete it by hand") from e
        _remove(trash)
        return True

    def discard(self, kind: str, key: str) -> bool:
        """Remove artifact (kind, key) under its lock; True when there was one."""
        folder = self.path(kind, key)
        if not (folder.exists() or folder.is_symlink()):
            return False
        with self._lock(kind, key):
            return self._discard_locked(folder)

    # ---- lookup and build ----------------------------------------------------------------------------
    def load(self, kind: str, key: str) -> Path | None:
        """The folder of a valid cached artifact, or None (a bad one is removed, with a warning)."""
        folder = self.path(kind, key)
        self._kind_dir(kind)
        seen = self._verdict(folder, None)
        if not seen[0]:
            return folder if seen[0] is None else None
        try:
            with self._lock(kind, key):
                return self._lookup_locked(folder, None, seen)
        except CacheError as e:  # a read-only cache: the bad entry stays; report it and miss
            warnings.warn(f"distpp cache: {seen[0]}; cannot remove it ({e})", stacklevel=2)
            return None

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], Any], meta: dict | None = None,
                     validate: Callable[[Path], None] | None = None) -> Path:
        """The folder of artifact (kind, key), built by ``build(tmp_folder)`` if absent or bad.

        ``build`` writes regular files into the folder it is given; ``validate(folder)`` (optional) may
        raise to reject a loaded artifact (it is then rebuilt once). A valid entry is returned without
        taking the lock or writing anything.
        """
        final = self.path(kind, key)
        self._kind_dir(kind)
        seen = self._verdict(final, validate)
        if seen[0] is None:
            return final
        with self._lock(kind, key):
            folder = self._lookup_locked(final, validate, seen)
            if folder is not None:
                return folder
            # Under the key's lock no live builder owns a temp folder of this key: any left is from a
            # crashed builder (a killed process), and would otherwise stay on disk forever. The key is a
            # validated name (no glob characters) and the suffix has exactly 8 characters, so the
            # pattern matches this key's folders only.
            for prefix in (".tmp-", ".trash-"):
                for stale in final.parent.glob(f"{prefix}{key}-" + "?" * 8):
                    _remove(stale)
            return self._build(kind, key, final, build, meta)

    def _build(self, kind: str, key: str, final: Path, build: Callable[[Path], Any], meta: dict | None) -> Path:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
        except OSError as e:
            raise _write_error(final.parent, e) from e
        try:
            try:
                build(tmp)
            except OSError as e:
                if e.errno in _DISK_FULL:
                    raise _write_error(tmp, e) from e
                raise
            files = {}
            for entry in sorted(os.scandir(tmp), key=lambda en: en.name):
                if entry.name == MANIFEST:
                    continue
                if not entry.is_file(follow_symlinks=False):
                    raise CacheError(f"building {kind}/{key[:12]} wrote {entry.name!r}, which is not a regular file "
                                     "(a folder or link); an artifact is a flat folder of files")
                files[entry.name] = {"size": entry.stat(follow_symlinks=False).st_size,
                                     "sha256": file_sha256(entry.path)}
            if not files:
                raise CacheError(f"building {kind}/{key[:12]} wrote no files")
            manifest = {"kind": kind, "key": key, "meta": meta or {}, "created": time.time(), "files": files}
            try:
                with open(tmp / MANIFEST, "w") as f:
                    json.dump(manifest, f, indent=1, default=str)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, final)  # under the lock, after _lookup_locked: nothing is in the way
            except OSError as e:
                raise _write_error(tmp, e) from e
        finally:
            _remove(tmp)
        return final


def _remove(path: Path) -> None:
    """Delete a link itself or a folder tree (rmtree never follows links inside it); gone is fine."""
    if path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
