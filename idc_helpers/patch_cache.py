"""The decoded-patch cache: one ``.npy`` file of decoded patches per list of patch files, shared by processes.

A cache entry (``patches-<key>.npy`` with ``.json`` metadata and ``.stats``) is named by a hash of the rows'
paths (plus :data:`CACHE_FORMAT`) and stores each file's size and modification time as read while decoding; it is
used only when every file still has them, so a changed, added or removed file means decoding again. The cache lives
in ``$IDC_CACHE_DIR`` or ``~/.cache/idc_helpers`` (:func:`default_cache_dir`); nothing is ever written into the
data folder. :func:`write_entry` decodes (:func:`idc_helpers.decode.decode_all`) straight into the entry's file, so
even the full dataset (2.1 GB as uint8) never sits in memory twice.

Several processes may share a cache folder. Each entry has a lock file (``patches-<key>.lock``,
:func:`idc_helpers.locks.file_lock`): readers hold it shared while they open the entry, the one writer holds it
exclusively while it decodes, so a second process asking for the same entry waits and then reads what the first
wrote instead of decoding it again. The writer maps its finished file before renaming it into place, so it never
reopens a name that someone else may replace. A writer decodes into ``.patches-<key>.npy.<pid>.tmp``; a writer that
was killed leaves that file behind, and the next load or :func:`prune_cache` removes it (it can tell, because the
dead writer's lock is free).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from idc_helpers import PATCH_SIZE, __version__
from idc_helpers.atomic import atomic_path, write_json
from idc_helpers.decode import PATCH_SHAPE, ROW_BYTES, Failures, PatchReadError, decode_all, file_sink, keep_mask
from idc_helpers.disk import format_bytes, free_bytes
from idc_helpers.errors import ExternalError, UserError
from idc_helpers.locks import file_lock
from idc_helpers.validation import user_path

# Bump when decoding (padding, colour handling) or the cache layout changes: old cache files then stop matching.
CACHE_FORMAT = 1
_CACHE_PREFIX = "patches-"
_STATS_SUFFIX = ".stats"  # (N, 2) int64 size and mtime_ns of each row's file, in .npy format
_LOCK_SUFFIX = ".lock"
# Temporary files of an entry: the writer's ``.patches-<key>.npy.<pid>[.compact].tmp`` and the small metadata
# files' ``.patches-<key>.<json|stats>.<random>.tmp``.
_TEMP_RE = re.compile(r"^\.patches-(?P<key>[0-9a-f]{32})\.(?:npy\.(?P<pid>\d+)\.(?:compact\.)?|(?:json|stats)\.).*tmp$")
# Where locks do not work (some network file systems), a temporary file untouched this long has no live writer.
_ORPHAN_SECONDS = 6 * 3600

_log = logging.getLogger(__name__)


class CacheError(UserError, OSError):
    """The decoded-patch cache folder cannot be used (not writable, not a folder, inside the dataset)."""


class CacheSpaceError(ExternalError, OSError):
    """The disk of the cache folder has no room for the decoded patches; the message says how much is needed."""


def default_cache_dir() -> Path:
    """The decoded-patch cache folder: ``$IDC_CACHE_DIR`` if set, else ``~/.cache/idc_helpers``."""
    env = os.environ.get("IDC_CACHE_DIR")
    return user_path(env, "IDC_CACHE_DIR") if env else user_path("~/.cache/idc_helpers", "the default cache folder")


def entry_path(cache_dir: Path, paths: list[str]) -> Path:
    """The ``.npy`` of the entry in ``cache_dir`` for this list of patch files (in row order) and this format."""
    return cache_dir / f"{_CACHE_PREFIX}{_entry_key(paths)}.npy"


def refuse_cache_inside_data(cache_dir: Path, paths: list[str]) -> None:
    """Raise :class:`CacheError` when ``cache_dir`` lies inside a dataset folder that ``paths`` come from."""
    # Kaggle layout <root>/<patient>/<0|1>/<file>: a dataset root is three levels above a patch. Several folders
    # may be loaded at once; the split of each path costs well under a microsecond, so all are checked.
    roots = {
        parts[0]
        for parts in (path.rsplit(os.sep, 3) for path in paths)
        if len(parts) == 4 and parts[2] in ("0", "1") and parts[1].isascii() and parts[1].isdigit()
    }
    for root in roots:
        data_root = Path(root or os.sep).absolute()
        if cache_dir == data_root or data_root in cache_dir.parents:
            raise CacheError(
                f"The cache folder {cache_dir} is inside the dataset folder {data_root}; the source data is never "
                "written to. Choose a cache folder elsewhere (--cache-dir or IDC_CACHE_DIR; cache_dir= in Python)."
            )


def make_cache_folder(cache_dir: Path) -> None:
    """Create ``cache_dir`` when missing; ``OSError`` when it cannot be made or written (even by root)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(cache_dir, os.W_OK | os.X_OK):  # also a read-only file system, even for root
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def open_entry(npy: Path, paths: list[str]) -> tuple[np.ndarray, Failures] | None:
    """The entry's images (a read-only ``(k, 50, 50, 3) uint8`` memmap) and failures, or ``None``.

    ``None`` when the entry is absent, incomplete, or any file's size or mtime changed since it was written. Read
    under the entry's shared lock, so that a process writing the entry is waited for.
    """
    if not npy.is_file() and not npy.with_suffix(_LOCK_SUFFIX).exists():
        return None  # never written, nobody writing: no lock file to make
    with _entry_lock(npy, shared=True):
        return _open_cache(npy, paths)


def write_entry(npy: Path, paths: list[str], workers: int, progress: bool) -> tuple[np.ndarray, Failures, bool]:
    """Decode ``paths`` into the entry ``npy`` under its exclusive lock; returns ``(images, failures, written)``.

    ``images`` are mapped from the entry's file (the rows that decoded, in order), ``failures`` the rows that did
    not. ``written`` is false when another process wrote the entry meanwhile and it was read instead. Raises
    :class:`CacheSpaceError` when the disk is too full, :class:`CacheError` when the folder cannot be written.
    """
    with _entry_lock(npy) as held:
        cached = _open_cache(npy, paths)
        if cached is not None:
            return *cached, False
        if held:  # nobody else can be writing this entry: its temporary files are a killed writer's
            for path, _ in _temp_files(npy.parent, key=npy.stem[len(_CACHE_PREFIX) :]):
                path.unlink(missing_ok=True)
        try:
            images, failures = _write_cache(npy, paths, workers, progress)
        except BaseException:
            if held and not npy.exists():  # nothing written (a full disk, Ctrl-C): no lock file stays behind
                npy.with_suffix(_LOCK_SUFFIX).unlink(missing_ok=True)
            raise
    return images, failures, True


def mark_used(npy: Path) -> None:
    """Record that the entry ``npy`` was used now (its metadata's mtime), for :func:`prune_cache`."""
    with contextlib.suppress(OSError):  # a read-only cache folder is fine
        os.utime(npy.with_suffix(".json"))


def prune_cache(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int | None = None,
    keep: Path | None = None,
) -> int:
    """Delete leftovers of interrupted loads and the least recently used entries; returns the bytes freed.

    Entries are deleted, oldest use first, until the rest take at most ``max_bytes``. Every distinct index (another
    subset of patients, another seed's sample) gets its own entry of 7.5 kB per patch, so experiments on the full
    dataset would otherwise fill the disk 2 GB at a time. ``max_bytes`` defaults to ``$IDC_CACHE_MAX_GB`` (in GB)
    or 20 GB. ``keep`` (an entry's ``.npy``) is never deleted, nor is an entry
    that another process is writing or opening at that moment; the files of a write in progress count towards the
    budget. Runs after each new entry is written; an entry in use elsewhere stays readable where it is mapped
    (POSIX unlink semantics).
    """
    folder = user_path(cache_dir, "the cache folder") if cache_dir is not None else default_cache_dir()
    if max_bytes is None:
        max_bytes = int(float(os.environ.get("IDC_CACHE_MAX_GB", "20")) * 1e9)
    freed = remove_orphans(folder)
    entries, in_progress = _cache_entries(folder)
    total = in_progress + sum(size for _, size, _ in entries)
    for _, size, npy in sorted(entries):  # oldest first
        if total <= max_bytes:
            break
        if keep is not None and npy == keep:
            continue
        if _delete_entry(npy):
            total -= size
            freed += size
    return freed


def remove_orphans(cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete the temporary files that killed or crashed loads left in ``cache_dir``; returns the bytes freed.

    A temporary file is an orphan when no process holds its entry's lock (a writer's lock ends with the writer,
    however it ends); where locks do not work, when its writer's pid is gone or it has not changed for 6 hours.
    Files of a write in progress are left alone.
    """
    folder = user_path(cache_dir, "the cache folder") if cache_dir is not None else default_cache_dir()
    by_key: dict[str, list[tuple[Path, re.Match]]] = {}
    for path, match in _temp_files(folder):
        by_key.setdefault(match["key"], []).append((path, match))
    freed = 0
    for key, temps in by_key.items():
        with _entry_lock(folder / f"{_CACHE_PREFIX}{key}.npy", blocking=False) as held:
            if held is False:
                continue  # a live writer
            for path, match in temps:
                if held or _writer_gone(path, match):
                    size = _size_or_zero(path)
                    try:
                        path.unlink(missing_ok=True)
                    except OSError:  # a read-only cache folder: nothing to be done here
                        continue
                    freed += size
    return freed


def clear_cache(cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete this package's cache files (and leftovers of interrupted loads) from ``cache_dir``; returns how many.

    Only files named like the loader's own are touched; other files in the folder are left alone.
    """
    folder = user_path(cache_dir, "the cache folder") if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        name = entry.name
        ours = name.startswith(_CACHE_PREFIX) and name.endswith((".npy", ".json", _STATS_SUFFIX, _LOCK_SUFFIX))
        leftover = name.startswith("." + _CACHE_PREFIX) and name.endswith(".tmp")
        if entry.is_file() and (ours or leftover):
            entry.unlink()
            removed += 1
    return removed


def _entry_key(paths: list[str]) -> str:
    """Names the cache entry of this list of paths (in row order) and this cache format."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"idc_helpers patches format {CACHE_FORMAT} size {PATCH_SIZE}\n".encode())
    digest.update("\0".join(paths).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _file_stats(paths: list[str]) -> np.ndarray:
    """``(N, 2) int64`` (size, mtime_ns) of each file now; -1 for a file that cannot be stat'ed."""
    # One stat per file is the whole cost of a cached reload (a few microseconds each), so keep the loop bare.
    stat_ = os.stat
    try:
        stats = [stat_(p) for p in paths]
    except OSError:
        stats = [_stat_or_none(p) for p in paths]
    out = np.empty((len(paths), 2), np.int64)
    out[:, 0] = np.fromiter((s.st_size if s is not None else -1 for s in stats), np.int64, len(paths))
    out[:, 1] = np.fromiter((s.st_mtime_ns if s is not None else -1 for s in stats), np.int64, len(paths))
    return out


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _open_cache(npy: Path, paths: list[str]) -> tuple[np.ndarray, Failures] | None:
    """The cached images and failures, or ``None`` when absent, incomplete, or any file's size or mtime changed."""
    n = len(paths)
    try:
        if not npy.is_file():
            return None
        meta = json.loads(npy.with_suffix(".json").read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT or meta.get("rows") != n:
            return None
        if not np.array_equal(np.load(npy.with_suffix(_STATS_SUFFIX)), _file_stats(paths)):
            return None
        failures = [(int(f["row"]), PatchReadError(f["path"], f["message"], f["kind"])) for f in meta["failed"]]
        n_ok = n - len(failures)
        images = np.load(npy, mmap_mode="r") if n_ok else np.empty((0, *PATCH_SHAPE), np.uint8)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if images.shape != (n_ok, *PATCH_SHAPE) or images.dtype != np.uint8:
        return None
    return images, failures


def _write_cache(npy: Path, paths: list[str], workers: int, progress: bool) -> tuple[np.ndarray, Failures]:
    """Decode into ``.patches-<key>.npy.<pid>.<thread>.tmp``, drop failed rows, map it, then publish it as ``npy``.

    Returns ``(images, failures)``; ``images`` is mapped before the rename, so it stays valid whatever another
    process does to the entry's name afterwards.
    """
    n = len(paths)
    tmp = npy.with_name(f".{npy.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        offset = _preallocate(tmp, n)
        fd = os.open(tmp, os.O_RDWR)
        try:
            failures, stats = decode_all(paths, workers, progress, sink=file_sink(fd, offset))
        finally:
            os.close(fd)
        if failures:
            _drop_rows(tmp, keep_mask(n, failures))
        _fsync(tmp)
        images = np.load(tmp, mmap_mode="r") if n > len(failures) else np.empty((0, *PATCH_SHAPE), np.uint8)
        _publish(npy, tmp, stats, failures)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _cache_write_error(exc, npy.parent, n * ROW_BYTES) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return images, failures


def _publish(npy: Path, tmp: Path, stats: np.ndarray, failures: Failures) -> None:
    """Put the finished ``tmp`` in place as ``npy``: older entry out, then the stats and metadata, the images last.

    The images' ``.npy`` appearing is what marks the entry complete, so a crash never pairs new metadata with old
    images.
    """
    meta = {
        "format": CACHE_FORMAT,
        "rows": len(stats),
        "images": len(stats) - len(failures),
        "failed": [{"row": i, "path": e.path, "kind": e.kind, "message": e.reason} for i, e in failures],
        "written_by": f"idc_helpers {__version__}",
    }
    npy.unlink(missing_ok=True)
    with atomic_path(npy.with_suffix(_STATS_SUFFIX)) as stats_tmp, open(stats_tmp, "wb") as handle:
        np.save(handle, stats)
    write_json(npy.with_suffix(".json"), meta)
    os.replace(tmp, npy)


def _preallocate(path: Path, n: int) -> int:
    """Write an ``.npy`` header for ``(n, 50, 50, 3) uint8`` and reserve the disk space; returns the data offset.

    Reserving up front fails at once when the disk is too small (not after minutes of decoding), and writes into
    allocated blocks were faster and steadier here than into a sparse file.
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *PATCH_SHAPE))
    offset = int(array.offset)
    del array  # unmapped before the threads write through a file descriptor
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, offset + n * ROW_BYTES)
    except AttributeError:  # not on this platform (macOS): the writes allocate as they go
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    return offset


def _cache_write_error(exc: OSError, folder: Path, needed: int) -> OSError:
    """The one-line error for a failed cache write of ``needed`` bytes into ``folder``.

    :class:`CacheSpaceError` for a full disk (how much is needed and free), :class:`CacheError` for a folder that
    cannot be written, or ``exc`` itself when it is neither.
    """
    # numpy reports a short write on a full disk as "N requested and M written", without an errno.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "requested and" in str(exc):
        error = CacheSpaceError(
            f"Not enough disk space in {folder} for the decoded-patch cache: {format_bytes(needed)} needed, "
            f"{format_bytes(free_bytes(folder))} free. Free some space, or pass --cache-dir DIR (or set "
            "IDC_CACHE_DIR) to a disk with more room."
        )
        error.errno = errno.ENOSPC
        return error
    # ENOENT/EINVAL for a file just created in a folder that exists: a pseudo file system such as /proc.
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.EINVAL):
        error = CacheError(
            f"The decoded-patch cache folder {folder} cannot be written ({exc.strerror}): pass --cache-dir DIR "
            "(or set IDC_CACHE_DIR; cache_dir= in Python) to a writable folder."
        )
        error.errno = exc.errno
        return error
    return exc


def _drop_rows(path: Path, keep: np.ndarray) -> None:
    """Rewrite the ``.npy`` at ``path`` with only the rows where ``keep`` is true, in bounded memory.

    Runs of kept rows are copied with ``pread``/``pwrite`` in pieces of at most 32 MB (no memory map, so a
    failed file in the full dataset does not map 2 GB twice into this process).
    """
    source = np.load(path, mmap_mode="r")
    source_offset = int(source.offset)
    del source
    positions = np.flatnonzero(keep)
    compact = path.with_name(path.name[: -len(".tmp")] + ".compact.tmp")
    try:
        target_offset = _preallocate(compact, len(positions))
        runs = np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1) if len(positions) else []
        piece = (32 << 20) // ROW_BYTES
        src = os.open(path, os.O_RDONLY)
        dst = os.open(compact, os.O_RDWR)
        try:
            sink, written = file_sink(dst, target_offset), 0
            for run in runs:
                for first in range(int(run[0]), int(run[-1]) + 1, piece):
                    count = min(piece, int(run[-1]) + 1 - first)
                    data = os.pread(src, count * ROW_BYTES, source_offset + first * ROW_BYTES)
                    sink(written, np.frombuffer(data, np.uint8))
                    written += count
        finally:
            os.close(src)
            os.close(dst)
        os.replace(compact, path)
    except BaseException:
        compact.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    # Without it a power cut just after the rename could leave a cache file of zeros that later loads as images.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entry_lock(
    npy: Path, *, shared: bool = False, blocking: bool = True
) -> contextlib.AbstractContextManager[bool | None]:
    """The entry's :func:`~idc_helpers.locks.file_lock`, which warns when it waits for another process's write."""
    return file_lock(
        npy.with_suffix(_LOCK_SUFFIX),
        shared=shared,
        blocking=blocking,
        on_wait=lambda: _log.warning("waiting for another process that is writing the cache entry %s", npy),
    )


def _temp_files(folder: Path, key: str | None = None) -> list[tuple[Path, re.Match]]:
    """The temporary files in ``folder`` (of the entry ``key`` only, when given) and their name's match."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    matches = ((folder / name, _TEMP_RE.fullmatch(name)) for name in names)
    return [(path, match) for path, match in matches if match is not None and (key is None or match["key"] == key)]


def _writer_gone(path: Path, match: re.Match) -> bool:
    """Without a lock to ask: the writer named in the file name is gone, or the file has not changed for hours."""
    if match["pid"] is not None:
        try:
            os.kill(int(match["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            pass
    try:
        return time.time() - path.stat().st_mtime > _ORPHAN_SECONDS
    except OSError:
        return False


def _cache_entries(folder: Path) -> tuple[list[tuple[int, int, Path]], int]:
    """``(last_used_ns, bytes, npy)`` of each entry, and the bytes of temporary files still being written."""
    entries = []
    for npy in folder.glob(f"{_CACHE_PREFIX}*.npy"):
        parts = [npy.with_suffix(suffix) for suffix in (".npy", ".json", _STATS_SUFFIX)]
        try:
            last_used = parts[1].stat().st_mtime_ns
        except OSError:
            last_used = 0  # metadata missing: an incomplete entry, the first to go
        entries.append((last_used, sum(_size_or_zero(part) for part in parts), npy))
    return entries, sum(_size_or_zero(path) for path, _ in _temp_files(folder))


def _delete_entry(npy: Path) -> bool:
    """Delete an entry unless another process holds its lock (writing it, or opening it right now)."""
    with _entry_lock(npy, blocking=False) as held:
        if held is False:
            return False
        try:
            npy.unlink()
            npy.with_suffix(".json").unlink(missing_ok=True)
            npy.with_suffix(_STATS_SUFFIX).unlink(missing_ok=True)
        except OSError:
            return False
        if held:  # deleted while held: a process waiting on it notices and takes the new file's lock instead
            npy.with_suffix(_LOCK_SUFFIX).unlink(missing_ok=True)
    return True


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
