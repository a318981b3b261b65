"""Load a patch index's images as one ``(N, 50, 50, 3) uint8`` RGB array, from the decoded-patch cache.

``load_patches(frame)`` takes a patch index (see :mod:`idc_helpers.patch_index`) and returns the images in the
frame's row order, with the rows whose files failed to decode left out and listed. The images come from the
on-disk cache (:mod:`idc_helpers.patch_cache`), decoded into it (:mod:`idc_helpers.decode`) when the files are
new or changed; a small set is decoded into memory instead when the cache folder cannot be written.
:func:`check_rows` turns a row selection into positions, for :meth:`LoadedPatches.select` and the input pipeline.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from idc_helpers.decode import PATCH_SHAPE, ROW_BYTES, Failures, decode_all, default_workers, keep_mask, memory_sink
from idc_helpers.disk import format_bytes
from idc_helpers.errors import UserError
from idc_helpers.patch_cache import (
    CacheError,
    default_cache_dir,
    entry_path,
    make_cache_folder,
    mark_used,
    open_entry,
    prune_cache,
    refuse_cache_inside_data,
    remove_orphans,
    write_entry,
)
from idc_helpers.patch_files import Problem
from idc_helpers.validation import user_path

# An unwritable cache folder: sets up to this size are decoded into memory instead (with a warning).
IN_MEMORY_FALLBACK_BYTES = 1 << 30


class CacheWarning(UserWarning):
    """The cache could not be used and the patches were decoded into memory instead."""


@dataclass
class LoadedPatches:
    """Decoded patches and the index rows they came from.

    ``images``: ``(N, 50, 50, 3) uint8`` RGB, usually a read-only ``np.memmap`` of the cache file.
    ``frame``: the index rows, aligned row for row with ``images`` (rows that failed to decode removed, index reset).
    ``problems``: one :class:`~idc_helpers.patch_files.Problem` per file left out, naming the file.
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
    """A selection of rows that does not fit the array.

    A mask of another length, positions out of range, or values that are neither booleans nor integers; catchable
    as any of the builtin errors it once was.
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
    ``cache_dir``: cache folder (default :func:`~idc_helpers.patch_cache.default_cache_dir`); ``use_cache=False``
    decodes into memory and writes nothing (for small sets). ``workers``: decoding threads (default
    :func:`~idc_helpers.decode.default_workers`). ``progress``: show a progress bar while decoding.
    Files that fail to decode (missing, empty, truncated or corrupt, not patch-sized) are left out and listed in
    ``problems``; the returned ``frame`` drops their rows so it stays aligned with ``images``.
    Raises :class:`~idc_helpers.patch_cache.CacheError` when the cache folder cannot be used and the set is too
    large to decode into memory instead (smaller sets are, with a :class:`CacheWarning`),
    :class:`~idc_helpers.patch_cache.CacheSpaceError` when its disk is too full.
    """
    paths = [p if type(p) is str else os.fspath(p) for p in frame["path"].tolist()]
    if not paths:
        return LoadedPatches(np.empty((0, *PATCH_SHAPE), np.uint8), frame.reset_index(drop=True))
    workers = default_workers() if workers is None else max(1, int(workers))
    if not use_cache:
        return _load_in_memory(frame, paths, workers, progress)
    cache_dir = (user_path(cache_dir, "the cache folder") if cache_dir is not None else default_cache_dir()).absolute()
    refuse_cache_inside_data(cache_dir, paths)
    npy = entry_path(cache_dir, paths)
    cached = open_entry(npy, paths)
    if cached is None:
        try:
            make_cache_folder(cache_dir)
        except OSError as exc:
            return _fallback_in_memory(frame, paths, workers, progress, cache_dir, exc)
        images, failures, written = write_entry(npy, paths, workers, progress)
    else:
        (images, failures), written = cached, False
    if written:
        prune_cache(cache_dir, keep=npy)
    else:
        mark_used(npy)
        remove_orphans(cache_dir)
    return _result(images, frame, failures, cache_path=npy, from_cache=not written)


def _fallback_in_memory(
    frame: pd.DataFrame, paths: list[str], workers: int, progress: bool, cache_dir: Path, exc: OSError
) -> LoadedPatches:
    """The cache folder cannot be written: decode into memory when that is small, else one clear error."""
    needed = len(paths) * ROW_BYTES
    reason = f"The decoded-patch cache folder {cache_dir} cannot be written ({exc.strerror or exc})"
    fix = "pass --cache-dir DIR (or set IDC_CACHE_DIR; cache_dir= in Python) to a writable folder"
    if needed > IN_MEMORY_FALLBACK_BYTES:
        raise CacheError(
            f"{reason}. Decoding {len(paths):,} patches into memory instead would take "
            f"{format_bytes(needed)}: {fix} with {format_bytes(needed)} free."
        ) from exc
    warnings.warn(
        f"{reason}; decoding {len(paths):,} patches into memory ({format_bytes(needed)}) instead. "
        f"To cache them, {fix}.",
        CacheWarning,
        stacklevel=3,
    )
    return _load_in_memory(frame, paths, workers, progress)


def _load_in_memory(frame: pd.DataFrame, paths: list[str], workers: int, progress: bool) -> LoadedPatches:
    images = np.empty((len(paths), *PATCH_SHAPE), np.uint8)
    failures, _ = decode_all(paths, workers, progress, sink=memory_sink(images))
    if failures:
        images = images[keep_mask(len(paths), failures)]
    return _result(images, frame, failures, cache_path=None, from_cache=False)


def _result(
    images: np.ndarray, frame: pd.DataFrame, failures: Failures, *, cache_path: Path | None, from_cache: bool
) -> LoadedPatches:
    """The :class:`LoadedPatches` of ``images`` (the rows that decoded) and ``frame`` without the failed rows."""
    kept = frame.reset_index(drop=True)
    if failures:
        kept = kept.loc[keep_mask(len(kept), failures)].reset_index(drop=True)
    return LoadedPatches(images, kept, [exc.to_problem() for _, exc in failures], from_cache, cache_path)
