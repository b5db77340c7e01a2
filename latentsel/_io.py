"""Atomic file writes: a reader never sees a half-written output."""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import tempfile
from pathlib import Path

# mkstemp creates files 0600; outputs get the mode an ordinary open() would give them
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary file name in the folder of ``path``, for writers that take a file name: the
    file is renamed onto ``path`` when the block ends normally and removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8"):
    """Open ``path`` for writing through a temporary file in the same folder, renamed into
    place on success and removed on failure. A ``.gz`` suffix writes gzip."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes only ('w' or 'wb'), got mode={mode!r}")
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if Path(path).suffix == ".gz" else raw
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
