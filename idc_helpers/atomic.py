"""Atomic outputs: a file or folder is either the old one or the complete new one, never half written.

- :func:`atomic_path`: write a file under a temporary name beside the target, flush it to disk, rename it onto
  the target.
- :func:`publish_dir`: build a folder under a hidden temporary name beside the target, then rename it into place;
  with ``replace=True`` an existing folder is swapped out so that a kill at any moment leaves either the old or the
  new folder at the target (:func:`recover_dir` puts an old copy back after a kill between the two renames).
- :func:`check_out_file` and :func:`output_failed`: an output file named on the command line is checked before any
  work (not a folder, its folder writable), and a write that fails anyway becomes one line that names it.

Temporary files and folders are created with the ordinary mode (``0o666``/``0o777``) so the kernel applies the
process umask itself: the umask is never read by changing it, which would race with other threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from idc_helpers.errors import DiskFullError, IdcError, UserError, is_disk_full

_OLD_SUFFIX = ".old"


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; folders cannot be opened for that on Windows."""
    if os.name == "nt":
        if directory:
            return
        flags = os.O_RDWR
    else:
        flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temporary_file(folder: Path, prefix: str, suffix: str) -> Path:
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            # O_EXCL: never reuse a name; mode 0o666 so the umask decides the permissions, as for any new file.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"could not create a temporary file in {folder}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is flushed to disk and renamed onto ``target``.

    The temporary file lives in the same folder so that the final ``os.replace`` is atomic; the folder is flushed
    after the rename so that the new name survives a power cut too. On an exception the temporary file is
    removed and ``target`` is left as it was. The file gets the permissions of any new file (``0o666`` less the
    umask).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary_file(
        target.parent, f".{target.name}.", suffix if suffix is not None else target.suffix + ".tmp"
    )
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_path(target.parent, directory=True)


def old_copy_path(target: str | os.PathLike[str]) -> Path:
    """Where :func:`install_dir` keeps the previous folder during a swap: ``.<name>.old`` beside ``target``."""
    target = Path(target)
    return target.parent / f".{target.name}{_OLD_SUFFIX}"


def recover_dir(target: str | os.PathLike[str]) -> str | None:
    """Finish a folder swap that a kill interrupted. Returns what was done (``"restored"``, ``"removed"``) or None.

    Killed between the two renames: the target is missing and its old copy sits aside, so the old copy is put
    back. Killed after both: the new folder is in place and the old copy is deleted.
    """
    target = Path(target)
    aside = old_copy_path(target)
    if not aside.exists():
        return None
    if not target.exists():
        os.rename(aside, target)
        return "restored"
    shutil.rmtree(aside)
    return "removed"


def install_dir(src: str | os.PathLike[str], target: str | os.PathLike[str], *, replace: bool = False) -> Path:
    """Rename the finished folder ``src`` onto ``target`` (same file system) and return ``target``.

    ``target`` may be missing or an empty folder. An existing folder with content raises ``FileExistsError``
    unless ``replace``: then it is renamed aside (:func:`old_copy_path`), ``src`` is renamed in, and the old one is
    deleted; a kill at any moment leaves the old or the new folder at ``target`` (or the old one aside, which
    :func:`recover_dir`, run first here, puts back).
    """
    src, target = Path(src), Path(target)
    recover_dir(target)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # rename onto an empty directory is not portable
    if not target.exists() and not target.is_symlink():
        os.rename(src, target)
    elif not replace:
        raise FileExistsError(f"{target} already exists and is not empty")
    else:
        aside = old_copy_path(target)
        os.rename(target, aside)
        try:
            os.rename(src, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside)
    _fsync_path(target.parent, directory=True)
    return target


@contextlib.contextmanager
def publish_dir(target: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield a new, empty hidden folder beside ``target`` to build in; on success it becomes ``target``.

    The folder is ``.<name>.<random>.partial`` in ``target``'s parent, created with the ordinary permissions.
    When the block finishes, :func:`install_dir` renames it onto ``target`` (``replace`` as there); when the block
    raises (or the install does), the folder is removed and ``target`` is as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.partial"
        try:
            tmp.mkdir()  # mode 0o777 less the umask, like any new folder
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary folder beside {target}")
    try:
        yield tmp
        install_dir(tmp, target, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to ``target`` atomically and return the path."""
    return write_text(target, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy scalars and paths turn up in configs and metrics.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class OutputPathError(UserError, OSError):
    """An output (``--out``) names something that cannot be written: a folder, a read-only place."""


def existing_parent(path: str | os.PathLike[str]) -> Path:
    """The nearest folder above ``path`` that exists (or a file in its place): where its missing folders would start."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_out_file(out: str | os.PathLike[str], option: str = "--out") -> Path:
    """Return ``out`` as a Path after checking, before any work, that a file can be written there.

    Raises :class:`OutputPathError` (its message starts with ``option``) when ``out`` is a folder or the nearest
    existing folder above it is a file or cannot be written; missing folders are fine, they are made on writing.
    """
    path = Path(out)
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file name inside it, e.g. {path / 'out.json'}")
    parent = existing_parent(path)
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is a file, not a folder; choose another place")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"{option} {path}: cannot write into {parent} (read-only or not yours); choose a folder you can write to"
        )
    return path


def output_failed(out: str | os.PathLike[str], exc: OSError, option: str = "--out") -> IdcError:
    """The error to raise for an output that could not be written.

    A full disk is a :class:`~idc_helpers.errors.DiskFullError` (exit status 3; nothing half-written is left, the
    outputs being atomic); anything else an :class:`OutputPathError` (exit status 2).
    """
    if is_disk_full(exc):
        return DiskFullError(
            f"{option} {out}: the disk is full; nothing was written. Free some space and run the command again."
        )
    return OutputPathError(f"{option} {out}: {exc.strerror or exc}")
