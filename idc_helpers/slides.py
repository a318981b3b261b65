"""Whole-slide mosaics: a patient's tissue rebuilt from its patches, with its true IDC and predicted probability.

Patch file names give the 1-based pixel coordinates of each patch's top-left corner on a 50-pixel grid
(``..._x1001_y651_...``). Patches at the right and bottom edges of a slide can be smaller than 50x50; they are placed
at their real size. Where there is no patch (glass, or tissue the dataset left out) the mosaic is white and the
masks are NaN.

The mosaic is painted at its final scale, one patch at a time (read, resized, painted, dropped), so memory follows
the picture asked for, not the slide's full resolution nor the number of patches: the picture's 11 bytes a pixel
(RGB, truth and probability maps) plus about 200 bytes a row of the patient's table (:func:`read_patient_rows`
reads a predictions file in chunks of :data:`CHUNK_ROWS` rows and keeps that patient's rows only); a patient's rows
are distinct positions on its slide, so they are bounded by the slide too. Time is one header read and one decode per
patch. Measured for the ``slide`` command (a 2,000 px picture, drawing included; docs/input-checks.md): 877 MB at
20,000 patches, 893 MB at 100,000. A bounding box larger than any real slide (:data:`MAX_SLIDE_SIDE`, e.g. one
misnamed patch at ``x100001``) or a picture too large to hold (:data:`MAX_MOSAIC_PIXELS`) is refused with a message
naming the file. :mod:`idc_helpers.slide_plots` draws the mosaics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from idc_helpers import PATCH_SIZE
from idc_helpers.errors import UserError
from idc_helpers.metrics import stored_threshold
from idc_helpers.validation import InvalidInputError, check_table

#: Columns :func:`slide_mosaic` needs (plus the value column for the probability map).
SLIDE_COLUMNS = ("path", "patient_id", "x", "y", "label")
#: Largest side, in pixels, of the mosaic the ``slide`` command draws (bigger slides are downsampled).
CLI_MAX_SIDE = 2000
#: Largest side of a patient's bounding box, in slide pixels: ten times the widest slide of the dataset.
MAX_SLIDE_SIDE = 50_000
#: Largest mosaic, in pixels at the requested scale (about 0.6 GB with its masks).
MAX_MOSAIC_PIXELS = 50_000_000
#: Rows of a predictions file read at a time by :func:`read_patient_rows`.
CHUNK_ROWS = 200_000


class SlideError(UserError, ValueError):
    """A slide cannot be built: unknown patient, missing or unreadable patch file, duplicate coordinates."""


@dataclass
class SlideMosaic:
    """A patient's slide rebuilt from patches, cropped to the patches' bounding box.

    ``image``: (H, W, 3) uint8 RGB, white where there is no patch. ``truth``: (H, W) float32, 1 in IDC patches, 0
    in non-IDC patches, NaN elsewhere. ``prob``: (H, W) float32 value of ``value_column`` per patch (NaN elsewhere),
    or ``None``. ``origin``: slide pixel coordinates (x, y), as in the file names, of the mosaic's top-left pixel.
    ``scale``: mosaic pixels per slide pixel. ``span``: (width, height) of the patches' bounding box in slide pixels.
    """

    patient_id: str
    image: np.ndarray
    truth: np.ndarray
    prob: np.ndarray | None
    origin: tuple[int, int]
    scale: float
    n_patches: int
    n_idc: int
    value_column: str | None = None
    span: tuple[int, int] | None = None  # (width, height) in slide pixels; default: the mosaic's size / scale
    cells: np.ndarray | None = None  # (n_patches, 4) int: top, bottom, left, right of each patch in the mosaic
    rows: pd.Index | None = None  # the table's index of each patch, in the order of ``cells``

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` for ``imshow`` so that the axes read slide pixels as in the file names."""
        h, w = self.truth.shape
        width, height = self.span if self.span is not None else (w / self.scale, h / self.scale)
        x0, y0 = self.origin
        return (x0, x0 + width, y0 + height, y0)


def _read_rgb(path: str) -> np.ndarray:
    """Read a patch as the loader decodes it, (50, 50, 3) uint8 RGB padded with white.

    The mosaic crops it to its size from :func:`_patch_size`; :class:`SlideError` names the file when it cannot be
    read. Decoded by the loader, so colour handling (grayscale, alpha, 16-bit) is the same as for training.
    """
    from idc_helpers.decode import PatchReadError, read_patch

    try:
        return read_patch(path)
    except PatchReadError as exc:
        raise SlideError(str(exc)) from exc


def _patch_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of a patch file from its PNG header; :class:`SlideError` naming the file otherwise."""
    from idc_helpers.patch_files import read_png_size

    try:
        if not Path(path).is_file():
            raise SlideError(
                f"{path}: patch file not found; the table's 'path' column must point at the dataset's files"
            )
        return read_png_size(path)
    except (OSError, ValueError) as exc:
        if isinstance(exc, SlideError):
            raise
        raise SlideError(f"{path[:200]}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from exc


def patient_rows(table: pd.DataFrame, patient_id: str, source: str = "table") -> pd.DataFrame:
    """Return the rows of one patient, after checking the columns and that no two share a position.

    Raises :class:`SlideError` naming ``source`` otherwise.
    """
    missing = [c for c in ("patient_id", "x", "y", "label") if c not in table.columns]
    if missing:
        raise SlideError(f"{source}: missing column(s) {', '.join(missing)}; expected {', '.join(SLIDE_COLUMNS)}")
    ids = table["patient_id"].astype(str)
    rows = table[ids == str(patient_id)]
    if rows.empty:
        _no_such_patient(patient_id, ids.unique(), source)
    try:
        rows = check_table(rows, ("patient_id", "x", "y", "label"), source)
    except InvalidInputError as exc:
        raise SlideError(str(exc)) from None
    duplicated = rows.duplicated(["x", "y"])
    if duplicated.any():
        first = rows[duplicated].iloc[0]
        raise SlideError(f"{source}: patient {patient_id} has several patches at x={first['x']}, y={first['y']}")
    return rows


def _no_such_patient(patient_id: str, known: Sequence[str], source: str) -> None:
    known = sorted(str(k) for k in known)
    shown = ", ".join(known[:8]) + (f", ... ({len(known)} patients)" if len(known) > 8 else "")
    raise SlideError(f"{source}: no patches of patient {patient_id!r}; patients in the table: {shown or 'none'}")


@dataclass
class PatientTable:
    """One patient's rows of a predictions file (checked by :func:`patient_rows`) and the file's decision threshold.

    The threshold is the run's, which ``predict`` records in the table (``recorded`` True), else the one its
    decisions imply (:func:`decision_threshold`; None without ``prob_idc`` and ``pred``).
    """

    rows: pd.DataFrame
    threshold: float | None
    recorded: bool = False


def read_patient_rows(path: str | Path, patient_id: str) -> PatientTable:
    """Read the rows of one patient from a predictions CSV (or any table with ``path, patient_id, x, y, label``).

    The file is read in chunks of :data:`CHUNK_ROWS`, so that memory follows that patient, not the file; a
    :class:`SlideError` names the file when it cannot be read or holds no such patient.
    """
    source = str(path)
    if not Path(path).is_file():
        raise SlideError(
            f"{source}: no such file; write one with `python -m idc_helpers predict` (or pass any CSV "
            "with path, patient_id, x, y, label)"
        )
    parts, known, implied, recorded, start = [], set(), [], [], 1
    try:
        for chunk in pd.read_csv(
            path, dtype={"patient_id": str, "path": str}, chunksize=CHUNK_ROWS, float_precision="round_trip"
        ):
            chunk = check_table(chunk, ("patient_id", "x", "y", "label"), source, first_row=start)
            start += len(chunk)
            known.update(chunk["patient_id"].unique().tolist())
            parts.append(chunk[chunk["patient_id"] == str(patient_id)])
            implied.append(decision_threshold(chunk))
            recorded.append(stored_threshold(chunk))
    except InvalidInputError as exc:
        raise SlideError(str(exc)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise SlideError(f"{source}: not a readable CSV table ({' '.join(str(exc).split())})") from exc
    rows = pd.concat(parts)
    if rows.empty:
        _no_such_patient(patient_id, known, source)
    rows = patient_rows(rows, patient_id, source)
    if recorded and None not in recorded and len(set(recorded)) == 1:
        return PatientTable(rows, recorded[0], recorded=True)
    thresholds = [t for t in implied if t is not None]
    return PatientTable(rows, min(thresholds) if thresholds else None)


def _check_size(rows: pd.DataFrame, width: int, height: int, scale: float, source: str) -> None:
    """Refuse a bounding box no real slide has, or a mosaic too large to hold, naming the outlying patch."""
    pixels = round(width * scale) * round(height * scale)
    if max(width, height) <= MAX_SLIDE_SIDE and pixels <= MAX_MOSAIC_PIXELS:
        return
    far = rows.iloc[int(np.argmax(np.maximum(rows["x"].to_numpy(), rows["y"].to_numpy())))]
    named = f" (e.g. {far['path']})" if "path" in rows.columns else f" (x={far['x']}, y={far['y']})"
    patient = far["patient_id"]
    if max(width, height) > MAX_SLIDE_SIDE:
        raise SlideError(
            f"{source}: the patches of patient {patient} span {width:,} x {height:,} slide pixels, more than any "
            f"real slide (at most {MAX_SLIDE_SIDE:,}); check the coordinates in the file names of the outlying "
            f"patches{named}"
        )
    raise SlideError(
        f"{source}: a mosaic of patient {patient} at scale {scale:g} would be {pixels:,} pixels (at most "
        f"{MAX_MOSAIC_PIXELS:,}); pass a smaller scale"
    )


def slide_mosaic(
    table: pd.DataFrame,
    patient_id: str,
    *,
    value_column: str | None = "prob_idc",
    scale: float = 1.0,
    images: Sequence[np.ndarray] | None = None,
    source: str = "table",
) -> SlideMosaic:
    """Rebuild one patient's slide, ``patient_id``, from a patch index or predictions table.

    ``table`` has rows with ``patient_id``, ``x``, ``y`` (1-based top-left, slide pixels), ``label`` and, unless
    ``images`` is given, ``path`` (PNG files, read at their real size). ``value_column`` holds the per-patch value
    of the ``prob`` map (skipped when ``None`` or absent from the table). ``scale`` is in mosaic pixels per slide
    pixel (e.g. 0.5 for the biggest slides, ~4000x3000 px at full size). ``images``, instead of reading files:
    patches aligned row for row with ``table`` (e.g. ``LoadedPatches.images`` with its ``frame``), (h, w, 3) uint8
    RGB each; padded 50x50 patches are cropped to the ``width``/``height`` columns when present (without them,
    border patches are drawn padded). ``source`` names the table's file in error messages.
    """
    if not 0 < scale <= 1:
        raise ValueError("scale must be in (0, 1]")
    rows = patient_rows(table, patient_id, source)
    # Checked before any patch is read: the bounding box, with full-size patches at the far edges.
    _check_size(rows, int(np.ptp(rows["x"])) + PATCH_SIZE, int(np.ptp(rows["y"])) + PATCH_SIZE, scale, source)
    if images is None and "path" not in rows.columns:
        raise SlideError(f"{source}: a 'path' column is needed to read the patches")
    patch = _patch_source(table, rows, patient_id, images)
    sizes = _patch_sizes(rows, patch, from_files=images is None)
    xs = rows["x"].to_numpy(dtype=np.int64) - 1  # 0-based slide pixels
    ys = rows["y"].to_numpy(dtype=np.int64) - 1
    x0, y0 = int(xs.min()), int(ys.min())
    width = int((xs - x0 + sizes[:, 0]).max())
    height = int((ys - y0 + sizes[:, 1]).max())

    # Each patch covers [x * scale, (x + w) * scale) rounded: neighbours tile without gaps or overlaps.
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = np.full((*size, 3), 255, dtype=np.uint8)  # white = glass
    has_values = value_column is not None and value_column in rows.columns
    values = rows[value_column].to_numpy(dtype=np.float32) if has_values else None
    labels = rows["label"].to_numpy()
    left, top = np.rint((xs - x0) * scale), np.rint((ys - y0) * scale)
    cells = np.stack(
        [top, np.rint((ys - y0 + sizes[:, 1]) * scale), left, np.rint((xs - x0 + sizes[:, 0]) * scale)], axis=1
    ).astype(np.int64)
    for k, (top, bottom, left, right) in enumerate(cells):
        if bottom <= top or right <= left:
            continue  # a sliver that rounds to nothing at this scale
        pixels = patch(k)[: sizes[k, 1], : sizes[k, 0]]  # one patch in memory at a time
        image[top:bottom, left:right] = (
            pixels
            if scale == 1.0
            else cv2.resize(pixels, (int(right - left), int(bottom - top)), interpolation=cv2.INTER_AREA)
        )
    truth = _paint(size, cells, labels.astype(np.float32))
    prob = _paint(size, cells, values) if has_values else None
    return SlideMosaic(
        patient_id=str(patient_id),
        image=image,
        truth=truth,
        prob=prob,
        origin=(x0 + 1, y0 + 1),
        scale=float(scale),
        n_patches=len(rows),
        n_idc=int(labels.sum()),
        value_column=value_column if has_values else None,
        span=(width, height),
        cells=cells,
        rows=rows.index,
    )


def _patch_source(
    table: pd.DataFrame, rows: pd.DataFrame, patient_id: str, images: Sequence[np.ndarray] | None
) -> Callable[[int], np.ndarray]:
    """Return ``patch(k)``: the pixels of the ``k``-th row of ``rows``, (h, w, 3) uint8.

    They come from ``images`` (aligned with ``table``) or from the row's file, at its real size.
    """
    if images is None:
        paths = rows["path"].astype(str).tolist()
        return lambda k: _read_rgb(paths[k])
    if len(images) != len(table):
        raise ValueError(f"{len(images)} images for a table of {len(table)} rows; they must be aligned")
    positions = np.flatnonzero((table["patient_id"].astype(str) == str(patient_id)).to_numpy())
    return lambda k: np.asarray(images[positions[k]])


def _patch_sizes(rows: pd.DataFrame, patch: Callable[[int], np.ndarray], from_files: bool) -> np.ndarray:
    """Return the ``(n, 2)`` width and height of each patch.

    They come from the table's ``width``/``height`` columns, else the PNG headers (files), else the given images'
    shapes (padded patches drawn padded).
    """
    if "width" in rows.columns and "height" in rows.columns:
        return np.stack([rows["width"].to_numpy(np.int64), rows["height"].to_numpy(np.int64)], axis=1)
    if from_files:
        return np.array([_patch_size(str(p)) for p in rows["path"]], dtype=np.int64).reshape(-1, 2)
    return np.array([patch(k).shape[1::-1] for k in range(len(rows))], dtype=np.int64).reshape(-1, 2)


def _paint(size: tuple[int, int], cells: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Paint a (H, W) float32 map: each patch's cell filled with its value, NaN where there is no patch."""
    out = np.full(size, np.nan, dtype=np.float32)
    for (top, bottom, left, right), value in zip(cells, values, strict=True):
        out[top:bottom, left:right] = value
    return out


def with_values(mosaic: SlideMosaic, table: pd.DataFrame, value_column: str) -> SlideMosaic:
    """Return the same mosaic with its ``prob`` map painted from another column of the table it was built from.

    E.g. ``prob_idc_context``; no patch is read again.
    """
    if mosaic.cells is None or mosaic.rows is None:
        raise ValueError("this mosaic does not record where its patches lie; build it with slide_mosaic")
    if value_column not in table.columns:
        raise SlideError(f"the table has no column {value_column!r}")
    values = table.loc[mosaic.rows, value_column].to_numpy(dtype=np.float32)
    return replace(mosaic, prob=_paint(mosaic.truth.shape, mosaic.cells, values), value_column=value_column)


def decision_threshold(table: pd.DataFrame, value_column: str = "prob_idc", pred_column: str = "pred") -> float | None:
    """Return the threshold a predictions table's decisions imply: the lowest ``value_column`` called IDC.

    The calls are ``pred_column``'s; ``None`` without such columns or without any IDC call.
    """
    if value_column not in table.columns or pred_column not in table.columns:
        return None
    called = table.loc[table[pred_column].astype(int) == 1, value_column]
    return None if called.empty else float(called.min())


def scale_to_fit(rows: pd.DataFrame, max_side: int) -> float:
    """Return the mosaic pixels per slide pixel that make the mosaic of ``rows`` at most ``max_side`` pixels a side."""
    span = max(int(np.ptp(rows["x"])), int(np.ptp(rows["y"]))) + PATCH_SIZE
    return min(1.0, max_side / span)
