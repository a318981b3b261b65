"""Whole-slide mosaics: a patient's tissue rebuilt from its patches, with true IDC regions and predicted IDC probability.

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
20,000 patches, 893 MB at 100,000. A bounding box larger than any real slide (:data:`MAX_SLIDE_SIDE`, e.g. one misnamed patch at ``x100001``)
or a picture too large to hold (:data:`MAX_MOSAIC_PIXELS`) is refused with a message naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from idc_helpers import PATCH_SIZE
from idc_helpers.errors import UserError
from idc_helpers.metrics import stored_threshold
from idc_helpers.validation import InvalidInputError, check_table

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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


# The words for a probability column on a figure.
_BAR_NAMES = {"prob_idc": "p(IDC)", "prob_idc_context": "p(IDC) with slide context"}
_VALUE_NAMES = {"prob_idc": "predicted IDC probability", "prob_idc_context": "IDC probability with slide context"}


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
    """A patch as the loader decodes it, (50, 50, 3) uint8 RGB padded with white (the mosaic crops it to its size
    from :func:`_patch_size`); :class:`SlideError` naming the file when it cannot be read.

    Decoded by the loader, so colour handling (grayscale, alpha, 16-bit) is the same as for training.
    """
    from idc_helpers.decode import PatchReadError, read_patch

    try:
        return read_patch(path)
    except PatchReadError as exc:
        raise SlideError(str(exc)) from exc


def _patch_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of a patch file from its PNG header; :class:`SlideError` naming the file otherwise."""
    from idc_helpers.patch_index import read_png_size

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
    """The rows of one patient, after checking the columns and that no two share a position (:class:`SlideError`
    naming ``source`` otherwise).
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
    """One patient's rows of a predictions file (checked by :func:`patient_rows`) and the file's decision threshold:
    the run's, which ``predict`` records in the table (``recorded`` True), else the one its decisions imply
    (:func:`decision_threshold`; None without ``prob_idc`` and ``pred``).
    """

    rows: pd.DataFrame
    threshold: float | None
    recorded: bool = False


def read_patient_rows(path: str | Path, patient_id: str) -> PatientTable:
    """Read the rows of one patient from a predictions CSV (or any table with ``path, patient_id, x, y, label``) in
    chunks of :data:`CHUNK_ROWS`, so that memory follows that patient, not the file; :class:`SlideError` naming the
    file when it cannot be read or holds no such patient.
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
    """Rebuild one patient's slide from a patch index or predictions table.

    Args:
        table: rows with ``patient_id``, ``x``, ``y`` (1-based top-left, slide pixels), ``label`` and ``path`` (PNG
            files, read at their real size) unless ``images`` is given.
        patient_id: the patient to draw.
        value_column: per-patch value for the ``prob`` map (skipped when ``None`` or absent from the table).
        scale: mosaic pixels per slide pixel (e.g. 0.5 for the biggest slides, ~4000x3000 px at full size).
        images: optional patches aligned row for row with ``table`` (e.g. ``LoadedPatches.images`` with its
            ``frame``), (h, w, 3) uint8 RGB each, instead of reading files; padded 50x50 patches are cropped to the
            ``width``/``height`` columns when present (without them, border patches are drawn padded).
        source: name of the table's file, for error messages.
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
    """``patch(k)``: the pixels of the ``k``-th row of ``rows``, (h, w, 3) uint8, from ``images`` (aligned with
    ``table``) or read from its file at its real size.
    """
    if images is None:
        paths = rows["path"].astype(str).tolist()
        return lambda k: _read_rgb(paths[k])
    if len(images) != len(table):
        raise ValueError(f"{len(images)} images for a table of {len(table)} rows; they must be aligned")
    positions = np.flatnonzero((table["patient_id"].astype(str) == str(patient_id)).to_numpy())
    return lambda k: np.asarray(images[positions[k]])


def _patch_sizes(rows: pd.DataFrame, patch: Callable[[int], np.ndarray], from_files: bool) -> np.ndarray:
    """``(n, 2)`` width and height of each patch: the table's ``width``/``height`` columns, else the PNG headers
    (files), else the given images' shapes (padded patches drawn padded).
    """
    if "width" in rows.columns and "height" in rows.columns:
        return np.stack([rows["width"].to_numpy(np.int64), rows["height"].to_numpy(np.int64)], axis=1)
    if from_files:
        return np.array([_patch_size(str(p)) for p in rows["path"]], dtype=np.int64).reshape(-1, 2)
    return np.array([patch(k).shape[1::-1] for k in range(len(rows))], dtype=np.int64).reshape(-1, 2)


def _paint(size: tuple[int, int], cells: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(H, W) float32 map: each patch's cell filled with its value, NaN where there is no patch."""
    out = np.full(size, np.nan, dtype=np.float32)
    for (top, bottom, left, right), value in zip(cells, values, strict=True):
        out[top:bottom, left:right] = value
    return out


def with_values(mosaic: SlideMosaic, table: pd.DataFrame, value_column: str) -> SlideMosaic:
    """The same mosaic with its ``prob`` map painted from another column of the table it was built from (e.g.
    ``prob_idc_context``), without reading a patch again.
    """
    if mosaic.cells is None or mosaic.rows is None:
        raise ValueError("this mosaic does not record where its patches lie; build it with slide_mosaic")
    if value_column not in table.columns:
        raise SlideError(f"the table has no column {value_column!r}")
    values = table.loc[mosaic.rows, value_column].to_numpy(dtype=np.float32)
    return replace(mosaic, prob=_paint(mosaic.truth.shape, mosaic.cells, values), value_column=value_column)


def decision_threshold(table: pd.DataFrame, value_column: str = "prob_idc", pred_column: str = "pred") -> float | None:
    """The threshold a predictions table's decisions imply: the lowest ``value_column`` called IDC in
    ``pred_column`` (``None`` without such columns or without any IDC call).
    """
    if value_column not in table.columns or pred_column not in table.columns:
        return None
    called = table.loc[table[pred_column].astype(int) == 1, value_column]
    return None if called.empty else float(called.min())


#: Width of a slide figure in inches: about 1,000 px where a notebook shows it (100 dpi).
FIGURE_WIDTH = 10.5


def _slide_axes(
    mosaic: SlideMosaic, ax: Axes | Sequence[Axes] | None, n_panels: int, panel_width: float | None
) -> tuple[Figure, list[Axes]]:
    """The given axes (one per panel), or a new figure sized for the slide's aspect, :data:`FIGURE_WIDTH` wide
    unless ``panel_width`` (inches) says otherwise.
    """
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = list(np.ravel(ax)) if isinstance(ax, (Sequence, np.ndarray)) else [ax]
        if len(axes) != n_panels:
            raise ValueError(f"{n_panels} panels need {n_panels} axes, got {len(axes)}")
        return axes[0].figure, axes
    panel_width = panel_width or (FIGURE_WIDTH - 0.5) / n_panels
    fig, axes = plt.subplots(
        1,
        n_panels,
        figsize=(panel_width * n_panels + 0.5, _panel_height(mosaic, panel_width)),
        squeeze=False,
        layout="constrained",
    )
    return fig, list(axes[0])


def _panel_height(mosaic: SlideMosaic, panel_width: float) -> float:
    """Figure height for panels ``panel_width`` inches wide: the image at its aspect (about 1.1 in of the width goes
    to tick labels and a colour bar), plus room for a title above and a legend below.
    """
    h, w = mosaic.truth.shape
    return min(max((panel_width - 1.1) * h / w, 1.5), 2.2 * panel_width) + 2.0


def threshold_colormap(threshold: float, n: int = 256):
    """A colour map for probabilities on a *linear* 0-1 scale whose colours change at ``threshold``: blues below
    it (darkest at 0), reds from it (darkest at 1), palest at the threshold itself.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    base = colormaps["coolwarm"]
    values = np.linspace(0.0, 1.0, n)
    below = 0.5 * values / threshold
    above = 0.5 + 0.5 * (values - threshold) / (1.0 - threshold)
    return ListedColormap(
        base(np.where(values < threshold, np.minimum(below, 0.499), np.maximum(above, 0.501))),
        name=f"split_at_{threshold:.3f}",
    )


def _legend_below(axis: Axes, handles: list) -> None:
    """A legend under the axes (never over the tissue)."""
    axis.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=len(handles),
        fontsize="small",
        frameon=False,
    )


def _outline(axis: Axes, mosaic: SlideMosaic, mask: np.ndarray, **style) -> bool:
    """Contour of a 0/1 mask of the mosaic, in slide coordinates; whether there was anything to draw."""
    if not mask.any():
        return False
    h, w = mask.shape
    left, _, _, top = mosaic.extent
    axis.contour(
        left + (np.arange(w) + 0.5) / mosaic.scale,
        top + (np.arange(h) + 0.5) / mosaic.scale,
        mask.astype(np.float32),
        levels=[0.5],
        linewidths=1.2,
        **style,
    )
    return True


def _draw_probability(axis: Axes, mosaic: SlideMosaic, threshold: float | None, title: str | None) -> None:
    """The probability panel: colours over faded tissue, split at ``threshold`` on a linear colour bar, with the
    decision outlined.
    """
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    # Faded grey tissue underneath so that the colours read as probabilities, not as stain.
    axis.imshow(cv2.cvtColor(mosaic.image, cv2.COLOR_RGB2GRAY), cmap="gray", vmin=-200, vmax=255, extent=mosaic.extent)
    split = threshold is not None and 0.0 < threshold < 1.0
    cmap = threshold_colormap(threshold) if split else "viridis"
    image = axis.imshow(
        np.ma.masked_invalid(mosaic.prob),
        cmap=cmap,
        norm=Normalize(0.0, 1.0),
        alpha=0.75 if split else 0.6,
        extent=mosaic.extent,
        interpolation="nearest",
    )
    name = _VALUE_NAMES.get(mosaic.value_column, mosaic.value_column)
    axis.set_title(
        title
        or ("Predicted p(IDC)" if mosaic.value_column == "prob_idc" else name[0].upper() + name[1:])
        + (f"\nred: called IDC (p >= {threshold:.2f})" if split else ""),
        fontsize="medium",
    )
    # An inset colour bar follows the image's own height (the axes box around an equal-aspect image is taller).
    bar = axis.figure.colorbar(image, cax=axis.inset_axes([1.03, 0.0, 0.045, 1.0], label="<colorbar>"))
    # Named on top, not along its side, where the label would sit beside the next panel's axis.
    bar.ax.set_title(
        _BAR_NAMES.get(mosaic.value_column, name) + ("\nlinear" if split else ""), fontsize="x-small", loc="left"
    )
    bar.ax.tick_params(labelsize="x-small")
    handles = []
    if _outline(axis, mosaic, np.nan_to_num(mosaic.truth, nan=0.0) > 0, colors="black"):
        handles.append(Line2D([], [], color="black", lw=1.2, label="true IDC outline"))
    if split:
        # The colour bar is linear: its colours change at the threshold, wherever that lies.
        ticks = [t for t in (0.0, 0.25, 0.5, 0.75, 1.0) if abs(t - threshold) > 0.07]
        bar.set_ticks([*ticks, threshold], labels=[f"{t:g}" for t in ticks] + [f"threshold {threshold:.2f}"])
        bar.ax.axhline(threshold, color="black", lw=2)
        # The decision beside the probability: pale patches just above the threshold are called IDC too.
        if _outline(
            axis, mosaic, np.nan_to_num(mosaic.prob, nan=0.0) >= threshold, colors="darkred", linestyles="dashed"
        ):
            handles.append(Line2D([], [], color="darkred", lw=1.2, ls="--", label="called IDC"))
    if handles:
        _legend_below(axis, handles)


def plot_slide(
    mosaic: SlideMosaic,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    show: Sequence[str] = ("tissue", "truth", "prob"),
    threshold: float | None = None,
    panel_width: float | None = None,
    title: str | None = None,
) -> Figure:
    """Side-by-side panels of a :class:`SlideMosaic`; axes in slide pixels (as in the patch file names).

    ``show``: any of ``"tissue"`` (the rebuilt slide), ``"truth"`` (tissue with IDC patches tinted red and
    outlined) and ``"prob"`` (predicted IDC probability over faded tissue, true IDC outlined, with a colour bar).
    ``threshold``: the run's decision threshold; the colours then split there (blue: called non-IDC, red: called
    IDC) on a linear colour bar that marks it, and the called-IDC region is outlined. ``title``: the probability
    panel's title. ``ax``: one axes per panel; without it the figure is :data:`FIGURE_WIDTH` inches wide (or
    ``panel_width`` inches a panel). Legends sit under the panels, never over the tissue.
    """
    from matplotlib.patches import Patch

    panels = [p for p in show if not (p == "prob" and mosaic.prob is None)]
    unknown = set(panels) - {"tissue", "truth", "prob"}
    if unknown or not panels:
        raise ValueError(f"show must name some of 'tissue', 'truth', 'prob' (got {list(show)})")
    fig, axes = _slide_axes(mosaic, ax, len(panels), panel_width)
    idc = np.nan_to_num(mosaic.truth, nan=0.0) > 0
    for axis, panel in zip(axes, panels, strict=False):
        if panel == "tissue":
            axis.imshow(mosaic.image, extent=mosaic.extent)
            axis.set_title(f"Patient {mosaic.patient_id}\ntissue ({mosaic.n_patches:,} patches)", fontsize="medium")
        elif panel == "truth":
            axis.imshow(mosaic.image, extent=mosaic.extent)
            tint = np.zeros((*idc.shape, 4), dtype=np.float32)
            tint[idc] = (1.0, 0.0, 0.0, 0.35)
            axis.imshow(tint, extent=mosaic.extent)
            _outline(axis, mosaic, idc, colors="red")
            share = mosaic.n_idc / mosaic.n_patches
            axis.set_title(f"True IDC regions\n{mosaic.n_idc:,} patches ({share:.0%})", fontsize="medium")
            _legend_below(axis, [Patch(facecolor=(1, 0, 0, 0.35), edgecolor="red", label="IDC (label 1)")])
        else:
            _draw_probability(axis, mosaic, threshold, title)
        axis.set_xlabel("x (slide pixels)", fontsize="small")
        axis.set_ylabel("y (slide pixels)", fontsize="small")
        axis.tick_params(labelsize="x-small")
    return fig


def scale_to_fit(rows: pd.DataFrame, max_side: int) -> float:
    """Mosaic pixels per slide pixel so that the mosaic of ``rows`` is at most ``max_side`` pixels a side."""
    span = max(int(np.ptp(rows["x"])), int(np.ptp(rows["y"]))) + PATCH_SIZE
    return min(1.0, max_side / span)


def plot_raw_and_context(
    mosaic: SlideMosaic,
    table: pd.DataFrame,
    *,
    threshold: float,
    context_threshold: float,
    panel_width: float | None = None,
) -> Figure:
    """The patch-only probability and the slide-context probability (``prob_idc_context``) of one mosaic side by
    side, each split at its own threshold and with the true IDC regions outlined (the patch-only one is what the
    papers measured; the context one uses the neighbouring patches on the slide). :data:`FIGURE_WIDTH` wide.
    """
    import matplotlib.pyplot as plt

    panel_width = panel_width or (FIGURE_WIDTH - 0.5) / 2
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * panel_width + 0.5, _panel_height(mosaic, panel_width)), layout="constrained"
    )
    plot_slide(
        mosaic, ax=axes[0], show=("prob",), threshold=threshold, title=f"Patch only\n(p >= {threshold:.2f} called IDC)"
    )
    context = with_values(mosaic, table, "prob_idc_context")
    same = bool(np.allclose(np.nan_to_num(context.prob), np.nan_to_num(mosaic.prob)))
    plot_slide(
        context,
        ax=axes[1],
        show=("prob",),
        threshold=context_threshold,
        title=(
            "Identical with slide context: no smoothing\ndid better on the validation patients"
            if same
            else f"With slide context: neighbours on the slide\n(p >= {context_threshold:.2f} called IDC)"
        ),
    )
    share = mosaic.n_idc / mosaic.n_patches
    fig.suptitle(f"Patient {mosaic.patient_id}: {mosaic.n_patches:,} patches, {mosaic.n_idc:,} IDC ({share:.0%})")
    return fig
