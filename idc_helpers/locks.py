"""The package's one file lock: ``flock`` on a lock file, shared or exclusive, waiting or not.

Used by the decoded-patch cache (readers share an entry's lock, its writer and the pruner hold it alone), by
``train`` (one process writes a partial run) and by the Kaggle download (one process fills a work folder). A lock
held by a process that dies is released by the operating system, so a crash never leaves a stale lock behind and
no process table has to be asked. The holder of an exclusive lock may record its process id in the lock file, for
messages that name it (:func:`lock_holder`).

POSIX only (``fcntl``), as the rest of the package's file handling; on a file system without locks (some network
mounts) :func:`file_lock` yields ``None`` and the caller decides how to go on unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["file_lock", "lock_holder"]


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike[str],
    *,
    shared: bool = False,
    blocking: bool = True,
    record_pid: bool = False,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[bool | None]:
    """Hold a lock on the file ``path`` (created when missing) for the ``with`` block.

    Yields ``True`` while held; ``False`` when another process holds it and ``blocking`` is false (nothing is
    held); ``None`` when no lock can be had (a read-only folder without the lock file, a file system without
    locks). ``shared`` takes a reader's lock that other readers may share. ``on_wait`` is called once before
    blocking behind another holder (to say what is being waited for). ``record_pid`` writes this process's id into
    the lock file once the exclusive lock is held (:func:`lock_holder` reads it).

    A lock file deleted by another holder between our open and our lock guards nothing; the lock is then taken
    again on the file now at ``path``.
    """
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    fd, state = _acquire(Path(path), mode, blocking, on_wait)
    try:
        if state and record_pid and not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield state
    finally:
        if fd is not None:
            os.close(fd)


def lock_holder(path: str | os.PathLike[str]) -> int | None:
    """The process id that holds an exclusive lock on ``path`` right now (``0`` when it recorded none), or None.

    None also when the file is missing or the file system has no locks: nobody can be shown to hold it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else 0
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None


def _acquire(
    path: Path, mode: int, blocking: bool, on_wait: Callable[[], None] | None
) -> tuple[int | None, bool | None]:
    while True:
        fd = _open(path)
        if fd is None:
            return None, None
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    os.close(fd)
                    return None, False
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                fcntl.flock(fd, mode)
        except OSError:  # no locks on this file system
            os.close(fd)
            return None, None
        except BaseException:
            os.close(fd)
            raise
        try:
            now, ours = os.stat(path), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
                return fd, True
        except FileNotFoundError:
            pass
        os.close(fd)
