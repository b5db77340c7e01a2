"""Atomic file writes: a reader never sees a half-written output.

A write goes to a hidden temporary file beside its target, ``.NAME.PID.XXXXXXXX.tmp`` (PID:
the writing process), renamed onto the target when complete. A run killed mid-write leaves
its temporary file behind; the next write of the same target removes it once it is stale:
its process is gone (no process on this machine has its PID), or, for the names without a
PID that earlier versions made, it is older than :data:`STALE_AFTER_S`. A temporary file
whose process is alive is never removed. PIDs are looked up on this machine: processes on
other machines writing one target in a shared folder are not supported (one of them would
fail with ``cannot write``, neither would write a mixed file).

Several files written as a set (a fit's) are written under :func:`locked_folder`, and the
last one written lists the others with :func:`digest`, so that a reader can tell a
complete set from a mixed one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import os
import re
import tempfile
import time
from pathlib import Path

__all__ = ["FILE_MODE", "LOCK_NAME", "STALE_AFTER_S", "atomic_open", "atomic_path", "digest", "discard", "locked_folder"]

# mkstemp creates files 0600; outputs get the mode an ordinary open() would give them
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

STALE_AFTER_S = 3600.0
"""Age (seconds since the last change) past which a temporary file without a PID is stale."""

LOCK_NAME = ".latentsel.lock"
"""The lock file :func:`locked_folder` keeps in the folder it locks."""

_PID_TMP = re.compile(r"(\d+)\.[a-z0-9_]+\.tmp")  # what follows ".NAME." in this version's names
_OLD_TMP = re.compile(r"[a-z0-9_]+\.tmp")  # ... and in the PID-less names of earlier versions


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        return True
    return True


def _sweep_stale(path: Path) -> None:
    """Remove the stale temporary files of ``path`` (see the module's docstring)."""
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        rest = entry.name[len(prefix):]
        try:
            if (m := _PID_TMP.fullmatch(rest)) is not None:
                stale = not _alive(int(m.group(1)))
            elif _OLD_TMP.fullmatch(rest) is not None:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            else:
                continue
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:  # gone already, or not ours to remove: the write itself goes on
            pass


def _cannot_write(path: Path, e: OSError) -> OSError:
    """``e`` as ``OSError: cannot write PATH: REASON``, its errno kept; REASON names the folder
    in the way when it is one of ``path``'s."""
    reason = e.strerror or str(e)
    if e.filename is not None and Path(e.filename) in path.parents:
        above = Path(e.filename)
        while not above.exists() and above != above.parent:
            above = above.parent
        reason = f"{above} is not a folder" if above.exists() and not above.is_dir() else f"{reason} ({e.filename})"
    err = OSError(f"cannot write {path}: {reason}")
    err.errno, err._target = e.errno, str(path)
    return err


def _of_the_write(e: OSError, path: Path, tmp: str | None) -> bool:
    """Whether ``e`` is about writing ``path``: it names no file, or a temporary file of
    ``path``, ``path`` or a folder above it (and was not reported as another target's already)."""
    if hasattr(e, "_target"):
        return False
    name = e.filename
    if name is None or name == tmp:
        return True
    if not isinstance(name, str):
        return False
    name = Path(name)
    return name in (path, *path.parents) or (name.parent == path.parent and name.name.startswith(f".{path.name}."))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary file name in the folder of ``path``, for writers that take a file name: the
    file is renamed onto ``path`` when the block ends normally and removed when it raises.

    An ``OSError`` of the write (no space, no permission, a read-only file system, the
    temporary file's own) is raised as ``cannot write PATH: REASON``; one that names another
    file passes as it is. Stale temporary files of ``path`` are removed first."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and _of_the_write(e, path, tmp):
            raise _cannot_write(path, e) from e
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8"):
    """Open ``path`` for writing through a temporary file in the same folder, renamed into
    place on success and removed on failure (:func:`atomic_path`). A ``.gz`` suffix writes gzip."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes only ('w' or 'wb'), got mode={mode!r}")
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        # the header names the target, not the temporary file: the same content, the same bytes
        stream = (gzip.GzipFile(filename=Path(path).name[:-3], fileobj=raw, mode="wb", mtime=0)
                  if Path(path).suffix == ".gz" else raw)
        try:
            if mode == "w":
                text = io.TextIOWrapper(stream, encoding=encoding, newline="\n")
                yield text
                text.flush()
                text.detach()
            else:
                yield stream
        finally:
            if stream is not raw:
                stream.close()
        raw.flush()
        os.fsync(raw.fileno())


@contextlib.contextmanager
def locked_folder(path: str | os.PathLike):
    """Hold an exclusive lock on the folder ``path`` (made if missing) for the block: an advisory
    ``flock`` on its ``.latentsel.lock``, which records the holder's PID. A second holder, in this
    process or another, fails at once with ``BlockingIOError``: ``PATH is being written by another
    latentsel run (pid N)``. The lock goes with the block, or with its process if killed; the
    lock file stays (removing it would let a third writer lock a file the second one no longer
    sees), except that a folder the block made and that holds nothing but the lock when the
    block raises is removed, so a failed run leaves no empty output folder."""
    path = Path(path)
    lock = path / LOCK_NAME
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as e:
        raise _cannot_write(lock, e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise BlockingIOError(f"{path} is being written by another latentsel run (pid {holder})") from None
        try:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
            except OSError as e:  # a full disk: named, and cleaned up below like any failure
                raise _cannot_write(lock, e) from e
            yield path
        except BaseException:
            if created:  # a folder this block made and left empty but for its lock goes with it
                with contextlib.suppress(OSError):
                    if os.listdir(path) == [LOCK_NAME]:
                        os.unlink(lock)
                        os.rmdir(path)
            raise
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases its lock


def discard(path: str | os.PathLike) -> None:
    """Remove ``path`` if it exists, and the temporary files dead writers of it left."""
    path = Path(path)
    _sweep_stale(path)
    path.unlink(missing_ok=True)


def digest(data: bytes) -> dict:
    """``{"size", "sha256"}`` of a file whose content is ``data``: what the last file of a set
    records of the others."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
