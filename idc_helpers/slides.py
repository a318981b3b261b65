"""Whole-slide mosaics: a patient's tissue rebuilt from its patches, with true IDC regions and predicted IDC probability.

Patch file names give the 1-based pixel coordinates of each patch's top-left corner on a 50-pixel grid
(``..._x1001_y651_...``). Patches at the right and bottom edges of a slide can be smaller than 50x50; they are placed
at their real size. Where there is no patch (glass, or tissue the dataset left out) the mosaic is white and the
masks are NaN.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np
import pandas as pd

from idc_helpers import PATCH_SIZE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Columns :func:`slide_mosaic` needs (plus the value column for the probability map).
SLIDE_COLUMNS = ("path", "patient_id", "x", "y", "label")
#: Largest side, in pixels, of the mosaic the ``slide`` command draws (bigger slides are downsampled).
CLI_MAX_SIDE = 2000


class SlideError(ValueError):
    """A slide cannot be built: unknown patient, missing or unreadable patch file, duplicate coordinates."""


@dataclass
class SlideMosaic:
    """A patient's slide rebuilt from patches, cropped to the patches' bounding box.

    ``image``: (H, W, 3) uint8 RGB, white where there is no patch. ``truth``: (H, W) float32, 1 in IDC patches, 0
    in non-IDC patches, NaN elsewhere. ``prob``: (H, W) float32 value of ``value_column`` per patch (NaN elsewhere),
    or ``None``. ``origin``: slide pixel coordinates (x, y), as in the file names, of the mosaic's top-left pixel.
    ``scale``: mosaic pixels per slide pixel.
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

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` for ``imshow`` so that the axes read slide pixels as in the file names."""
        h, w = self.truth.shape
        x0, y0 = self.origin
        return (x0, x0 + w / self.scale, y0 + h / self.scale, y0)


def _read_rgb(path: str) -> np.ndarray:
    """A patch at its real size, (h, w, 3) uint8 RGB; :class:`SlideError` naming the file when it cannot be read.

    Decoded by the loader, so colour handling (grayscale, alpha, 16-bit) is the same as for training; the white
    padding of border patches is cut off again, since a mosaic places them at their real size.
    """
    from idc_helpers.loader import PatchReadError, read_patch
    from idc_helpers.patch_index import read_png_size

    if not Path(path).is_file():
        raise SlideError(f"{path}: patch file not found; the table's 'path' column must point at the dataset's files")
    try:
        patch = read_patch(path)
    except PatchReadError as exc:
        raise SlideError(str(exc)) from exc
    try:
        width, height = read_png_size(path)
    except ValueError as exc:
        raise SlideError(f"{path}: {exc}") from exc
    return patch[:height, :width]


def _patient_rows(table: pd.DataFrame, patient_id: str, source: str) -> pd.DataFrame:
    missing = [c for c in ("patient_id", "x", "y", "label") if c not in table.columns]
    if missing:
        raise SlideError(f"{source}: missing column(s) {', '.join(missing)}; expected {', '.join(SLIDE_COLUMNS)}")
    ids = table["patient_id"].astype(str)
    rows = table[ids == str(patient_id)]
    if rows.empty:
        known = sorted(ids.unique())
        shown = ", ".join(known[:8]) + (f", ... ({len(known)} patients)" if len(known) > 8 else "")
        raise SlideError(f"{source}: no patches of patient {patient_id!r}; patients in the table: {shown}")
    duplicated = rows.duplicated(["x", "y"])
    if duplicated.any():
        first = rows[duplicated].iloc[0]
        raise SlideError(f"{source}: patient {patient_id} has several patches at x={first['x']}, y={first['y']}")
    return rows


def slide_mosaic(table: pd.DataFrame, patient_id: str, *, value_column: str | None = "prob_idc",
                 scale: float = 1.0, images: Sequence[np.ndarray] | None = None,
                 source: str = "table") -> SlideMosaic:
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
    rows = _patient_rows(table, patient_id, source)
    if images is None and "path" not in rows.columns:
        raise SlideError(f"{source}: a 'path' column is needed to read the patches")
    if images is not None:
        if len(images) != len(table):
            raise ValueError(f"{len(images)} images for a table of {len(table)} rows; they must be aligned")
        positions = np.flatnonzero((table["patient_id"].astype(str) == str(patient_id)).to_numpy())
        patches = [np.asarray(images[i]) for i in positions]
    else:
        patches = [_read_rgb(str(p)) for p in rows["path"]]
    if "width" in rows.columns and "height" in rows.columns:
        patches = [p[:h, :w] for p, w, h in zip(patches, rows["width"], rows["height"])]

    xs = rows["x"].to_numpy(dtype=np.int64) - 1  # 0-based slide pixels
    ys = rows["y"].to_numpy(dtype=np.int64) - 1
    x0, y0 = int(xs.min()), int(ys.min())
    width = max(int(x - x0) + p.shape[1] for x, p in zip(xs, patches))
    height = max(int(y - y0) + p.shape[0] for y, p in zip(ys, patches))

    image = np.full((height, width, 3), 255, dtype=np.uint8)  # white = glass
    truth = np.full((height, width), np.nan, dtype=np.float32)
    has_values = value_column is not None and value_column in rows.columns
    prob = np.full((height, width), np.nan, dtype=np.float32) if has_values else None
    values = rows[value_column].to_numpy(dtype=np.float32) if has_values else None
    labels = rows["label"].to_numpy()
    for i, (x, y, patch) in enumerate(zip(xs - x0, ys - y0, patches)):
        h, w = patch.shape[:2]
        image[y:y + h, x:x + w] = patch
        truth[y:y + h, x:x + w] = labels[i]
        if prob is not None:
            prob[y:y + h, x:x + w] = values[i]

    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        # Nearest keeps the masks' values exact (0, 1, NaN) instead of blending across patch borders.
        truth = cv2.resize(truth, size, interpolation=cv2.INTER_NEAREST)
        if prob is not None:
            prob = cv2.resize(prob, size, interpolation=cv2.INTER_NEAREST)
    return SlideMosaic(
        patient_id=str(patient_id), image=image, truth=truth, prob=prob, origin=(x0 + 1, y0 + 1),
        scale=float(scale), n_patches=len(rows), n_idc=int(labels.sum()),
        value_column=value_column if has_values else None,
    )


def plot_slide(mosaic: SlideMosaic, *, ax: Axes | Sequence[Axes] | None = None,
               show: Sequence[str] = ("tissue", "truth", "prob"), cmap: str = "jet",
               panel_width: float = 5.5) -> Figure:
    """Side-by-side panels of a :class:`SlideMosaic`; axes in slide pixels (as in the patch file names).

    ``show``: any of ``"tissue"`` (the rebuilt slide), ``"truth"`` (tissue with IDC patches tinted red and
    outlined) and ``"prob"`` (predicted IDC probability over faded tissue, true IDC outlined, with a colourbar).
    ``ax``: one axes per panel (default: a new figure).
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = [p for p in show if not (p == "prob" and mosaic.prob is None)]
    unknown = set(panels) - {"tissue", "truth", "prob"}
    if unknown or not panels:
        raise ValueError(f"show must name some of 'tissue', 'truth', 'prob' (got {list(show)})")
    h, w = mosaic.truth.shape
    if ax is None:
        # About 1.2 in of each panel's width goes to tick labels and the colourbar; the rest holds the image.
        panel_height = min(max((panel_width - 1.2) * h / w, 1.5), 2.2 * panel_width)
        fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels) + 1.0, panel_height + 0.9),
                                 squeeze=False, layout="constrained")
        axes = list(axes[0])
    else:
        axes = list(np.ravel(ax)) if isinstance(ax, (Sequence, np.ndarray)) else [ax]
        if len(axes) != len(panels):
            raise ValueError(f"{len(panels)} panels need {len(panels)} axes, got {len(axes)}")
        fig = axes[0].figure

    extent = mosaic.extent
    idc = np.nan_to_num(mosaic.truth, nan=0.0)
    # Contours are drawn on the pixel grid of the mosaic, mapped onto the slide coordinates.
    gx = extent[0] + (np.arange(w) + 0.5) / mosaic.scale
    gy = extent[3] + (np.arange(h) + 0.5) / mosaic.scale

    def outline(axis: Axes, colour: str) -> None:
        if idc.any():
            axis.contour(gx, gy, idc, levels=[0.5], colors=colour, linewidths=1.2)

    for axis, panel in zip(axes, panels):
        if panel == "tissue":
            axis.imshow(mosaic.image, extent=extent)
            axis.set_title(f"Patient {mosaic.patient_id}: tissue ({mosaic.n_patches:,} patches)")
        elif panel == "truth":
            axis.imshow(mosaic.image, extent=extent)
            tint = np.zeros((h, w, 4), dtype=np.float32)
            tint[idc > 0] = (1.0, 0.0, 0.0, 0.35)
            axis.imshow(tint, extent=extent)
            outline(axis, "red")
            share = mosaic.n_idc / mosaic.n_patches
            axis.set_title(f"True IDC regions ({mosaic.n_idc:,} patches, {share:.0%})")
            axis.legend(handles=[Patch(facecolor=(1, 0, 0, 0.35), edgecolor="red", label="IDC (label 1)")],
                        loc="upper right", fontsize="small")
        else:
            # Faded grey tissue underneath so that the colours read as probabilities, not as stain.
            grey = cv2.cvtColor(mosaic.image, cv2.COLOR_RGB2GRAY)
            axis.imshow(grey, cmap="gray", vmin=-200, vmax=255, extent=extent)
            shown = np.ma.masked_invalid(mosaic.prob)
            image = axis.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, alpha=0.6, extent=extent,
                                interpolation="nearest")
            outline(axis, "black")
            name = "predicted IDC probability" if mosaic.value_column == "prob_idc" else mosaic.value_column
            axis.set_title(f"{name[0].upper() + name[1:]}")
            fig.colorbar(image, ax=axis, label=name, shrink=0.8, pad=0.02)
            if idc.any():
                axis.legend(handles=[Line2D([], [], color="black", lw=1.2, label="true IDC outline")],
                            loc="upper right", fontsize="small")
        axis.set_xlabel("x (slide pixels)")
        axis.set_ylabel("y (slide pixels)")
    return fig


def _scale_for(table: pd.DataFrame, max_side: int) -> float:
    """Downsampling factor so that the mosaic's longest side is at most ``max_side`` pixels."""
    span = max(int(table["x"].max() - table["x"].min()), int(table["y"].max() - table["y"].min())) + PATCH_SIZE
    return min(1.0, max_side / span)


def run_slide(args: argparse.Namespace) -> int:
    """``python -m idc_helpers slide``: draw one patient's slide with IDC overlays into a PNG (written atomically)."""
    from idc_helpers.atomic import atomic_path

    source = Path(args.predictions)
    if not source.is_file():
        print(f"error: {source}: no such file; write one with `python -m idc_helpers predict` "
              "(or pass any CSV with path, patient_id, x, y, label)", file=sys.stderr)
        return 2
    try:
        table = pd.read_csv(source, dtype={"patient_id": str, "path": str})
        rows = _patient_rows(table, args.patient, str(source))
        mosaic = slide_mosaic(rows, args.patient, scale=_scale_for(rows, CLI_MAX_SIDE), source=str(source))
    except (SlideError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import matplotlib.pyplot as plt

    out = Path(args.out)
    fig = plot_slide(mosaic)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png", dpi=150)
    finally:
        plt.close(fig)
    h, w = mosaic.truth.shape
    print(f"Patient {mosaic.patient_id}: {mosaic.n_patches:,} patches, {mosaic.n_idc:,} IDC; "
          f"patches span {w / mosaic.scale:.0f}x{h / mosaic.scale:.0f} slide px; figure written to {out}")
    return 0
