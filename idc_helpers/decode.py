"""Decode patch files into ``(50, 50, 3) uint8`` RGB arrays: one file, or many in chunks on a thread pool.

:func:`read_patch` decodes one file. :func:`decode_all` decodes a list of files in chunks on a thread pool
(OpenCV's PNG decoder releases the GIL) and hands each decoded chunk to a sink that stores it, in memory
(:func:`memory_sink`) or in a file (:func:`file_sink`). Every file's PNG header is checked before it is decoded
(:func:`~idc_helpers.patch_files.check_png_header`, over the package's one PNG header reader
:func:`idc_helpers.png.read_png_header`), so a file that is not a patch costs a few bytes of reading, never its
decoded size. Short patches are padded with white (:func:`pad_to_patch`); a file that cannot be a patch is a
:class:`PatchReadError` naming it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import cv2
import numpy as np

from idc_helpers import PATCH_SIZE
from idc_helpers.errors import UserError
from idc_helpers.patch_files import (
    MAX_PATCH_FILE_BYTES,
    UNREADABLE,
    WRONG_SIZE,
    PatchFileError,
    Problem,
    check_png_header,
)
from idc_helpers.png import PNG_HEADER_BYTES, TRUNCATED

PATCH_SHAPE = (PATCH_SIZE, PATCH_SIZE, 3)
# Glass background in a bright-field H&E scan: the value used for padding and for transparent pixels.
BACKGROUND = 255
#: Bytes of one decoded patch.
ROW_BYTES = PATCH_SIZE * PATCH_SIZE * 3
# Rows per decoding task: big enough that pool overhead is negligible, small enough for a smooth progress bar.
_CHUNK_ROWS = 256
# First read per file: real patches are 2-10 kB, so one read gets all of it.
_READ_BYTES = 1 << 16


class PatchReadError(UserError, ValueError):
    """A patch file that cannot be turned into a 50x50 RGB patch; ``path`` names it, ``kind`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str, kind: str = TRUNCATED) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason
        self.kind = kind

    def to_problem(self) -> Problem:
        """The failure as a row of a problems list (:class:`~idc_helpers.patch_files.Problem`)."""
        return Problem(self.path, self.kind, self.reason)


#: The rows that failed to decode, in row order: ``(row, error)``.
Failures = list[tuple[int, PatchReadError]]
#: Stores a decoded chunk: ``sink(start, rows)`` with ``rows`` the ``(k, 50, 50, 3) uint8`` patches from row ``start``.
Sink = Callable[[int, np.ndarray], None]


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


def default_workers() -> int:
    """Decoding threads by default: twice the usable CPU cores, between 2 and 16.

    Twice the cores measured fastest on 2 cores: the share of each decode that holds the GIL overlaps with other
    threads' decoding.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(2, min(16, 2 * cores))


def keep_mask(n: int, failures: Failures) -> np.ndarray:
    """``(n,) bool``: true for the rows that decoded, false for the rows in ``failures``."""
    keep = np.ones(n, dtype=bool)
    keep[[i for i, _ in failures]] = False
    return keep


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
    """Refuse, before decoding, what the header shows is not a patch (see :func:`.patch_files.check_png_header`)."""
    try:
        check_png_header(data[:PNG_HEADER_BYTES], max(file_size, len(data)))
    except PatchFileError as exc:
        fix = "" if exc.kind == WRONG_SIZE else "; re-download the dataset or delete the file"
        raise PatchReadError(path, exc.reason + fix, exc.kind) from None


def _unreadable(exc: OSError) -> str:
    return f"cannot be read ({exc.strerror}); was it moved or deleted after the index was built?"


def _decode_chunk(paths: Sequence[str], out: np.ndarray, stats: np.ndarray) -> Failures:
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


def decode_all(paths: list[str], workers: int, progress: bool, sink: Sink) -> tuple[Failures, np.ndarray]:
    """Decode every path in chunks on ``workers`` threads; ``sink(start, rows)`` stores each decoded chunk.

    Returns the failures ``(row, error)`` in row order (their rows are stored white) and the ``(N, 2) int64``
    (size, mtime_ns) of every file as read while decoding (-1 for a file that could not be read). ``progress``
    shows a progress bar.
    """
    local = threading.local()
    stats = np.full((len(paths), 2), -1, np.int64)

    def task(start: int) -> tuple[int, Failures]:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty((_CHUNK_ROWS, *PATCH_SHAPE), np.uint8)
        chunk = paths[start : start + _CHUNK_ROWS]
        failed = _decode_chunk(chunk, buf, stats[start : start + len(chunk)])
        sink(start, buf[: len(chunk)])
        return len(chunk), [(start + j, exc) for j, exc in failed]

    from tqdm import tqdm

    failures: Failures = []
    with (
        tqdm(total=len(paths), unit="patch", desc="decoding", disable=not progress, mininterval=0.5) as bar,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="idc-decode") as pool,
    ):
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


def memory_sink(images: np.ndarray) -> Sink:
    """A sink that stores decoded rows into ``images``, an ``(N, 50, 50, 3) uint8`` array."""

    def sink(start: int, rows: np.ndarray) -> None:
        images[start : start + len(rows)] = rows

    return sink


def file_sink(fd: int, offset: int) -> Sink:
    """A sink that writes decoded rows into the open file ``fd``, whose row 0 starts at byte ``offset``."""

    def sink(start: int, rows: np.ndarray) -> None:
        # pwrite instead of a writable memmap: the pages go to the page cache without being mapped into this
        # process, so peak RSS stays small even for the 2.1 GB full set.
        view = memoryview(rows).cast("B")
        pos = offset + start * ROW_BYTES
        while view:
            written = os.pwrite(fd, view, pos)
            view, pos = view[written:], pos + written

    return sink
