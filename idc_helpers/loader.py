"""Decode patch files into one ``(N, 50, 50, 3) uint8`` RGB array, in parallel, cached on disk.

``load_patches(frame)`` takes a patch index (see :mod:`idc_helpers.patch_index`) and returns the images in the
frame's row order. Decoding runs in a thread pool (OpenCV's PNG decoder releases the GIL) and writes each chunk
straight into a ``.npy`` file in the cache folder, so even the full dataset (2.1 GB as uint8) never sits in
memory twice. Every file's PNG header is checked before it is decoded (:func:`~idc_helpers.patch_index.
check_png_header`), so a file that is not a patch costs a few bytes of reading, never its decoded size.

A cache entry (``patches-<key>.npy`` with ``.json`` metadata and ``.stats``) is named by a hash of the rows'
paths (plus :data:`CACHE_FORMAT`) and stores each file's size and modification time as read while decoding; it is
used only when every file still has them, so a changed, added or removed file means decoding again. The cache lives
in ``$IDC_CACHE_DIR`` or ``~/.cache/idc_helpers``; nothing is ever written into the data folder.

Several processes may share a cache folder. Each entry has a lock file (``patches-<key>.lock``, ``flock``):
readers hold it shared while they open the entry, the one writer holds it exclusively while it decodes, so a
second process asking for the same entry waits and then reads what the first wrote instead of decoding it again.
The writer maps its finished file before renaming it into place, so it never reopens a name that someone else may
replace. A writer decodes into ``.patches-<key>.npy.<pid>.tmp``; a writer that was killed leaves that file behind,
and the next load or :func:`prune_cache` removes it (it can tell, because the dead writer's lock is free).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from idc_helpers import PATCH_SIZE, __version__
from idc_helpers.atomic import atomic_path, write_json
from idc_helpers.errors import ExternalError, UserError
from idc_helpers.patch_index import (
    MAX_PATCH_FILE_BYTES,
    PNG_HEADER_BYTES,
    TRUNCATED,
    UNREADABLE,
    WRONG_SIZE,
    PatchFileError,
    Problem,
    check_png_header,
)
from idc_helpers.validation import user_path

# Bump when decoding (padding, colour handling) or the cache layout changes: old cache files then stop matching.
CACHE_FORMAT = 1
PATCH_SHAPE = (PATCH_SIZE, PATCH_SIZE, 3)
# Glass background in a bright-field H&E scan: the value used for padding and for transparent pixels.
BACKGROUND = 255
_ROW_BYTES = PATCH_SIZE * PATCH_SIZE * 3
# Rows per decoding task: big enough that pool overhead is negligible, small enough for a smooth progress bar.
_CHUNK_ROWS = 256
_CACHE_PREFIX = "patches-"
_STATS_SUFFIX = ".stats"  # (N, 2) int64 size and mtime_ns of each row's file, in .npy format
_LOCK_SUFFIX = ".lock"
# Temporary files of an entry: the writer's ``.patches-<key>.npy.<pid>[.compact].tmp`` and the small metadata
# files' ``.patches-<key>.<json|stats>.<random>.tmp``.
_TEMP_RE = re.compile(r"^\.patches-(?P<key>[0-9a-f]{32})\.(?:npy\.(?P<pid>\d+)\.(?:compact\.)?|(?:json|stats)\.).*tmp$")
# Where locks do not work (some network file systems), a temporary file untouched this long has no live writer.
_ORPHAN_SECONDS = 6 * 3600
# First read per file: real patches are 2-10 kB, so one read gets all of it.
_READ_BYTES = 1 << 16
# An unwritable cache folder: sets up to this size are decoded into memory instead (with a warning).
IN_MEMORY_FALLBACK_BYTES = 1 << 30

_log = logging.getLogger(__name__)


class PatchReadError(UserError, ValueError):
    """A patch file that cannot be turned into a 50x50 RGB patch; ``path`` names it, ``kind`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str, kind: str = TRUNCATED) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason
        self.kind = kind

    def to_problem(self) -> Problem:
        return Problem(self.path, self.kind, self.reason)


class CacheError(UserError, OSError):
    """The decoded-patch cache folder cannot be used (not writable, not a folder, inside the dataset)."""


class CacheSpaceError(ExternalError, OSError):
    """The disk of the cache folder has no room for the decoded patches; the message says how much is needed."""


class CacheWarning(UserWarning):
    """The cache could not be used and the patches were decoded into memory instead."""


@dataclass
class LoadedPatches:
    """Decoded patches and the index rows they came from.

    ``images``: ``(N, 50, 50, 3) uint8`` RGB, usually a read-only ``np.memmap`` of the cache file.
    ``frame``: the index rows, aligned row for row with ``images`` (rows that failed to decode removed, index reset).
    ``problems``: one :class:`~idc_helpers.patch_index.Problem` per file left out, naming the file.
    ``from_cache``: ``True`` when the images came from an existing cache file without decoding anything.
    ``cache_path``: the ``.npy`` cache file, or ``None`` when loaded without a cache.
    """

    images: np.ndarray
    frame: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    from_cache: bool = False
    cache_path: Path | None = None

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def labels(self) -> np.ndarray:
        """``(N,) int32`` labels (1 = IDC), aligned with ``images``."""
        return self.frame["label"].to_numpy(dtype=np.int32)

    def select(self, rows: np.ndarray | pd.Series | Sequence[int]) -> tuple[np.ndarray, pd.DataFrame]:
        """Return ``(images, frame)`` for a subset: a boolean mask of length N or integer row positions.

        The images are an in-memory copy (7.5 kB a patch, 2.1 GB for the whole dataset): fine for a validation or
        test set, or for plotting. To train on a subset without copying, pass its positions as ``indices`` to
        :func:`idc_helpers.pipeline.make_dataset`, which reads batches straight from ``images``.
        """
        positions = check_rows(rows, len(self))
        return np.asarray(self.images[positions]), self.frame.iloc[positions].reset_index(drop=True)


class RowSelectionError(UserError, IndexError, ValueError, TypeError):
    """A selection of rows that does not fit the array: a mask of another length, positions out of range, or
    values that are neither booleans nor integers (catchable as any of the builtin errors it once was).
    """


def check_rows(rows: np.ndarray | pd.Series | Sequence[int], n: int) -> np.ndarray:
    """Row positions ``(k,) int64`` in ``[0, n)`` from a boolean mask of shape ``(n,)`` or integer positions.

    Raises :class:`RowSelectionError` for a mask of another length, other dtypes, or a position outside
    ``[0, n)`` (negative positions are refused rather than counted from the end). An empty selection is returned
    as it is; whether that is allowed is the caller's decision.
    """
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise RowSelectionError(f"boolean mask has shape {rows.shape}; expected ({n},)")
        return np.flatnonzero(rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise RowSelectionError(f"rows must be a boolean mask or integer positions, not {rows.dtype}")
    positions = rows.astype(np.int64, copy=False).reshape(-1)
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise RowSelectionError(f"row positions must lie in [0, {n}), got {positions.min()}..{positions.max()}")
    return positions


def default_cache_dir() -> Path:
    """The decoded-patch cache folder: ``$IDC_CACHE_DIR`` if set, else ``~/.cache/idc_helpers``."""
    env = os.environ.get("IDC_CACHE_DIR")
    return user_path(env, "IDC_CACHE_DIR") if env else user_path("~/.cache/idc_helpers", "the default cache folder")


def pad_to_patch(img: np.ndarray) -> np.ndarray:
    """Pad an ``(h, w, 3)`` uint8 patch with ``h, w <= 50`` to ``(50, 50, 3)``.

    The original pixels stay at the top-left, untouched, and the missing rows (bottom) and columns (right) are
    white (255). Why: ``x, y`` in a patch's name is its top-left corner, and the short patches of this dataset
    (50x42, 50x30, 50x1, 41x50, ...) are the last row or column of a slide, cut short by its bottom or right edge
    (checked on the real sample: every short patch is the bottom-most of its column or the right-most of its row).
    Beyond that edge is no tissue, and white is what empty glass looks like in a bright-field scan. Stretching would
    change the scale of the nuclei; black or reflected padding would invent a dark edge or mirrored tissue that a
    CNN could learn as a signal for "border patch".
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) image, got shape {img.shape}")
    h, w = img.shape[:2]
    if h > PATCH_SIZE or w > PATCH_SIZE:
        raise ValueError(f"image is {w}x{h}, larger than {PATCH_SIZE}x{PATCH_SIZE}; it cannot be padded to a patch")
    if (h, w) == (PATCH_SIZE, PATCH_SIZE):
        return np.ascontiguousarray(img, dtype=np.uint8)
    out = np.full(PATCH_SHAPE, BACKGROUND, dtype=np.uint8)
    out[:h, :w] = img
    return out


def read_patch(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one patch file into a ``(50, 50, 3) uint8`` RGB array (padded with white, see :func:`pad_to_patch`).

    Grayscale becomes 3 equal channels, 16-bit is scaled to 8-bit, and an alpha channel is composited onto white
    (transparent = glass background; for the opaque pixels of real patches this is the same as dropping alpha).
    Raises :class:`PatchReadError` naming the file when it is missing, not a regular file, empty, truncated, not a
    PNG, or larger than 50x50 (judged from its header, before decoding).
    """
    path = os.fspath(path)
    try:
        data, st = _read_file(path)
    except OSError as exc:
        raise PatchReadError(path, _unreadable(exc), UNREADABLE) from exc
    _check_header(path, data, st.st_size)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return _to_patch(img, path, len(data))


def load_patches(
    frame: pd.DataFrame,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = False,
    use_cache: bool = True,
) -> LoadedPatches:
    """Decode every file of ``frame["path"]`` into one ``(N, 50, 50, 3) uint8`` RGB array, cached on disk.

    ``frame``: a patch index (any DataFrame with a ``path`` column; rows keep their order).
    ``cache_dir``: cache folder (default :func:`default_cache_dir`); ``use_cache=False`` decodes into memory and
    writes nothing (for small sets). ``workers``: decoding threads (default: twice the usable CPU cores, which
    measured fastest on 2 cores: the share of each decode that holds the GIL overlaps with other threads' decoding).
    ``progress``: show a progress bar while decoding.
    Files that fail to decode (missing, empty, truncated or corrupt, not patch-sized) are left out and listed in
    ``problems``; the returned ``frame`` drops their rows so it stays aligned with ``images``.
    Raises :class:`CacheError` when the cache folder cannot be used and the set is too large to decode into memory
    instead (smaller sets are, with a :class:`CacheWarning`), :class:`CacheSpaceError` when its disk is too full.
    """
    paths = [p if type(p) is str else os.fspath(p) for p in frame["path"].tolist()]
    if not paths:
        return LoadedPatches(np.empty((0, *PATCH_SHAPE), np.uint8), frame.reset_index(drop=True))
    workers = _default_workers() if workers is None else max(1, int(workers))
    if not use_cache:
        return _load_in_memory(frame, paths, workers, progress)
    cache_dir = (user_path(cache_dir, "the cache folder") if cache_dir is not None else default_cache_dir()).absolute()
    _refuse_cache_inside_data(cache_dir, paths)
    npy = cache_dir / f"{_CACHE_PREFIX}{_entry_key(paths)}.npy"
    cached = _open_cache_shared(npy, paths)
    if cached is None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(cache_dir, os.W_OK | os.X_OK):  # also a read-only file system, even for root
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            return _fallback_in_memory(frame, paths, workers, progress, cache_dir, exc)
        cached, images, failures = _write_entry(npy, paths, workers, progress)
        if cached is None:
            prune_cache(cache_dir, keep=npy)
            return _result(images, frame, _keep_mask(len(paths), failures), failures, from_cache=False, cache_path=npy)
    images, failures = cached
    _mark_used(npy)
    remove_orphans(cache_dir)
    return _result(images, frame, _keep_mask(len(paths), failures), failures, from_cache=True, cache_path=npy)


def prune_cache(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int | None = None,
    keep: Path | None = None,
) -> int:
    """Remove what interrupted loads left behind, then delete the least recently used cache entries until the rest
    take at most ``max_bytes``; returns the bytes freed.

    Every distinct index (another subset of patients, another seed's sample) gets its own entry of 7.5 kB per
    patch, so experiments on the full dataset would otherwise fill the disk 2 GB at a time. ``max_bytes`` defaults
    to ``$IDC_CACHE_MAX_GB`` (in GB) or 20 GB. ``keep`` (an entry's ``.npy``) is never deleted, nor is an entry
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
        with _locked(folder / f"{_CACHE_PREFIX}{key}{_LOCK_SUFFIX}", fcntl.LOCK_EX, blocking=False) as held:
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


def _load_in_memory(frame: pd.DataFrame, paths: list[str], workers: int, progress: bool) -> LoadedPatches:
    n = len(paths)
    images = np.empty((n, *PATCH_SHAPE), np.uint8)
    failures, _ = _decode_all(paths, workers, progress, sink=_memory_sink(images))
    keep = _keep_mask(n, failures)
    images = images[keep] if failures else images
    return _result(images, frame, keep, failures, from_cache=False, cache_path=None)


def _fallback_in_memory(frame, paths, workers, progress, cache_dir: Path, exc: OSError) -> LoadedPatches:
    """The cache folder cannot be written: decode into memory when that is small, else one clear error."""
    needed = len(paths) * _ROW_BYTES
    reason = f"The decoded-patch cache folder {cache_dir} cannot be written ({exc.strerror or exc})"
    fix = "pass --cache-dir DIR (or set IDC_CACHE_DIR; cache_dir= in Python) to a writable folder"
    if needed > IN_MEMORY_FALLBACK_BYTES:
        raise CacheError(
            f"{reason}. Decoding {len(paths):,} patches into memory instead would take "
            f"{_size_text(needed)}: {fix} with {_size_text(needed)} free."
        ) from exc
    warnings.warn(
        f"{reason}; decoding {len(paths):,} patches into memory ({_size_text(needed)}) instead. To cache them, {fix}.",
        CacheWarning,
        stacklevel=3,
    )
    return _load_in_memory(frame, paths, workers, progress)


# --- decoding -------------------------------------------------------------------------------------------------


def _to_patch(img: np.ndarray | None, path: str, n_bytes: int) -> np.ndarray:
    """Turn what OpenCV decoded (``IMREAD_UNCHANGED``) from ``n_bytes`` of ``path`` into a ``(50, 50, 3)`` RGB patch."""
    if img is None or img.size == 0:
        if n_bytes == 0:
            raise PatchReadError(path, "the file is empty (0 bytes); re-download the dataset or delete the file")
        raise PatchReadError(
            path,
            f"cannot be decoded ({n_bytes} bytes): the PNG is truncated or corrupt; re-download the dataset or "
            "delete the file",
        )
    if img.dtype == np.uint16:
        # Rounded v * 255 / 65535: 16-bit PNGs keep their full range in 8 bits.
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise PatchReadError(path, f"unsupported pixel type {img.dtype}; patches are 8-bit RGB PNGs")
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels in (2, 4):
        # Composite on white: a transparent pixel shows glass, like the padding.
        alpha = img[:, :, -1:].astype(np.float32) / 255.0
        img = np.rint(img[:, :, :-1] * alpha + BACKGROUND * (1.0 - alpha)).astype(np.uint8)
        channels -= 1
    if channels == 1:
        rgb = np.repeat(img, 3, axis=2)
    elif channels == 3:
        rgb = img[:, :, ::-1]  # OpenCV decodes to BGR
    else:
        raise PatchReadError(path, f"has {channels} channels; expected RGB, grayscale or RGBA")
    h, w = rgb.shape[:2]
    if h > PATCH_SIZE or w > PATCH_SIZE:
        raise PatchReadError(
            path,
            f"is {w}x{h} pixels, larger than the {PATCH_SIZE}x{PATCH_SIZE} patches of this dataset; left out rather "
            "than cropped, since which part is the patch is unknown. Replace it with the dataset's original file",
            kind=WRONG_SIZE,
        )
    return pad_to_patch(rgb)


def _read_file(path: str) -> tuple[bytes, os.stat_result]:
    """The whole file and its ``stat`` taken on the same open file, in few system calls (open, fstat, read, close).

    The size and mtime recorded for the cache are those of the bytes actually decoded: no window in which the file
    could change between checking it and reading it. Opened non-blocking and refused unless it is a regular file,
    so a named pipe in a patch's place cannot hang a load; of a file too large to be a patch only the first
    64 kB are read (enough for its header check to refuse it).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = os.read(fd, _READ_BYTES)
        if len(data) == _READ_BYTES and st.st_size <= MAX_PATCH_FILE_BYTES:  # larger than most patches
            parts = [data]
            while part := os.read(fd, 1 << 20):
                parts.append(part)
                if sum(map(len, parts)) > MAX_PATCH_FILE_BYTES:  # grew while being read
                    break
            data = b"".join(parts)
    finally:
        os.close(fd)
    return data, st


def _check_header(path: str, data: bytes, file_size: int) -> None:
    """Refuse, before decoding, what the header shows is not a patch (see ``patch_index.check_png_header``)."""
    try:
        check_png_header(data[:PNG_HEADER_BYTES], max(file_size, len(data)))
    except PatchFileError as exc:
        fix = "" if exc.kind == WRONG_SIZE else "; re-download the dataset or delete the file"
        raise PatchReadError(path, exc.reason + fix, exc.kind) from None


def _unreadable(exc: OSError) -> str:
    return f"cannot be read ({exc.strerror}); was it moved or deleted after the index was built?"


def _decode_chunk(paths: Sequence[str], out: np.ndarray, stats: np.ndarray) -> list[tuple[int, PatchReadError]]:
    """Decode ``paths`` into ``out[:len(paths)]`` (RGB) and their (size, mtime_ns) into ``stats`` (-1: unreadable).

    Failed rows are filled white and returned with their errors.

    Reading the bytes here and decoding them from memory cost less CPU than ``cv2.imread``, which opens each file
    twice (once to sniff the format); this loop is the whole cost of a first load, so it stays bare.
    """
    failures = []
    sizes, mtimes = [], []
    read, decode, frombuffer, u8 = _read_file, cv2.imdecode, np.frombuffer, np.uint8
    unchanged, bgr2rgb, cvt = cv2.IMREAD_UNCHANGED, cv2.COLOR_BGR2RGB, cv2.cvtColor
    for j, path in enumerate(paths):
        try:
            data, st = read(path)
        except OSError as exc:
            sizes.append(-1)
            mtimes.append(-1)
            out[j] = BACKGROUND
            failures.append((j, PatchReadError(path, _unreadable(exc), UNREADABLE)))
            continue
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
        try:
            _check_header(path, data, st.st_size)
        except PatchReadError as exc:
            out[j] = BACKGROUND
            failures.append((j, exc))
            continue
        img = decode(frombuffer(data, u8), unchanged)
        if img is not None and img.shape == PATCH_SHAPE and img.dtype == u8:
            cvt(img, bgr2rgb, dst=out[j])  # the common case: BGR to RGB straight into the output row
            continue
        try:
            out[j] = _to_patch(img, path, len(data))
        except PatchReadError as exc:
            out[j] = BACKGROUND
            failures.append((j, exc))
    stats[:, 0] = sizes
    stats[:, 1] = mtimes
    return failures


def _decode_all(
    paths: list[str], workers: int, progress: bool, sink
) -> tuple[list[tuple[int, PatchReadError]], np.ndarray]:
    """Decode every path in chunks on a thread pool; ``sink(start, rows)`` stores each decoded chunk.

    Returns the failures (row, error) in row order and the ``(N, 2) int64`` (size, mtime_ns) of every file.
    """
    local = threading.local()
    stats = np.full((len(paths), 2), -1, np.int64)

    def task(start: int) -> tuple[int, list[tuple[int, PatchReadError]]]:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty((_CHUNK_ROWS, *PATCH_SHAPE), np.uint8)
        chunk = paths[start : start + _CHUNK_ROWS]
        failed = _decode_chunk(chunk, buf, stats[start : start + len(chunk)])
        sink(start, buf[: len(chunk)])
        return len(chunk), [(start + j, exc) for j, exc in failed]

    from tqdm import tqdm

    failures: list[tuple[int, PatchReadError]] = []
    with tqdm(total=len(paths), unit="patch", desc="decoding", disable=not progress, mininterval=0.5) as bar:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="idc-decode") as pool:
            futures = [pool.submit(task, start) for start in range(0, len(paths), _CHUNK_ROWS)]
            try:
                for future in as_completed(futures):
                    done, failed = future.result()
                    failures.extend(failed)
                    bar.update(done)
            except BaseException:
                # Ctrl-C or an error: stop at once instead of decoding the remaining chunks first.
                for future in futures:
                    future.cancel()
                raise
    failures.sort(key=lambda item: item[0])
    return failures, stats


def _memory_sink(images: np.ndarray):
    def sink(start: int, rows: np.ndarray) -> None:
        images[start : start + len(rows)] = rows

    return sink


def _file_sink(fd: int, offset: int):
    def sink(start: int, rows: np.ndarray) -> None:
        # pwrite instead of a writable memmap: the pages go to the page cache without being mapped into this
        # process, so peak RSS stays small even for the 2.1 GB full set.
        view = memoryview(rows).cast("B")
        pos = offset + start * _ROW_BYTES
        while view:
            written = os.pwrite(fd, view, pos)
            view, pos = view[written:], pos + written

    return sink


# --- cache ----------------------------------------------------------------------------------------------------


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


def _open_cache_shared(npy: Path, paths: list[str]):
    """:func:`_open_cache` under the entry's shared lock, so that a writer of the entry is waited for."""
    if not npy.is_file() and not npy.with_suffix(_LOCK_SUFFIX).exists():
        return None  # never written, nobody writing: no lock file to make
    with _locked(npy.with_suffix(_LOCK_SUFFIX), fcntl.LOCK_SH):
        return _open_cache(npy, paths)


def _open_cache(npy: Path, paths: list[str]) -> tuple[np.ndarray, list[tuple[int, PatchReadError]]] | None:
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


def _mark_used(npy: Path) -> None:
    # The metadata file's mtime records the last use, for prune_cache; a read-only cache folder is fine.
    with contextlib.suppress(OSError):
        os.utime(npy.with_suffix(".json"))


def _write_entry(npy: Path, paths: list[str], workers: int, progress: bool):
    """Write the entry under its exclusive lock; ``(cached, None, None)`` when another process wrote it meanwhile,
    else ``(None, images, failures)`` with the images mapped from the new file.
    """
    with _locked(npy.with_suffix(_LOCK_SUFFIX), fcntl.LOCK_EX) as held:
        cached = _open_cache(npy, paths)
        if cached is not None:
            return cached, None, None
        if held:  # nobody else can be writing this entry: its temporary files are a killed writer's
            for path, _ in _temp_files(npy.parent, key=npy.stem[len(_CACHE_PREFIX) :]):
                path.unlink(missing_ok=True)
        try:
            images, failures = _write_cache(npy, paths, workers, progress)
        except BaseException:
            if held and not npy.exists():  # nothing written (a full disk, Ctrl-C): no lock file stays behind
                npy.with_suffix(_LOCK_SUFFIX).unlink(missing_ok=True)
            raise
    return None, images, failures


def _write_cache(npy: Path, paths: list[str], workers: int, progress: bool):
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
            failures, stats = _decode_all(paths, workers, progress, sink=_file_sink(fd, offset))
        finally:
            os.close(fd)
        if failures:
            _drop_rows(tmp, _keep_mask(n, failures))
        _fsync(tmp)
        images = np.load(tmp, mmap_mode="r") if n > len(failures) else np.empty((0, *PATCH_SHAPE), np.uint8)
        _publish(npy, tmp, stats, failures)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _cache_write_error(exc, npy.parent, n * _ROW_BYTES) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return images, failures


def _publish(npy: Path, tmp: Path, stats: np.ndarray, failures: list[tuple[int, PatchReadError]]) -> None:
    """Older entry out, then the stats and metadata, the images last: the images' ``.npy`` appearing is what marks
    the entry complete, so a crash never pairs new metadata with old images.
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
        os.posix_fallocate(fd, 0, offset + n * _ROW_BYTES)
    except AttributeError:  # not on this platform (macOS): the writes allocate as they go
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    return offset


def _cache_write_error(exc: OSError, folder: Path, needed: int) -> OSError:
    """The one-line error for a failed cache write: disk full (how much is needed and free), folder unusable, or
    the original error when it is neither.
    """
    # numpy reports a short write on a full disk as "N requested and M written", without an errno.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "requested and" in str(exc):
        error = CacheSpaceError(
            f"Not enough disk space in {folder} for the decoded-patch cache: {_size_text(needed)} needed, "
            f"{_size_text(_free_bytes(folder))} free. Free some space, or pass --cache-dir DIR (or set "
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


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _size_text(n_bytes: int) -> str:
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    if n_bytes >= 1e6:
        return f"{n_bytes / 1e6:.0f} MB"
    return f"{n_bytes / 1e3:.0f} kB"


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
        piece = (32 << 20) // _ROW_BYTES
        src = os.open(path, os.O_RDONLY)
        dst = os.open(compact, os.O_RDWR)
        try:
            sink, written = _file_sink(dst, target_offset), 0
            for run in runs:
                for first in range(int(run[0]), int(run[-1]) + 1, piece):
                    count = min(piece, int(run[-1]) + 1 - first)
                    data = os.pread(src, count * _ROW_BYTES, source_offset + first * _ROW_BYTES)
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


def _refuse_cache_inside_data(cache_dir: Path, paths: list[str]) -> None:
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


# --- locks, orphans, pruning ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path, mode: int, blocking: bool = True) -> Iterator[bool | None]:
    """Hold ``flock(mode)`` on the lock file ``path`` for the ``with`` block.

    Yields ``True`` while held, ``False`` when it is busy and ``blocking`` is false, ``None`` when no lock can be had
    (a read-only folder without the lock file, a file system without locks): the caller goes on unlocked.
    """
    fd, state = _acquire(path, mode, blocking)
    try:
        yield state
    finally:
        if fd is not None:
            os.close(fd)


def _acquire(path: Path, mode: int, blocking: bool) -> tuple[int | None, bool | None]:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return None, None
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    os.close(fd)
                    return None, False
                _log.warning("waiting for another process that is writing the cache entry %s", path.with_suffix(".npy"))
                fcntl.flock(fd, mode)
        except OSError:  # no locks on this file system
            os.close(fd)
            return None, None
        except BaseException:
            os.close(fd)
            raise
        # The lock file may have been deleted (by prune_cache, holding it) between our open and our flock: then
        # the lock we hold guards nothing; take the new file's instead.
        try:
            now, ours = os.stat(path), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
                return fd, True
        except FileNotFoundError:
            pass
        os.close(fd)


def _temp_files(folder: Path, key: str | None = None) -> list[tuple[Path, re.Match]]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in names:
        match = _TEMP_RE.fullmatch(name)
        if match is not None and (key is None or match["key"] == key):
            found.append((folder / name, match))
    return found


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
    lock = npy.with_suffix(_LOCK_SUFFIX)
    with _locked(lock, fcntl.LOCK_EX, blocking=False) as held:
        if held is False:
            return False
        try:
            npy.unlink()
            npy.with_suffix(".json").unlink(missing_ok=True)
            npy.with_suffix(_STATS_SUFFIX).unlink(missing_ok=True)
        except OSError:
            return False
        if held:
            lock.unlink(missing_ok=True)  # while held: a process waiting on it notices and takes a new one
    return True


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- helpers --------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(2, min(16, 2 * cores))


def _keep_mask(n: int, failures: list[tuple[int, PatchReadError]]) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[[i for i, _ in failures]] = False
    return keep


def _result(images, frame, keep, failures, *, from_cache: bool, cache_path: Path | None) -> LoadedPatches:
    kept = frame.reset_index(drop=True) if keep.all() else frame.loc[keep].reset_index(drop=True)
    return LoadedPatches(images, kept, [exc.to_problem() for _, exc in failures], from_cache, cache_path)
