"""Atomic writes and folder locks (latentsel/_io.py): a failed write names its target and leaves
no temporary file, a killed writer's temporary files are swept, two writers of a folder exclude
each other."""
import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentsel import _io
from latentsel._io import LOCK_NAME, atomic_open, atomic_path, locked_folder


_HOLD = ("import fcntl, os, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); "
         "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); sys.stdin.read()")


@contextlib.contextmanager
def another_run_holding(folder: Path):
    """Another process holding ``folder``'s lock (as a latentsel run does) for the block; yields
    its pid. It releases the lock, by exiting, when the block ends."""
    with subprocess.Popen([sys.executable, "-c", _HOLD, str(Path(folder) / LOCK_NAME)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline() == "locked\n"
        try:
            yield holder.pid
        finally:
            holder.stdin.close()


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("stage", ["write", "replace"])
def test_a_failed_write_names_the_target_and_leaves_no_temp_file(tmp_path, monkeypatch, stage):
    target = tmp_path / "fit.json"
    target.write_text("old")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_io.os, "fsync" if stage == "write" else "replace", no_space)
    with pytest.raises(OSError, match=f"^cannot write {target}: No space left on device$") as info, \
            atomic_open(target) as f:
        f.write("new")
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and _hidden(tmp_path) == []


def test_an_unwritable_folder_names_the_target(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"^cannot write {blocker / 'out.json'}: {blocker} is not a folder$"), \
            atomic_open(blocker / "out.json") as f:
        f.write("x")


def test_an_error_about_another_file_is_left_as_it_is(tmp_path):
    with pytest.raises(FileNotFoundError) as info, atomic_path(tmp_path / "out.json"):
        (tmp_path / "missing").read_text()
    assert info.value.filename == str(tmp_path / "missing") and _hidden(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_temp_files_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".fit.json.{_dead_pid()}.abcd1234.tmp"
    live = tmp_path / f".fit.json.{os.getpid()}.efgh5678.tmp"
    other = tmp_path / ".posterior.jsonl.1.abcd1234.tmp"  # another target's: not this write's to judge
    for p in (dead, live, other):
        p.write_text("partial")
    with atomic_open(tmp_path / "fit.json") as f:
        f.write("{}")
    assert _hidden(tmp_path) == sorted([live.name, other.name])


def test_pidless_temp_files_are_swept_once_an_hour_old(tmp_path):
    old, new = tmp_path / ".fit.json.abcd1234.tmp", tmp_path / ".fit.json.efgh5678.tmp"
    for p in (old, new):
        p.write_text("partial")
    hour_ago = old.stat().st_mtime - _io.STALE_AFTER_S - 1
    os.utime(old, (hour_ago, hour_ago))
    with atomic_open(tmp_path / "fit.json") as f:
        f.write("{}")
    assert _hidden(tmp_path) == [new.name]


def test_a_locked_folder_refuses_a_second_writer(tmp_path):
    busy = rf"^{tmp_path} is being written by another latentsel run \(pid {os.getpid()}\)$"
    # flock locks belong to an open file description: a second open conflicts even in one process
    with locked_folder(tmp_path), pytest.raises(BlockingIOError, match=busy), locked_folder(tmp_path):
        pass
    with locked_folder(tmp_path / "new"):  # released, and a missing folder is made
        assert (tmp_path / "new" / LOCK_NAME).read_text() == str(os.getpid())
    with locked_folder(tmp_path):
        pass
